"""The decoder on the CPU: plain fp32 prefill/step graphs vs the fused fp32 ones
(novic.export.fused: MultiHeadAttention, SkipLayerNormalization, Gelu), same process,
interleaved call by call so that the machine's load hits both alike.

    python bench/cpu_fused_decoder.py --config paper --reps 200 --rows 1,10 [--threads 2]

The decoder has the config's size with random weights (the training init; no CLIP tower is
needed); both variants are exported with the current code into --workdir and the fused one is
gated (novic.export.fused_gate, fp32: identical free beam tokens on 100 embeddings) before it
is timed. Prints the nodes per graph, then per row count the median of one step (at the middle
of the cache) and of one whole decode of one image (greedy at 1 row, else a beam of that width), and the ratio plain / fused.
"""
import argparse
import collections
import os
import statistics
import time
from pathlib import Path

import numpy as np

from novic.bench.setup import CONFIGS


def export(cfg_name: str, workdir: Path):
    """Plain + fused fp32 graphs of a random decoder of `cfg_name`'s size -> (config, {variant: (prefill, step)})."""
    import onnx
    import torch

    from novic.config import DecoderConfig
    from novic.export.decoder_onnx import export_decoder
    from novic.export.fused import fuse_file, op_counts
    from novic.model.decoder import ObjectDecoder

    bench = CONFIGS[cfg_name]
    cfg = DecoderConfig(embed_dim=bench.embed_dim, vocab_size=bench.vocab_size, max_tokens=bench.max_tokens)
    torch.manual_seed(0)
    plain = export_decoder(ObjectDecoder(cfg), workdir, topk=10)
    paths = {"plain": (plain["prefill"]["path"], plain["step"]["path"]),
             "fused": tuple(fuse_file(plain[k]["path"], f"decoder_{k}")["path"] for k in ("prefill", "step"))}
    print("| graph | plain nodes | fused nodes | fused ops (com.microsoft) |")
    print("|---|---|---|---|")
    for i, name in enumerate(("prefill", "step")):
        counts = {v: op_counts(onnx.load(p[i])) for v, p in paths.items()}
        ms = {op: n for op, n in counts["fused"].items() if op in ("MultiHeadAttention", "SkipLayerNormalization", "Gelu")}
        print(f"| {name} | {sum(counts['plain'].values())} | {sum(counts['fused'].values())} | {ms} |")
    return cfg, paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rows", default="1,10", help="rows per step (beam width x images)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench-fused-decoder"))
    a = ap.parse_args()
    from novic.export.fused_gate import gate_decoder
    from novic.runtime import search
    from novic.runtime.backends.ort import OrtDecoderSession, make_session

    workdir = Path(a.workdir) / a.config
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, paths = export(a.config, workdir)
    gate = gate_decoder(paths["plain"], paths["fused"], cfg, "fp32", width=10)
    print(gate.line("decoder fp32"))
    if not gate.passed:
        raise SystemExit("the fused decoder fails its gate: nothing timed")

    steps = {v: make_session(p[1], threads=a.threads) for v, p in paths.items()}
    decoders = {v: OrtDecoderSession(*p, cfg, threads=a.threads) for v, p in paths.items()}
    rng = np.random.default_rng(0)
    print(f"{a.config}: decoder {cfg.layers} layers x {cfg.width}, V={cfg.vocab_size}, Smax={cfg.seq_len}; "
          f"onnxruntime CPU, threads {a.threads or 'default'}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print("| rows | step plain (median) | step fused (median) | plain / fused | decode plain (greedy / beam = rows) | decode fused | plain / fused |")
    print("|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in a.rows.split(",")):
        position = (cfg.prefix_len + cfg.seq_len) // 2
        feeds = {"tokens": rng.integers(1, cfg.vocab_size, rows), "position": np.array([position]),
                 "beam_idx": np.arange(rows), "temperature": np.ones(1, np.float32),
                 "kv_cache": rng.standard_normal(cfg.cache_shape(rows)).astype(np.float32) * 0.5,
                 "cand_ids": np.zeros((rows, 1), np.int64)}
        embeds = rng.standard_normal((1, cfg.embed_dim)).astype(np.float32)

        def decode(session, rows=rows, embeds=embeds):   # one image: greedy, or a beam of `rows`
            hyps = search.greedy(session, embeds) if rows == 1 else search.beam_search(session, embeds, width=rows)[0]
            return [h.tokens for h in hyps]
        times = collections.defaultdict(list)
        tokens = {}
        for v in steps:   # warm-up
            steps[v].run(None, feeds)
            tokens[v] = decode(decoders[v])
        assert tokens["plain"] == tokens["fused"], "plain and fused decode differently"
        for rep in range(a.reps):
            for v in steps:
                t0 = time.perf_counter()
                steps[v].run(None, feeds)
                times["step", v].append((time.perf_counter() - t0) * 1e3)
            if rep % 10 == 0:   # a whole decode costs ~Cmax steps: fewer reps
                for v in decoders:
                    t0 = time.perf_counter()
                    decode(decoders[v])
                    times["decode", v].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(t) for k, t in times.items()}
        print(f"| {rows} | {med['step', 'plain']:.3f} ms | {med['step', 'fused']:.3f} ms | "
              f"{med['step', 'plain'] / med['step', 'fused']:.2f}x | {med['decode', 'plain']:.2f} ms | "
              f"{med['decode', 'fused']:.2f} ms | {med['decode', 'plain'] / med['decode', 'fused']:.2f}x |")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
