"""Ray Serve vs examples/serve.py, and Ray Data labelling with 1 and 2 workers, in one run.

    python bench/ray_scale.py --config tiny --clients 16 --requests 20 --rounds 3 --images 2000

Serving: `--clients` threads each POST `--requests` JPEGs (the sample photos, quality 90) one after
another to /classify, against examples/serve.py (standard library + Batcher, one process, started
as a subprocess) and against novic-serve on Ray Serve (a local cluster; 1 replica, then 2), taking
turns each round so that a change in the machine's load hits both. Prints img/s (median of rounds)
and latency p50/p99 over all requests.
Labelling: `--images` generated JPEGs labelled by novic.serve.ray_label with 1 and 2 classifier
actors (fresh OUT each time), and by a serial Classifier.classify over the same files (the
novic-run baseline), taking turns for `--rounds` rounds. Ray Data's rates include starting its
actors and the driver's checks, as a user sees them; the serial rate excludes loading the bundle.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from service_batching import serve as run_clients  # noqa: E402  (the same client threads and timing)

# examples/serve.py as it is, but with a listen backlog of 128: socketserver's default of 5 resets
# connections when 16 clients connect at once, which would measure the backlog, not the service.
STDLIB_SERVER = ("import runpy, socketserver, sys; socketserver.TCPServer.request_queue_size = 128; "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpegs(n: int, side: int | None = None, seed: int = 0) -> list[bytes]:
    from PIL import Image

    from novic.bench.measure import sample_images

    out = []
    images = sample_images(4) if side is None else None
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = images[i % 4] if side is None else Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def poster(url: str):
    """A `classify` for service_batching.serve: POST the bytes to `url`; any non-200 raises."""
    def post(body: bytes):
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=300) as reply:
            reply.read()
        return types.SimpleNamespace(error=None)

    return post


def load(url: str, clients: int, requests: int, bodies: list[bytes]) -> tuple[float, list[float]]:
    """(img/s, latencies in ms) of `clients` threads x `requests` POSTs; a failed request fails the run."""
    return run_clients(poster(url), clients, requests, bodies)


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def bench_serving(bundle: str, a) -> str:
    from ray import serve as rserve

    from novic.serve.ray_serve import serve

    bodies = jpegs(8)
    std_port, ray_port = free_port(), free_port()
    stdlib = subprocess.Popen([sys.executable, "-c", STDLIB_SERVER, str(ROOT / "examples" / "serve.py"), bundle, "--port", str(std_port),
                               "--backend", a.backend], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{std_port}/healthz")
        sides = {"examples/serve.py (Batcher)": f"http://127.0.0.1:{std_port}/classify"}
        for replicas in (1, 2):
            serve(bundle, port=ray_port, replicas=replicas, cpus_per_replica=1, blocking=False, backend=a.backend,
                  threads=None if replicas == 1 else 1)
            name = f"Ray Serve, {replicas} replica{'s' * (replicas > 1)}"
            sides[name] = f"http://127.0.0.1:{ray_port}/classify"
            pair = {k: sides[k] for k in ("examples/serve.py (Batcher)", name)}
            for url in pair.values():   # warm-up
                load(url, a.clients, 1, bodies)
            rates = {k: [] for k in pair}
            lat = {k: [] for k in pair}
            for _ in range(a.rounds):
                for k, url in pair.items():
                    rate, ms = load(url, a.clients, a.requests, bodies)
                    rates[k].append(rate)
                    lat[k] += ms
            for k in pair:   # each Ray row follows the examples/serve.py row measured beside it
                rows.append((k, rates[k], np.asarray(lat[k])))
        rserve.shutdown()
    finally:
        stdlib.terminate()
        stdlib.wait(timeout=30)
    base = {}
    lines = [f"{a.clients} clients x {a.requests} requests x {a.rounds} rounds, JPEG sample photos",
             "", "| served by | img/s, median of rounds (range) | vs examples/serve.py | p50 | p99 |", "|---|---|---|---|---|"]
    for k, rates, ms in rows:
        med = statistics.median(rates)
        if k.startswith("examples"):
            base["last"] = med
            ratio = "1.00x"
        else:
            ratio = f"{med / base['last']:.2f}x"
        lines.append(f"| {k} | {med:.1f} ({min(rates):.1f}-{max(rates):.1f}) | {ratio} | "
                     f"{np.percentile(ms, 50):.1f} ms | {np.percentile(ms, 99):.1f} ms |")
    return "\n".join(lines)


def bench_labelling(bundle: str, a) -> str:
    from novic.runtime.classifier import Classifier
    from novic.serve.ray_label import label

    with tempfile.TemporaryDirectory(prefix="novic-label-bench-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for i, data in enumerate(jpegs(a.images, side=a.side)):
            (images / f"{i:06d}.jpg").write_bytes(data)
        files = sorted(str(p) for p in images.iterdir())

        def serial() -> float:
            with Classifier.load(bundle, backend=a.backend) as clf:
                t0 = time.perf_counter()
                clf.classify(files, batch_size=a.batch_size)
                return a.images / (time.perf_counter() - t0)

        def ray_data(workers: int, run: int) -> float:
            summary = label([str(images)], Path(tmp) / f"out{workers}-{run}", bundle=bundle, concurrency=workers,
                            batch_size=a.batch_size, backend=a.backend)
            assert summary.labelled == a.images and summary.failed == 0, summary
            return summary.rate

        sides = {"serial Classifier.classify (novic-run)": lambda run: serial(),
                 "Ray Data, 1 worker": lambda run: ray_data(1, run),
                 "Ray Data, 2 workers": lambda run: ray_data(2, run)}
        rates = {name: [] for name in sides}
        for run in range(a.rounds):   # taking turns, so that a change in load hits all three
            for name, measure in sides.items():
                rates[name].append(measure(run))
    base = statistics.median(rates["serial Classifier.classify (novic-run)"])
    lines = [f"{a.images} generated {a.side}x{a.side} JPEGs, batch size {a.batch_size}, {a.rounds} rounds", "",
             "| labelled by | img/s, median of rounds (range) | vs serial |", "|---|---|---|"]
    for name, got in rates.items():
        med = statistics.median(got)
        lines.append(f"| {name} | {med:.1f} ({min(got):.1f}-{max(got):.1f}) | {med / base:.2f}x |")
    return "\n".join(lines)


def main():
    from novic.bench.setup import CONFIGS, build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", choices=list(CONFIGS))
    ap.add_argument("--bundle", default=None, help="a bundle directory instead of --config's")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20, help="requests per client and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=2000, help="images to label")
    ap.add_argument("--side", type=int, default=256, help="side of the generated images to label")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip", choices=("serve", "label"), default=None)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench"))
    a = ap.parse_args()
    bundle = a.bundle or str(build(CONFIGS[a.config], Path(a.workdir) / a.config)["bundle"])
    import ray

    ray.init(num_cpus=os.cpu_count() + 2, include_dashboard=False, log_to_driver=False)
    print(f"bundle {bundle} ({a.config}), backend {a.backend}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f} at start", flush=True)
    try:
        if a.skip != "serve":
            print(bench_serving(bundle, a), flush=True)
        if a.skip != "label":
            print(bench_labelling(bundle, a), flush=True)
    finally:
        ray.shutdown()
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
