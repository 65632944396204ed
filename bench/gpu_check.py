"""GPU check in one run: GPU tokens vs the CPU oracle, then benchmarks vs the original-style
pipeline on the same GPU. Prints a short table; writes JSON to --out.

  python bench/gpu_check.py --out DIR [--config paper] [--backend ort-cuda] [--device cuda]

Runs on CPU too (--backend ort-cpu --device cpu --config tiny) to rehearse before a GPU session.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "cpu"


def tokens_agree(bundle_dir: str, checkpoint: str, backend: str, n: int, width: int = 10) -> dict:
    """Beam-10 guided + greedy free tokens: `backend` sessions vs the ort-cpu fp32 sessions and vs
    the PyTorch oracle (reference.beam_search) on a subset."""
    import torch

    from novic.model.checkpoint import load_checkpoint
    from novic.model.reference import beam_search as oracle_beam
    from novic.runtime.classifier import Classifier
    from novic.runtime.search import beam_search, greedy

    rng = np.random.default_rng(0)
    ckpt = load_checkpoint(checkpoint)
    embeds = rng.standard_normal((n, ckpt.config.embed_dim)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    cpu = Classifier.load(bundle_dir, backend="ort-cpu", precision="fp32")
    trie = cpu.vocabulary(None).trie
    ref = beam_search(cpu.decoder, embeds, width, trie=trie)
    ref_greedy = greedy(cpu.decoder, embeds)
    out = {}
    for precision in ("fp32", "fp16"):
        try:
            clf = Classifier.load(bundle_dir, backend=backend, precision=precision)
        except Exception as exc:  # report and go on: one missing variant must not stop the check
            out[precision] = {"error": str(exc).splitlines()[0]}
            continue
        t0 = time.perf_counter()
        got = beam_search(clf.decoder, embeds, width, trie=trie)
        took = time.perf_counter() - t0
        got_greedy = greedy(clf.decoder, embeds)
        same_all = sum([h.tokens for h in a] == [h.tokens for h in b] for a, b in zip(got, ref))
        same_top1 = sum(a[0].tokens == b[0].tokens for a, b in zip(got, ref))
        top5 = float(np.mean([len({h.tokens for h in a[:5]} & {h.tokens for h in b[:5]}) / 5
                              for a, b in zip(got, ref)]))
        dmax = max(abs(a[0].logprob - b[0].logprob) for a, b in zip(got, ref))
        same_greedy = sum(a.tokens == b.tokens for a, b in zip(got_greedy, ref_greedy))
        out[precision] = {"backend": clf.backend, "n": n, "beam_all_equal": same_all, "beam_top1_equal": same_top1,
                          "top5_overlap": top5, "greedy_equal": same_greedy, "max_top1_logprob_diff": dmax,
                          "beam_search_s": took}
        log(f"{backend} {precision}: beam all-equal {same_all}/{n}, top-1 {same_top1}/{n}, "
            f"top-5 overlap {top5:.3f}, greedy {same_greedy}/{n}, max |dlogp| {dmax:.2e}")
    k = min(n, 40)
    model = ckpt.build_model()
    with torch.no_grad():
        oracle = oracle_beam(model, torch.from_numpy(embeds[:k]), width, trie=trie)
    out["cpu_vs_oracle_equal"] = sum([h.tokens for h in a] == [h.tokens for h in b]
                                     for a, b in zip(ref[:k], oracle))
    out["oracle_n"] = k
    log(f"ort-cpu fp32 vs PyTorch oracle: {out['cpu_vs_oracle_equal']}/{k} identical beam lists")
    return out


def encoder_graphs_ab(bundle_dir: str, backend: str, precisions, batches=(1, 8, 32), reps: int = 20) -> dict:
    """Image encoder alone, plain onnxruntime runs vs CUDA-graph replay (novic's default on CUDA),
    interleaved in one process: median ms per batch and the largest difference of the outputs."""
    from novic.bench.timing import measure
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.bundle import Bundle

    provider = "cuda" if backend == "ort-cuda" else "cpu"
    bundle = Bundle.open(bundle_dir)
    out = {}
    for precision in precisions:
        path = bundle.artifact_path("image_encoder", precision)
        plain = OrtImageEncoder(path, provider=provider, cuda_graph=False)
        graphed = OrtImageEncoder(path, provider=provider)
        rng = np.random.default_rng(0)
        rows = {}
        for b in batches:
            pixels = rng.standard_normal((b, 3, *plain.image_size)).astype(np.float32)
            diff = float(np.abs(plain(pixels) - graphed(pixels)).max())
            t_plain = measure(lambda: plain(pixels), reps=reps)["p50_ms"]
            t_graph = measure(lambda: graphed(pixels), reps=reps)["p50_ms"]
            rows[b] = {"plain_ms": t_plain, "graphs_ms": t_graph, "max_abs_diff": diff}
            log(f"encoder {precision} batch {b}: plain {t_plain:.2f} ms, CUDA graphs {t_graph:.2f} ms "
                f"({t_plain / t_graph:.2f}x), max |diff| {diff:.1e}"
                + ("" if graphed.cuda_graphs else f" [graphs off: {graphed.cuda_graph_error}]"))
        out[precision] = rows
    return out


def decoder_rows_ab(bundle_dir: str, backend: str, precision: str, batches=(1, 32, 256), reps: int = 10) -> dict:
    """Guided beam-10 decoding alone: CUDA-graph replay, which is given every row (finished beams
    too), against plain runs that step only the unfinished beams (search.beam_search drops
    finished rows where a session runs uncaptured), in one process; the tokens must agree."""
    from novic.bench.timing import measure
    from novic.runtime.backends.ort import OrtDecoderSession
    from novic.runtime.bundle import Bundle
    from novic.runtime.search import beam_search
    from novic.runtime.trie import TokenTrie

    provider = "cuda" if backend == "ort-cuda" else "cpu"
    bundle = Bundle.open(bundle_dir)
    precision = precision if precision in ("fp32", "fp16") else "fp32"   # int8/fp8 bundles decode in fp32
    graphs = (bundle.artifact_path("decoder_prefill", precision), bundle.artifact_path("decoder_step", precision))
    graphed = OrtDecoderSession(*graphs, bundle.decoder_config, provider=provider)
    plain = OrtDecoderSession(*graphs, bundle.decoder_config, provider=provider, cuda_graph=False)
    trie = TokenTrie(bundle.noun_tokens)
    rng = np.random.default_rng(0)
    out = {"precision": precision}
    for b in batches:
        embeds = rng.standard_normal((b, bundle.embed_dim)).astype(np.float32)
        embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
        same = sum([h.tokens for h in x] == [h.tokens for h in y] for x, y in
                   zip(beam_search(graphed, embeds, 10, trie=trie), beam_search(plain, embeds, 10, trie=trie)))
        t_graph = measure(lambda: beam_search(graphed, embeds, 10, trie=trie), reps=reps)["p50_ms"]
        t_plain = measure(lambda: beam_search(plain, embeds, 10, trie=trie), reps=reps)["p50_ms"]
        out[b] = {"graphs_all_rows_ms": t_graph, "plain_dropping_ms": t_plain, "same_beams": same}
        log(f"decoder {precision} batch {b}: {_how(graphed)} {t_graph:.2f} ms; {_how(plain)} {t_plain:.2f} ms "
            f"({t_graph / t_plain:.2f}x); same beam lists {same}/{b}")
    # after the runs: a capture that failed at run time turns the graphs off (then both ran plainly)
    out.update(graphs=graphed.cuda_graphs, graph_error=graphed.cuda_graph_error,
               drops_rows={"graphs": graphed.drops_finished_rows, "plain": plain.drops_finished_rows})
    return out


def _how(session) -> str:
    """What a decoder session really did (on the CPU neither side has graphs, both drop rows)."""
    return (f"{'CUDA graphs' if session.cuda_graphs else 'plain runs'}, "
            f"{'unfinished rows only' if session.drops_finished_rows else 'every row'}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--config", default="paper")
    ap.add_argument("--backend", default="ort-cuda")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,32,256")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workdir", default="/tmp/novic_bench")
    ap.add_argument("--precisions", default="fp16,fp32")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": gpu_name(), "python": sys.version.split()[0], "args": vars(args)}

    def save():
        (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))

    from novic.bench.compare import compare
    from novic.bench.setup import CONFIGS, build

    t0 = time.perf_counter()
    paths = build(CONFIGS[args.config], Path(args.workdir) / args.config)
    results["setup_s"] = time.perf_counter() - t0
    log(f"setup (random weights + export) {results['setup_s']:.0f} s")
    save()
    try:
        results["tokens"] = tokens_agree(paths["bundle"], paths["checkpoint"], args.backend, args.n)
    except Exception:
        results["tokens_error"] = traceback.format_exc()
        log(results["tokens_error"])
    save()
    try:
        results["encoder_graphs"] = encoder_graphs_ab(paths["bundle"], args.backend, args.precisions.split(","))
    except Exception:
        results["encoder_graphs_error"] = traceback.format_exc()
        log(results["encoder_graphs_error"])
    save()
    try:
        results["decoder_rows"] = decoder_rows_ab(paths["bundle"], args.backend, args.precisions.split(",")[0],
                                                  reps=max(3, args.reps // 2))
    except Exception:
        results["decoder_rows_error"] = traceback.format_exc()
        log(results["decoder_rows_error"])
    save()
    batches = [int(b) for b in args.batches.split(",")]
    baseline = None
    for precision in args.precisions.split(","):
        try:
            r = compare(args.config, args.workdir, backend=args.backend, device=args.device,
                        precision=precision, batches=batches, reps=args.reps, budget_s=20,
                        baseline=baseline)
            baseline = r["baseline"]
            results[f"bench_{precision}"] = r
            log(f"benchmark {args.config} {args.backend} {precision}:\n{r['markdown']}")
        except Exception:
            results[f"bench_{precision}_error"] = traceback.format_exc()
            log(results[f"bench_{precision}_error"])
        save()
    try:   # a service's load: 32 client threads, single images, with and without the Batcher
        from service_batching import compare_serving
        r = compare_serving(paths["bundle"], args.backend, args.precisions.split(",")[0],
                            clients=32, requests=8, rounds=2)
        results["serving"] = {k: r[k] for k in ("ratio", "rates")}
        log(f"serving single images from 32 threads:\n{r['markdown']}")
    except Exception:
        results["serving_error"] = traceback.format_exc()
        log(results["serving_error"])
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
