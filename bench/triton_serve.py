"""Serving through Triton vs the Classifier in-process, same run: `--clients` threads each send
single JPEG images one after another (bench/service_batching.py's load) to each side in turn,
`--rounds` times; prints images per second and per-request latency (p50, p99).

Sides (SIDES; add one by writing a context manager that yields `classify(jpeg) -> error or None`):
  in-process    Classifier.classify_one from the client threads (no server, no protocol)
  batcher       novic.runtime.batching.Batcher in-process (batching without a server)
  triton-http   novic.serve.triton (PyTriton, dynamic batching) called with tritonclient over HTTP
  triton-grpc   the same server over gRPC
  ray-serve     novic.serve.ray_serve (one replica on a local Ray cluster) over HTTP

    python bench/triton_serve.py --config tiny --clients 8 --requests 10 --rounds 3
    python bench/triton_serve.py --config paper --clients 8 --requests 3 --rounds 3

Server and clients share this machine's cores: on a small CPU the protocol's cost shows, the
batching gain mostly does not (see bench/service_batching.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from novic.bench.measure import sample_images
from novic.bench.setup import CONFIGS, build
from novic.runtime.classifier import Classifier
from service_batching import jpeg_bytes, serve   # bench/ is on sys.path when this script runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def in_process(args):
    with Classifier.load(args.bundle, backend=args.backend, threads=args.threads) as clf:
        def classify(jpeg):
            return clf.classify_one(jpeg, topk=5)
        yield classify, clf.describe()


@contextlib.contextmanager
def batcher(args):
    from novic.runtime.batching import Batcher

    with Classifier.load(args.bundle, backend=args.backend, threads=args.threads) as clf, \
            Batcher(clf, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms) as batched:
        yield (lambda jpeg: batched.classify_one(jpeg, topk=5)), clf.describe()


@contextlib.contextmanager
def pytriton_server(args):
    from novic.serve.triton import start

    with start(args.bundle, backend=args.backend, threads=args.threads, http_port=free_port(),
               grpc_port=free_port(), metrics_port=free_port(), max_batch=args.max_batch,
               max_wait_ms=args.max_wait_ms, stub_env=args.stub_env,
               log_file=Path(args.workdir) / "tritonserver.log") as server:
        yield server


def _triton_call(module, client, jpeg):
    inputs = [module.InferInput("image", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[jpeg]], dtype=object))
    error = client.infer("novic", inputs).as_numpy("error")[0, 0]
    return SimpleNamespace(error=error.decode() or None)


@contextlib.contextmanager
def triton_http(args):
    import tritonclient.http as http

    with pytriton_server(args) as server:
        local = threading.local()     # one HTTP connection per client thread

        def classify(jpeg):
            if not hasattr(local, "client"):
                local.client = http.InferenceServerClient(server.http_url)
            return _triton_call(http, local.client, jpeg)
        yield classify, server.describe()


@contextlib.contextmanager
def triton_grpc(args):
    import tritonclient.grpc as grpc

    with pytriton_server(args) as server:
        client = grpc.InferenceServerClient(server.grpc_url)   # thread-safe, one channel
        yield (lambda jpeg: _triton_call(grpc, client, jpeg)), server.describe()
        client.close()


@contextlib.contextmanager
def ray_serve(args):
    import ray
    from ray import serve as rserve

    from novic.serve.ray_serve import serve
    from ray_scale import poster, wait_http

    ray.init(num_cpus=os.cpu_count() + 2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve(args.bundle, port=port, replicas=1, cpus_per_replica=1, blocking=False, backend=args.backend,
              threads=args.threads, max_batch=args.max_batch, batch_wait_s=args.max_wait_ms / 1e3)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield poster(f"http://127.0.0.1:{port}/classify?topk=5"), "Ray Serve, 1 replica"
    finally:
        rserve.shutdown()
        ray.shutdown()


SIDES = {"in-process": in_process, "batcher": batcher, "triton-http": triton_http, "triton-grpc": triton_grpc,
         "ray-serve": ray_serve}


def compare(args) -> str:
    images = jpeg_bytes(sample_images(8))
    load_before = os.getloadavg()[0]
    rates = {name: [] for name in args.sides}
    latencies = {name: [] for name in args.sides}
    described = {}
    with contextlib.ExitStack() as stack:
        sides = {}
        for name in args.sides:
            classify, described[name] = stack.enter_context(SIDES[name](args))
            sides[name] = classify
            serve(classify, args.clients, 1, images)          # warm-up: sessions, vocabulary, connections
        for _ in range(args.rounds):                            # taking turns: load changes hit every side
            for name, classify in sides.items():
                rate, lat = serve(classify, args.clients, args.requests, images)
                rates[name].append(rate)
                latencies[name] += lat
    base = statistics.median(rates[args.sides[0]])
    lines = [f"{described[args.sides[0]]}; JPEG inputs; {args.clients} clients x {args.requests} requests x "
             f"{args.rounds} rounds; Triton: max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}; "
             f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}", "",
             f"| served by | img/s, median of rounds (range) | vs {args.sides[0]} | latency p50 | latency p99 |",
             "|---|---|---|---|---|"]
    for name in args.sides:
        lat = np.asarray(latencies[name])
        med = statistics.median(rates[name])
        lines.append(f"| {name} | {med:.2f} ({min(rates[name]):.2f}-{max(rates[name]):.2f}) | {med / base:.2f}x | "
                     f"{np.percentile(lat, 50):.1f} ms | {np.percentile(lat, 99):.1f} ms |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny", choices=list(CONFIGS))
    ap.add_argument("--bundle", default=None, help="a bundle directory instead of --config's")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per Classifier")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=10, help="images per client and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, first = baseline: {', '.join(SIDES)}")
    ap.add_argument("--stub-env", default=os.environ.get("NOVIC_TRITON_STUB_ENV") or
                    (".triton-stub-venv" if Path(".triton-stub-venv").is_dir() else None))
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench"))
    args = ap.parse_args()
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in args.sides if s not in SIDES]
    if unknown:
        ap.error(f"unknown side {unknown[0]!r}; choose from {', '.join(SIDES)}")
    args.bundle = args.bundle or build(CONFIGS[args.config], Path(args.workdir) / args.config)["bundle"]
    print(compare(args))


if __name__ == "__main__":
    main()
