"""The image encoder on the CPU: plain fp32 graph vs the fused fp32 graph (novic.export.fused),
same bundle, same process, interleaved call by call so that the machine's load hits both alike.
Prints the median per batch size and the ratio plain / fused of those medians.

    python bench/cpu_fused_encoder.py --config paper --reps 15 --batches 1,8 [--threads 2]

The bundle is the one bench/cpu_rounds.py uses (novic.bench.setup: random weights of the paper's
architecture, exported with the current code, fused variants included).
"""
import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from novic.bench.setup import CONFIGS, build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench"))
    a = ap.parse_args()
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.bundle import Bundle

    paths = build(CONFIGS[a.config], Path(a.workdir) / a.config)
    bundle = Bundle.open(paths["bundle"])
    encoders = {variant: OrtImageEncoder(bundle.artifact_path("image_encoder", "fp32", variant), threads=a.threads)
                for variant in ("plain", "fused")}
    rng = np.random.default_rng(0)
    print(f"{a.config}: {bundle.embedder['spec']['model']}, onnxruntime CPU, threads {a.threads or 'default'}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print("| batch | plain fp32 (median) | fused fp32 (median) | plain / fused |")
    print("|---|---|---|---|")
    for batch in (int(b) for b in a.batches.split(",")):
        pixels = rng.standard_normal((batch, 3, *encoders["plain"].image_size)).astype(np.float32)
        outs = {v: enc(pixels) for v, enc in encoders.items()}   # warm-up, and the numbers agree
        cos = float(np.min(np.sum(outs["plain"] * outs["fused"], 1)))
        times = {v: [] for v in encoders}
        for _ in range(a.reps):
            for variant, enc in encoders.items():
                t0 = time.perf_counter()
                enc(pixels)
                times[variant].append((time.perf_counter() - t0) * 1e3)
        plain, fused = (statistics.median(times[v]) for v in ("plain", "fused"))
        print(f"| {batch} | {plain:.1f} ms | {fused:.1f} ms | {plain / fused:.2f}x (min cosine {cos:.6f}) |")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
