"""GPU check in one run: GPU tokens vs the CPU oracle, then benchmarks against the original-style
pipeline and the PyTorch peer (novic.bench.peer) on the same GPU. Each section saves its JSON to
--out before the next starts; at the end one summary table (summary.md): per-phase times at
batch 1, host work per decoder call, throughput from pixels / decoded photos / JPEG bytes, the
ratios to the peer and to the original-style pipeline, GPU memory, and the GPU's name.

  python bench/gpu_check.py --out DIR [--config paper] [--backend ort-cuda] [--device cuda]
  python bench/gpu_check.py --cpu-smoke --out DIR    # every section, tiny config, on the CPU

--cpu-smoke rehearses the whole script here before a GPU session (tests/test_gpu_check.py runs it).
"""
from __future__ import annotations

import argparse
import json
import os
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


def u8_encoder_ab(bundle_dir: str, backend: str, precisions, batches=(1, 8, 32, 256), reps: int = 10) -> dict:
    """Host preprocessing + image encoder, the float path (normalised to f32 [B,3,H,W] on the host)
    vs the uint8 path (u8 [B,H,W,3], normalised in the graph: novic.export.u8), for the encoder
    `backend` loads (fused where the bundle has it), interleaved run by run in one process: median
    ms per batch of decoded photos, and the largest difference of the embeddings."""
    from novic.bench.measure import sample_images
    from novic.bench.timing import interleaved
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.bundle import U8_PIXELS, Bundle
    from novic.runtime.preprocess import Preprocessor

    provider = "cuda" if backend == "ort-cuda" else "cpu"
    bundle = Bundle.open(bundle_dir)
    pre = {"float": Preprocessor(bundle.preprocess_config), "uint8": Preprocessor(bundle.preprocess_config, uint8=True)}
    photos = sample_images(max(batches))
    out = {}
    for precision in precisions:
        variant = "fused" if bundle.has_u8(precision, "fused") else "plain"
        if not bundle.has_u8(precision, variant):
            out[precision] = {"error": f"no {precision} uint8 encoder in the bundle"}
            continue
        enc = {"float": OrtImageEncoder(bundle.artifact_path("image_encoder", precision, variant), provider=provider),
               "uint8": OrtImageEncoder(bundle.artifact_path("image_encoder", precision, variant, U8_PIXELS),
                                        provider=provider)}
        rows = {"variant": variant}
        for b in batches:
            run = {k: (lambda k=k: enc[k](pre[k].load_batch(photos[:b])[0])) for k in enc}
            diff = float(np.abs(run["float"]() - run["uint8"]()).max())
            t = interleaved(run, reps)
            rows[b] = {"float_ms": t["float"], "uint8_ms": t["uint8"], "max_abs_diff": diff}
            log(f"preprocess + encoder {precision} {variant} batch {b}: float {t['float']:.2f} ms, uint8 "
                f"{t['uint8']:.2f} ms ({t['float'] / t['uint8']:.2f}x), max |diff| {diff:.1e}")
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


