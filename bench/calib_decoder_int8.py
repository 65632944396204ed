"""Does INT8 pay for the decoder on the CPU? Dynamic INT8 (per-channel MatMul) of the paper
bundle's prefill + step graphs against fp32: one guided beam-10 decode per image, the two sessions
taking turns, median ms per image and top-1 agreement.

    python bench/calib_decoder_int8.py [BUNDLE] [--n 40]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from novic.calib.ort_int8 import quantize_dynamic_int8
from novic.runtime.backends.ort import OrtDecoderSession
from novic.runtime.bundle import Bundle
from novic.runtime.search import beam_search
from novic.runtime.trie import TokenTrie


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", nargs="?", default=str(Path.home() / ".cache/novic/bench/paper/bundle"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    bundle = Bundle.open(a.bundle, verify=False)
    cfg = bundle.decoder_config
    with tempfile.TemporaryDirectory() as tmp:
        int8 = {}
        for role in ("decoder_prefill", "decoder_step"):
            int8[role] = Path(tmp) / f"{role}.int8.onnx"
            quantize_dynamic_int8(bundle.artifact_path(role), int8[role])
        sessions = {
            "fp32": OrtDecoderSession(bundle.artifact_path("decoder_prefill"), bundle.artifact_path("decoder_step"),
                                      cfg, threads=a.threads),
            "int8": OrtDecoderSession(int8["decoder_prefill"], int8["decoder_step"], cfg, threads=a.threads)}
        trie = TokenTrie(bundle.noun_tokens)
        rng = np.random.default_rng(0)
        embeds = rng.standard_normal((a.n, cfg.embed_dim)).astype(np.float32)
        embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
        load = os.getloadavg()[0]
        ms, top1 = {k: [] for k in sessions}, {k: [] for k in sessions}
        for i in range(a.n):
            for name, session in sessions.items():
                t0 = time.perf_counter()
                hyps = beam_search(session, embeds[i:i + 1], 10, trie=trie)
                ms[name].append((time.perf_counter() - t0) * 1e3)
                top1[name].append(hyps[0][0].tokens)
    med = {k: float(np.median(v)) for k, v in ms.items()}
    agree = sum(x == y for x, y in zip(top1["fp32"], top1["int8"]))
    print(f"guided beam-10 decode per image: fp32 {med['fp32']:.1f} ms, int8 {med['int8']:.1f} ms "
          f"({med['fp32'] / med['int8']:.2f}x); top-1 agreement {agree}/{a.n}; "
          f"load {load:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
