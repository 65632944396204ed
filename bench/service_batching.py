"""A service's load: `--clients` threads, each classifying single images one after another, served
either by `Classifier.classify_one` directly (thread-safe: each call is its own batch of 1) or by
`novic.runtime.batching.Batcher` (concurrent requests classified together). The two take turns
for `--rounds` rounds; prints images per second and the per-request latency (p50, p90). The
images are JPEG bytes (`--inputs jpeg`, what a service receives: decoding is part of the work)
or decoded PIL images (`--inputs pil`).

    python bench/service_batching.py --config paper --backend ort-cpu --clients 8 --requests 6
    python bench/service_batching.py --bundle DIR --backend ort-cuda --clients 32 --requests 20
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from novic.bench.measure import jpeg_bytes, sample_images
from novic.bench.setup import CONFIGS, build
from novic.runtime.batching import Batcher
from novic.runtime.classifier import Classifier


def serve(classify, clients: int, requests: int, images) -> tuple[float, list[float]]:
    """(images per second, per-request latencies in ms) of `clients` threads x `requests` calls."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int):
        start.wait()
        for r in range(requests):
            t0 = time.perf_counter()
            try:
                result = classify(images[(c * requests + r) % len(images)])
                error = result.error
            except Exception as exc:  # noqa: BLE001 - reported below, not lost in the thread
                error = f"{type(exc).__name__}: {exc}"
            elapsed = (time.perf_counter() - t0) * 1e3
            with lock:
                latencies.append(elapsed)
                if error:
                    failures.append(error)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return clients * requests / (time.perf_counter() - t0), latencies


def compare_serving(bundle, backend: str, precision=None, clients: int = 8, requests: int = 6,
                    rounds: int = 3, max_batch: int = 32, max_wait_ms: float = 2.0, inputs: str = "jpeg") -> dict:
    """Both ways of serving, taking turns -> {"markdown": table, "ratio": Batcher / classify_one img/s, ...}."""
    images = sample_images(8)
    if inputs == "jpeg":
        images = jpeg_bytes(images)
    with Classifier.load(bundle, backend=backend, precision=precision) as clf, \
            Batcher(clf, max_batch=max_batch, max_wait_ms=max_wait_ms) as batcher:
        sides = {"classify_one": clf.classify_one, "Batcher": batcher.classify_one}
        for classify in sides.values():   # warm-up: sessions, vocabulary, CUDA graphs
            serve(classify, clients, 1, images)
        rates = {name: [] for name in sides}
        latencies = {name: [] for name in sides}
        for _ in range(rounds):   # taking turns, so that a change in load hits both
            for name, classify in sides.items():
                rate, lat = serve(classify, clients, requests, images)
                rates[name].append(rate)
                latencies[name] += lat
        described = clf.describe()
    lines = [f"{described}; {inputs} inputs; {clients} clients x {requests} requests x {rounds} rounds; "
             f"Batcher(max_batch={max_batch}, max_wait_ms={max_wait_ms}): "
             f"{batcher.images / max(1, batcher.batches):.1f} images per batch on average, largest {batcher.largest_batch}",
             "", "| served by | img/s (median of rounds; range) | latency p50 | latency p90 |", "|---|---|---|---|"]
    for name in sides:
        lat = np.asarray(latencies[name])
        lines.append(f"| {name} | {statistics.median(rates[name]):.2f} ({min(rates[name]):.2f}-{max(rates[name]):.2f}) | "
                     f"{np.percentile(lat, 50):.1f} ms | {np.percentile(lat, 90):.1f} ms |")
    ratio = statistics.median(rates["Batcher"]) / statistics.median(rates["classify_one"])
    lines.append(f"\nBatcher / classify_one throughput: {ratio:.2f}x")
    return {"markdown": "\n".join(lines), "ratio": ratio, "rates": rates}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--bundle", default=None, help="a bundle directory instead of --config's")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6, help="images per client and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--inputs", default="jpeg", choices=("jpeg", "pil"))
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench"))
    a = ap.parse_args()
    bundle = a.bundle or build(CONFIGS[a.config], Path(a.workdir) / a.config)["bundle"]
    print(compare_serving(bundle, a.backend, a.precision, a.clients, a.requests, a.rounds,
                          a.max_batch, a.max_wait_ms, a.inputs)["markdown"])


if __name__ == "__main__":
    main()