def jpeg_decoders_ab(bundle_dir: str, device: str, n: int = 256, reps: int = 5) -> dict:
    """Decoding + preprocessing n JPEG files in memory: nvImageCodec (novic.runtime.nvjpeg, on
    `device`) against Pillow, img/s each, and how far the preprocessed pixels are apart."""
    from novic.bench.measure import jpeg_bytes, sample_images
    from novic.bench.timing import measure
    from novic.runtime.bundle import Bundle
    from novic.runtime.nvjpeg import jpeg_decoder
    from novic.runtime.preprocess import Preprocessor

    from novic.runtime.nvjpeg import JpegDecoderError

    try:
        decoder = jpeg_decoder("nvimgcodec", device)
    except JpegDecoderError as exc:
        log(f"JPEG decoders: {exc}")
        return {"skipped": str(exc)}
    config = Bundle.open(bundle_dir).preprocess_config
    jpegs = jpeg_bytes(sample_images(n))
    sides = {"pillow": Preprocessor(config), "nvimgcodec": Preprocessor(config, jpeg_decoder=decoder)}
    (want, _), (got, errors) = (side.load_batch(jpegs) for side in sides.values())
    diff = np.abs(got - want)
    out = {"n": n, "device": device, "failed": sum(e is not None for e in errors),
           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    for name, side in sides.items():
        out[f"{name}_img_per_s"] = n / (measure(lambda: side.load_batch(jpegs), reps=reps)["p50_ms"] / 1e3)
    log(f"JPEG decode + preprocess of {n} images: nvImageCodec ({device}) {out['nvimgcodec_img_per_s']:.0f} img/s, "
        f"Pillow {out['pillow_img_per_s']:.0f} img/s; pixels max |diff| {out['max_abs_diff']:.3f}, "
        f"mean {out['mean_abs_diff']:.4f}")
    return out


def _how(session) -> str:
    """What a decoder session really did (on the CPU neither side has graphs, both drop rows)."""
    return (f"{'CUDA graphs' if session.cuda_graphs else 'plain runs'}, "
            f"{'unfinished rows only' if session.drops_finished_rows else 'every row'}")


SECTIONS = ("tokens", "encoder_graphs", "u8_encoder", "decoder_rows", "jpeg", "bench", "peer", "serving")
SMOKE = dict(config="tiny", backend="ort-cpu", device="cpu", batches="1,2", peer_batches="1,2", reps=2, n=6,
             precisions="fp32", peer_compile="none", serving="4,2,1")


def peer_side(paths: dict, device: str, batches, reps: int, compile_mode: str | None, timeout: float = 300) -> dict:
    """The PyTorch peer in its own process; compiled first, eager if compiling fails or takes more
    than `timeout` seconds (recorded)."""
    import subprocess

    from novic.bench.compare import run_side

    args = dict(checkpoint=paths["checkpoint"], bundle=paths["bundle"], device=device, batches=list(batches),
                reps=reps, budget_s=20)
    try:
        return run_side("peer", {**args, "compile_mode": compile_mode}, timeout=timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        if compile_mode is None:
            raise
        log(f"peer with torch.compile({compile_mode!r}) failed; eager instead:\n{str(exc)[-1500:]}")
        return {**run_side("peer", {**args, "compile_mode": None}), "compile_error": str(exc)[-1500:]}


def _ms(side: dict | None, key: str) -> str:
    return f"{side[key]['p50_ms']:.2f} ms" if side and key in side else "-"


def _rate(side: dict | None, key: str, b: str) -> str:
    return f"{side[key][b]['img_per_s']:.0f} img/s" if side and b in side.get(key, {}) else "-"


def _ratio(ours: dict | None, other: dict | None, key: str, b: str | None = None) -> str:
    """other's time / ours (> 1: novic faster); for throughput ours / other's rate."""
    try:
        if b is None:
            return f"{other[key]['p50_ms'] / ours[key]['p50_ms']:.2f}x"
        return f"{ours[key][b]['img_per_s'] / other[key][b]['img_per_s']:.2f}x"
    except (KeyError, TypeError, ZeroDivisionError):
        return "-"


def summary(results: dict) -> str:
    """The one table of a run (markdown)."""
    precisions = results["args"]["precisions"].split(",")
    bench = next((results[f"bench_{p}"] for p in precisions if f"bench_{p}" in results), None)
    ours, base = (bench["ours"], bench["baseline"]) if bench else (None, None)
    peer = results.get("peer")
    label = f"novic ({ours['backend']}, {ours['precision']})" if ours else "novic"
    peer_label = f"PyTorch peer ({peer['dtype']}, compile {peer['compile_mode']})" if peer else "PyTorch peer"
    lines = [f"GPU: {results['machine']}", "",
             f"| measurement | {label} | {peer_label} | original-style | novic vs peer | novic vs original |",
             "|---|---|---|---|---|---|"]
    tokens = results.get("tokens", {})
    for p in precisions:
        t = tokens.get(p)
        if t and "n" in t:
            lines.append(f"| tokens vs ort-cpu fp32, {p} (beam lists / top-1 / greedy equal) | "
                         f"{t['beam_all_equal']}/{t['n']} / {t['beam_top1_equal']}/{t['n']} / {t['greedy_equal']}/{t['n']} | | | | |")
        elif t:
            lines.append(f"| tokens, {p} | {t.get('error')} | | | | |")
    if "cpu_vs_oracle_equal" in tokens:
        lines.append(f"| ort-cpu fp32 vs the PyTorch oracle (beam lists equal) | "
                     f"{tokens['cpu_vs_oracle_equal']}/{tokens['oracle_n']} | | | | |")
    for key, what in (("single", "one image, photo to labels, p50"), ("encoder", "encoder, 1 image, p50"),
                      ("decoder", "decoder (beam 10 guided), 1 image, p50")):
        lines.append(f"| {what} | {_ms(ours, key)} | {_ms(peer, key)} | {_ms(base, key)} | "
                     f"{_ratio(ours, peer, key)} | {_ratio(ours, base, key)} |")
    if ours and "phases" in ours:
        from novic.bench.compare import phase_cell
        lines.append(f"| one image by phase (medians) | {phase_cell(ours['phases'])} | | | | |")
    if ours and "host_per_call" in ours:
        h = ours["host_per_call"]
        lines.append(f"| host work per decoder call, 1 image | {h['host_us']:.0f} us (search {h['search_us']:.0f}, "
                     f"session {h['session_us']:.0f}; onnxruntime {h['ort_us']:.0f} us; {h['calls']:.0f} calls) | | | | |")
    batches = results["args"]["batches"].split(",")
    for b in batches:
        lines.append(f"| throughput {b}, from pixels | {_rate(ours, 'throughput_pixels', b)} | "
                     f"{_rate(peer, 'throughput', b)} | | "
                     + (_ratio({"t": ours["throughput_pixels"]}, {"t": peer["throughput"]}, "t", b)
                        if ours and peer and "throughput_pixels" in ours else "-") + " | |")
    for b in batches:
        lines.append(f"| throughput {b}, from decoded photos | {_rate(ours, 'throughput', b)} | | "
                     f"{_rate(base, 'throughput', b)} | | {_ratio(ours, base, 'throughput', b)} |")
    for b in batches:
        lines.append(f"| throughput {b}, from JPEG bytes (2 batches) | {_rate(ours, 'throughput_jpeg', b)} | | | | |")
    jpeg = results.get("jpeg")
    if jpeg and "skipped" in jpeg:
        lines.append(f"| JPEG decode with nvImageCodec | not measured: {jpeg['skipped']} | | | | |")
    elif jpeg:
        lines.append(f"| JPEG decode + preprocess, {jpeg['n']} images (nvImageCodec on {jpeg['device']} / Pillow) | "
                     f"{jpeg['nvimgcodec_img_per_s']:.0f} / {jpeg['pillow_img_per_s']:.0f} img/s, pixels max abs diff "
                     f"{jpeg['max_abs_diff']:.3f} | | | | |")

    def mem(side, key):
        return f"{side[key]:.0f} MB" if side and side.get(key) is not None else "-"
    lines.append(f"| GPU memory (novic: nvidia-smi of its process; torch: peak allocated) | {mem(ours, 'gpu_mb')} | "
                 f"{mem(peer, 'peak_gpu_mb')} | {mem(base, 'peak_gpu_mb')} | | |")
    lines.append(f"| peak host memory (RSS) | {mem(ours, 'peak_rss_mb')} | {mem(peer, 'peak_rss_mb')} | "
                 f"{mem(base, 'peak_rss_mb')} | | |")
    if ours:
        graphs = [f"decoder {'on' if ours.get('cuda_graphs') else 'off'}", f"encoder {'on' if ours.get('encoder_cuda_graphs') else 'off'}"]
        lines.append(f"| CUDA graphs | {', '.join(graphs)} | | | | |")
    if ours and peer:
        same = sum(a == b for a, b in zip(ours["labels"], peer["labels"]))
        lines.append(f"| top-1 labels equal on the photos | | {same}/{min(len(ours['labels']), len(peer['labels']))} "
                     f"equal to novic's | | | |")
    if peer and peer.get("cudagraph_skips"):
        lines.append(f"| peer: compiled calls without CUDA graphs | | {peer['cudagraph_skips']} (see the log) | | | |")
    if peer and peer.get("compile_error"):
        lines.append(f"| peer compile error | | {peer['compile_error'].splitlines()[-1][:200]} | | | |")
    for p, rows in (results.get("u8_encoder") or {}).items():
        if "error" in rows:
            lines.append(f"| preprocess + encoder, uint8 vs float input, {p} | {rows['error']} | | | | |")
            continue
        cells = ", ".join(f"{b}: {r['float_ms']:.1f} / {r['uint8_ms']:.1f} ms ({r['float_ms'] / r['uint8_ms']:.2f}x)"
                          for b, r in rows.items() if b != "variant")
        lines.append(f"| preprocess + encoder {p} {rows['variant']}, float / uint8 input, by batch | {cells} | | | | |")
    failed = sorted(k[:-len("_error")] for k in results if k.endswith("_error"))
    if failed:
        lines.append(f"\nSections that failed (traceback in gpu_check.json): {', '.join(failed)}")
    return "\n".join(lines)


def main(argv=None) -> int:
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
    ap.add_argument("--peer-batches", default="1,256",
                    help="batch sizes of the peer (each compiles its own graphs: minutes on a GPU machine)")
    ap.add_argument("--peer-timeout", type=float, default=300, help="seconds for the compiled peer, else eager")
    ap.add_argument("--serving", default="32,8,2", help="serving section: clients,requests,rounds")
    ap.add_argument("--peer-compile", default="reduce-overhead",
                    help="torch.compile mode of the peer's decoder, or 'none' (eager)")
    ap.add_argument("--skip", default="", help=f"sections to leave out, comma-separated: {','.join(SECTIONS)}")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="rehearse every section on the CPU: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        os.environ.setdefault("NOVIC_BENCH_THREADS", "1")   # torch sides: no thread contention on a small CPU
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        ap.error(f"--skip: unknown sections {sorted(skip - set(SECTIONS))}; use {','.join(SECTIONS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": gpu_name(), "python": sys.version.split()[0], "args": vars(args)}

    def save():   # after every section: a run cut short by the device's time limit keeps its table
        (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        try:
            table = summary(results)
        except Exception:  # noqa: BLE001 - the JSON above is what counts; say why the table is missing
            table = f"summary failed:\n{traceback.format_exc()}"
        (out_dir / "summary.md").write_text(table + "\n")

    def section(name: str, fn, group: str | None = None):
        """Run one section (unless its group is skipped), keep its result or its traceback, save."""
        if (group or name) in skip:
            return
        try:
            results[name] = fn()
        except Exception:
            results[f"{name}_error"] = traceback.format_exc()
            log(results[f"{name}_error"])
        save()

    from novic.bench.compare import compare
    from novic.bench.setup import CONFIGS, build

    t0 = time.perf_counter()
    paths = build(CONFIGS[args.config], Path(args.workdir) / args.config)
    results["setup_s"] = time.perf_counter() - t0
    log(f"setup (random weights + export) {results['setup_s']:.0f} s")
    save()
    precisions = args.precisions.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    # Most telling first (a run cut short keeps them): tokens, novic vs the original-style pipeline
    # and vs the PyTorch peer in the first precision; then the A/B details and the other precisions.
    def details():
        compile_mode = None if args.peer_compile == "none" else args.peer_compile
        peer_batches = [int(b) for b in args.peer_batches.split(",")]
        section("peer", lambda: peer_side(paths, args.device, peer_batches, args.reps, compile_mode,
                                          args.peer_timeout))
        section("jpeg", lambda: jpeg_decoders_ab(paths["bundle"], "cuda" if args.device.startswith("cuda") else "cpu",
                                                 max(batches), reps=max(3, args.reps // 4)))
        section("encoder_graphs", lambda: encoder_graphs_ab(paths["bundle"], args.backend, precisions,
                                                            [b for b in batches if b <= 32], reps=args.reps))
        section("u8_encoder", lambda: u8_encoder_ab(paths["bundle"], args.backend, precisions, batches,
                                                    reps=max(3, args.reps // 2)))
        section("decoder_rows", lambda: decoder_rows_ab(paths["bundle"], args.backend, precisions[0],
                                                        [b for b in batches if b in (1, 32, 256)] or batches,
                                                        reps=max(3, args.reps // 2)))

    section("tokens", lambda: tokens_agree(paths["bundle"], paths["checkpoint"], args.backend, args.n))
    baseline = None
    for n, precision in enumerate(precisions):
        def bench(precision=precision):
            r = compare(args.config, args.workdir, backend=args.backend, device=args.device, precision=precision,
                        batches=batches, reps=args.reps, budget_s=20, baseline=baseline)
            log(f"benchmark {args.config} {args.backend} {precision}:\n{r['markdown']}")
            return r
        section(f"bench_{precision}", bench, group="bench")
        baseline = results.get(f"bench_{precision}", {}).get("baseline", baseline)
        if n == 0:
            details()

    def serving():   # a service's load: 32 client threads, single images, with and without the Batcher
        from service_batching import compare_serving
        clients, requests, rounds = (int(v) for v in args.serving.split(","))
        r = compare_serving(paths["bundle"], args.backend, precisions[0], clients=clients, requests=requests,
                            rounds=rounds)
        log(f"serving single images from {clients} threads:\n{r['markdown']}")
        return {k: r[k] for k in ("ratio", "rates")}
    section("serving", serving)
    table = summary(results)
    (out_dir / "summary.md").write_text(table + "\n")
    log(f"summary:\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
