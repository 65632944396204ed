"""Host work per decoder call at batch 1 (target <= 50 us), paper-size decoder, on the CPU.

Guided beam 10 over the paper config's 11,897 synthetic nouns with a random decoder of the paper
size (F=768, V=5,330, Cmax=12), exported once into --workdir. Three code paths of
OrtDecoderSession, each timed by novic.bench.hostwork (wall time minus the time inside
onnxruntime, per prefill/step call):
- plain: numpy in and out of `InferenceSession.run` (ort-cpu's path);
- iobinding: the ort-cuda path without graphs (cache in ping-pong OrtValues, scores bound out);
- cuda-graph logic: ort-cuda's default path (fixed buffers per shape, `update_inplace` copies in,
  score buffers read back), here against host memory.

A second table times beam search's own work before each call, by call index, over the fake
decoder of bench/search_overhead.py (no onnxruntime at all; least disturbed of --fake-reps
searches), for sessions that step every row (ort-cuda with CUDA graphs) and that drop finished
rows (ort-cpu).

    python bench/host_per_step.py [--batches 1 8] [--reps 30] [--workdir /tmp/novic_host]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np


def paper_decoder_graphs(workdir: Path):
    """-> (DecoderConfig, prefill path, step path, trie): exported once per workdir."""
    from novic.bench.setup import CONFIGS, synthetic_nouns
    from novic.config import DecoderConfig
    from novic.runtime.trie import TokenTrie

    pc = CONFIGS["paper"]
    cfg = DecoderConfig(embed_dim=pc.embed_dim, vocab_size=pc.vocab_size, max_tokens=pc.max_tokens)
    prefill, step = workdir / "decoder_prefill.onnx", workdir / "decoder_step.onnx"
    if not (prefill.exists() and step.exists()):
        import torch

        from novic.export.decoder_onnx import export_decoder
        from novic.model.decoder import ObjectDecoder

        torch.manual_seed(0)
        model = ObjectDecoder(cfg)
        with torch.no_grad():   # peaked distributions, like a trained decoder (as novic.bench.setup)
            model.token_embedding.weight.normal_(std=0.5)
            model.prefix_proj.weight.normal_(std=0.5)
        export_decoder(model, workdir, topk=10)
    return cfg, prefill, step, TokenTrie(synthetic_nouns(pc.nouns, pc.vocab_size, cfg.max_new_tokens))


def sessions(cfg, prefill, step, threads: int | None):
    from novic.bench.hostwork import rehearse_cuda_graphs
    from novic.runtime.backends.ort import OrtDecoderSession

    def make(**kw):
        return OrtDecoderSession(prefill, step, cfg, threads=threads, **kw)

    graphed = make(iobinding=True)
    rehearse_cuda_graphs(graphed)
    return {"plain": make(), "iobinding": make(iobinding=True), "cuda-graph logic": graphed}


def search_gaps(cfg, trie, embeds, drops_rows: bool, reps: int) -> list[float]:
    """Host microseconds before each decoder call (index 0: between the prefill and the first step)
    and after the last one (the ranking), least disturbed of `reps` searches; fake session."""
    from search_overhead import FakeSession

    from novic.runtime.search import beam_search

    marks: list[float] = []

    class Timed(FakeSession):
        drops_finished_rows = drops_rows

        def prefill(self, *args):
            out = super().prefill(*args)
            marks.append(time.perf_counter())
            return out

        def step(self, *args):
            marks.append(time.perf_counter())
            out = super().step(*args)
            marks.append(time.perf_counter())
            return out

    session, best = Timed(cfg), None
    for _ in range(reps):
        marks.clear()
        beam_search(session, embeds, 10, trie=trie)
        marks.append(time.perf_counter())   # after the search: the final ranking
        gaps = [1e6 * (marks[i + 1] - marks[i]) for i in range(0, len(marks) - 1, 2)]
        best = gaps if best is None else [min(a, b) for a, b in zip(best, gaps)]
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fake-reps", type=int, default=300)
    ap.add_argument("--workdir", default="/tmp/novic_host")
    args = ap.parse_args(argv)
    from novic.bench.hostwork import host_per_call

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, prefill, step, trie = paper_decoder_graphs(workdir)
    print(f"# paper-size decoder, {trie.num_sequences} nouns, guided beam 10; python "
          f"{platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}",
          file=sys.stderr)
    print("| batch | code path | calls per search | host us/call (median search) | of it: search | of it: session | "
          "onnxruntime us/call | host us/call, least disturbed search |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for b in args.batches:
        embeds = rng.standard_normal((b, cfg.embed_dim)).astype(np.float32)
        embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
        for name, session in sessions(cfg, prefill, step, args.threads).items():
            r = host_per_call(session, embeds, 10, trie, reps=args.reps)
            print(f"| {b} | {name} | {r['calls']:.0f} | {r['host_us']:.0f} | {r['search_us']:.0f} | "
                  f"{r['session_us']:.0f} | {r['ort_us']:.0f} | {r['host_us_min']:.0f} |", flush=True)
    print("\n| batch | session | search's host us before each call (first: after the prefill), then the ranking |")
    print("|---|---|---|")
    for b in args.batches:
        embeds = rng.standard_normal((b, cfg.embed_dim)).astype(np.float32)
        for drops, name in ((False, "every row (ort-cuda graphs)"), (True, "unfinished rows (ort-cpu)")):
            gaps = search_gaps(cfg, trie, embeds, drops, args.fake_reps)
            print(f"| {b} | {name} | {', '.join(f'{g:.0f}' for g in gaps)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
