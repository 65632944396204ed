"""A/B of two bundles' decoder step graphs on onnxruntime's CPU provider, nothing else running: the
same random inputs (1 image x `--rows` beams, a random cache, `--cands` candidate ids per row) at
an early and the last position, the two graphs taking turns for `--rounds` rounds of `--reps`
runs each. Prints the median over rounds of each round's median, and the range.

For graph changes whose effect the end-to-end rounds (bench/cpu_rounds.py) blur: there the step
is a few ms among seconds of encoder work on the same two cores.

    python bench/step_ab.py ~/.cache/novic/bench/paper-oldstep/bundle ~/.cache/novic/bench/paper/bundle
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from novic.runtime.bundle import Bundle
from novic.runtime.backends.ort import make_session


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a", help="bundle A (e.g. exported by older code)")
    ap.add_argument("b", help="bundle B, same decoder config")
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--cands", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    bundles = {name: Bundle.open(d, verify=False) for name, d in (("A", a.a), ("B", a.b))}
    if bundles["A"].decoder_config != bundles["B"].decoder_config:
        raise SystemExit("the two bundles have different decoder configs")
    cfg = bundles["A"].decoder_config
    sessions = {name: make_session(b.artifact_path("decoder_step", "fp32"), threads=a.threads)
                for name, b in bundles.items()}
    rng = np.random.default_rng(0)
    print(f"| position | A: {a.a} | B: {a.b} | A / B |")
    print("|---|---|---|---|")
    for position in (cfg.prefix_len + 1, cfg.seq_len - 1):
        feeds = {"tokens": rng.integers(1, cfg.vocab_size, a.rows), "position": np.array([position]),
                 "beam_idx": rng.integers(0, a.rows, a.rows),
                 "kv_cache": rng.standard_normal(cfg.cache_shape(a.rows)).astype(np.float32),
                 "temperature": np.ones(1, np.float32), "cand_ids": rng.integers(0, cfg.vocab_size, (a.rows, a.cands))}
        rounds = {name: [] for name in sessions}
        for _ in range(a.rounds):
            for name, session in sessions.items():   # taking turns, so that a change in load hits both
                for _ in range(5):
                    session.run(None, feeds)
                times = []
                for _ in range(a.reps):
                    start = time.perf_counter()
                    session.run(None, feeds)
                    times.append(time.perf_counter() - start)
                rounds[name].append(statistics.median(times) * 1e3)
        med = {name: statistics.median(v) for name, v in rounds.items()}
        cells = [f"{med[n]:.2f} ms ({min(rounds[n]):.2f}-{max(rounds[n]):.2f})" for n in sessions]
        print(f"| {position} | {cells[0]} | {cells[1]} | {med['A'] / med['B']:.2f}x |")


if __name__ == "__main__":
    main()
