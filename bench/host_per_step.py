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
decoder of bench/search_overhead.py (no onnxruntime at all; median and least disturbed of
--fake-reps searches), for sessions that step every row (ort-cuda with CUDA graphs) and that drop
finished rows (ort-cpu). --baseline FILE times a copy of an earlier search.py in the same run,
the two taking turns, and checks that both return the same hypotheses.

    python bench/host_per_step.py [--batches 1 8] [--reps 30] [--workdir /tmp/novic_host]
    git show REV:novic/runtime/search.py > /tmp/search_before.py
    python bench/host_per_step.py --search-only --batches 1 --baseline /tmp/search_before.py
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def paper_config_and_trie():
    """-> (DecoderConfig, trie) of the paper config: 11,897 synthetic nouns."""
    from novic.bench.setup import CONFIGS, synthetic_nouns
    from novic.config import DecoderConfig
    from novic.runtime.trie import TokenTrie

    pc = CONFIGS["paper"]
    cfg = DecoderConfig(embed_dim=pc.embed_dim, vocab_size=pc.vocab_size, max_tokens=pc.max_tokens)
    return cfg, TokenTrie(synthetic_nouns(pc.nouns, pc.vocab_size, cfg.max_new_tokens))


def paper_decoder_graphs(workdir: Path):
    """-> (DecoderConfig, prefill path, step path, trie): exported once per workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, trie = paper_config_and_trie()
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
    return cfg, prefill, step, trie


def sessions(cfg, prefill, step, threads: int | None):
    from novic.bench.hostwork import rehearse_cuda_graphs
    from novic.runtime.backends.ort import OrtDecoderSession

    def make(**kw):
        return OrtDecoderSession(prefill, step, cfg, threads=threads, **kw)

    graphed = make(iobinding=True)
    rehearse_cuda_graphs(graphed)
    return {"plain": make(), "iobinding": make(iobinding=True), "cuda-graph logic": graphed}


def search_gaps(cfg, trie, embeds, drops_rows: bool, reps: int, searches: dict) -> dict:
    """Host microseconds before each decoder call (index 0: between the prefill and the first step)
    and after the last one (the ranking), fake session. The searches take turns, rep after rep, so
    that load on the shared machine hits them alike. -> {name: array [reps, gaps]}."""
    from search_overhead import FakeSession

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

    session, gaps = Timed(cfg), {name: [] for name in searches}
    results = {}
    for _ in range(reps):
        for name, beam_search in searches.items():
            marks.clear()
            results[name] = beam_search(session, embeds, 10, trie=trie)
            marks.append(time.perf_counter())   # after the search: the final ranking
            gaps[name].append([1e6 * (marks[i + 1] - marks[i]) for i in range(0, len(marks) - 1, 2)])
    first = next(iter(results.values()))
    if any(r != first for r in results.values()):
        raise SystemExit("the searches returned different hypotheses")
    return {name: np.array(g) for name, g in gaps.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fake-reps", type=int, default=300)
    ap.add_argument("--workdir", default="/tmp/novic_host")
    ap.add_argument("--baseline", metavar="FILE",
                    help="also time this copy of an earlier search.py, interleaved (second table)")
    ap.add_argument("--search-only", action="store_true",
                    help="only the second table (fake decoder; no onnxruntime, no export)")
    args = ap.parse_args(argv)
    from novic.bench.hostwork import host_per_call
    from novic.runtime.search import beam_search

    rng = np.random.default_rng(0)
    if args.search_only:
        cfg, trie = paper_config_and_trie()
        for b in args.batches:  # the first table's embeddings: the second's are those of a full run
            rng.standard_normal((b, cfg.embed_dim))
    else:
        cfg, prefill, step, trie = paper_decoder_graphs(Path(args.workdir))
    print(f"# paper-size decoder, {trie.num_sequences} nouns, guided beam 10; python "
          f"{platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    if not args.search_only:
        print("| batch | code path | calls per search | host us/call (median search) | of it: search | "
              "of it: session | onnxruntime us/call | host us/call, least disturbed search |")
        print("|---|---|---|---|---|---|---|---|")
        for b in args.batches:
            embeds = rng.standard_normal((b, cfg.embed_dim)).astype(np.float32)
            embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
            for name, session in sessions(cfg, prefill, step, args.threads).items():
                r = host_per_call(session, embeds, 10, trie, reps=args.reps)
                print(f"| {b} | {name} | {r['calls']:.0f} | {r['host_us']:.0f} | {r['search_us']:.0f} | "
                      f"{r['session_us']:.0f} | {r['ort_us']:.0f} | {r['host_us_min']:.0f} |", flush=True)
    searches = {"current": beam_search}
    if args.baseline:
        from search_overhead import load_search

        searches["baseline"] = load_search(args.baseline)
    print("\n| batch | session | search | search's host us before each call (first: after the prefill), "
          "then the ranking: median (least disturbed) |")
    print("|---|---|---|---|")
    for b in args.batches:
        embeds = rng.standard_normal((b, cfg.embed_dim)).astype(np.float32)
        for drops, name in ((False, "every row (ort-cuda graphs)"), (True, "unfinished rows (ort-cpu)")):
            gaps = search_gaps(cfg, trie, embeds, drops, args.fake_reps, searches)
            for which, g in gaps.items():
                cells = ", ".join(f"{m:.0f} ({lo:.0f})" for m, lo in zip(np.median(g, 0), g.min(0)))
                print(f"| {b} | {name} | {which} | {cells} |", flush=True)
            if args.baseline:
                ratio = np.median(gaps["baseline"], 0) / np.median(gaps["current"], 0)
                print(f"| {b} | {name} | baseline / current | "
                      f"{', '.join(f'{r:.2f}x' for r in ratio)} |", flush=True)
    print(f"# load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
