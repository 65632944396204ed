"""INT8 vs fp32 on the CPU (onnxruntime): image encoder (dynamic and static QDQ, gated) and the
decoder step (dynamic int8), for a benchmark configuration (random weights).

    nice -n 10 python bench/calib_int8.py --config paper [--threads 2] [--out /tmp/calib_bench]

Quantised graphs are written to --out (the benchmark bundle is only read). Prints one JSON
object; results go to docs/benchmarks.md "Quantisation".
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _load():
    try:
        return os.getloadavg()
    except OSError:
        return None


def encoder_bench(bundle, out: Path, threads, methods, n, n_heldout, repeat):
    from novic.calib.data import calibration_set
    from novic.calib.gates import run_gates, top1_labels
    from novic.calib.ort_int8 import quantize_encoder, time_session
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.classifier import Classifier

    src = bundle.artifact_path("image_encoder", "fp32")
    data = calibration_set(bundle.preprocess, None, n_calib=n, n_heldout=n_heldout)
    ref = OrtImageEncoder(src, threads=threads)
    ref_emb = np.concatenate([ref(data.heldout[i:i + 8]) for i in range(0, len(data.heldout), 8)])
    del ref
    clf = Classifier.load(bundle, backend="ort-cpu", precision="fp32", threads=threads)
    ref_labels = top1_labels(clf, ref_emb)
    res = {"data": data.summary(), "fp32": {"size_mb": round(src.stat().st_size / 2**20, 1)}}
    feeds = {b: {"pixels": np.ascontiguousarray(data.heldout[:b])} for b in (1, 8)}
    for b in feeds:
        res["fp32"][f"b{b}"] = time_session(src, feeds[b], threads=threads, repeat=repeat)
    for method in methods:
        dst = out / f"image_encoder.int8.{method}.onnx"
        info = quantize_encoder(src, dst, method, data.calib)
        enc = OrtImageEncoder(dst, threads=threads)
        emb = np.concatenate([enc(data.heldout[i:i + 8]) for i in range(0, len(data.heldout), 8)])
        del enc
        gates = run_gates(ref_emb, emb, classifier=clf, names=data.heldout_names, ref_labels=ref_labels)
        r = {"quantize_seconds": info["seconds"], "size_mb": round(dst.stat().st_size / 2**20, 1),
             "gates": gates.to_dict(), "summary": gates.summary()}
        for b in feeds:
            r[f"b{b}"] = time_session(dst, feeds[b], threads=threads, repeat=repeat)
            r[f"speedup_b{b}"] = round(res["fp32"][f"b{b}"]["median_ms"] / r[f"b{b}"]["median_ms"], 2)
        res[method] = r
        print(json.dumps({method: r}), flush=True)
    clf.close()
    return res


def decoder_bench(bundle, out: Path, threads, repeat, rows=(10, 80)):
    from novic.calib.ort_int8 import quantize_dynamic_int8, time_session

    cfg = bundle.decoder_config
    src = bundle.artifact_path("decoder_step", "fp32")
    dst = out / "decoder_step.int8.dynamic.onnx"
    info = quantize_dynamic_int8(src, dst)
    G = int(bundle.search_defaults.get("guided_max_cands") or 1)
    hd = cfg.width // cfg.heads
    rng = np.random.default_rng(0)
    res = {"quantize_seconds": info["seconds"]}
    from novic.runtime.backends.ort import make_session
    for n in rows:
        feeds = {"tokens": rng.integers(1, cfg.vocab_size, n).astype(np.int64),
                 "position": np.array([cfg.prefix_len + 1], np.int64),
                 "beam_idx": np.arange(n, dtype=np.int64),
                 "kv_cache": (rng.standard_normal((cfg.layers, 2, n, cfg.heads, cfg.seq_len, hd)) * 0.5).astype(np.float32),
                 "temperature": np.ones(1, np.float32),
                 "cand_ids": rng.integers(0, cfg.vocab_size, (n, G)).astype(np.int64)}
        a = time_session(src, feeds, threads=threads, repeat=repeat)
        b = time_session(dst, feeds, threads=threads, repeat=repeat)
        s32, s8 = make_session(src, threads=threads), make_session(dst, threads=threads)
        o32, o8 = s32.run(None, feeds), s8.run(None, feeds)
        names = [o.name for o in s32.get_outputs()]
        ids32, ids8 = o32[names.index("topk_ids")], o8[names.index("topk_ids")]
        res[f"rows{n}"] = {"fp32": a, "int8": b, "speedup": round(a["median_ms"] / b["median_ms"], 2),
                           "top1_same": float(np.mean(ids32[:, 0] == ids8[:, 0]))}
        print(json.dumps({f"decoder rows{n}": res[f"rows{n}"]}), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/calib_bench")
    ap.add_argument("--methods", default="dynamic,static")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--skip-decoder", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    args = ap.parse_args()

    from novic.bench.setup import CONFIGS, build
    from novic.runtime.bundle import Bundle

    paths = build(CONFIGS[args.config], Path.home() / ".cache/novic/bench" / args.config)
    bundle = Bundle.open(paths["bundle"], verify=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": args.config, "threads": args.threads, "load_before": _load(), "cpus": os.cpu_count()}
    t0 = time.time()
    if not args.skip_encoder:
        report["encoder"] = encoder_bench(bundle, out, args.threads, args.methods.split(","), args.n,
                                          args.heldout, args.repeat)
    if not args.skip_decoder:
        report["decoder_step"] = decoder_bench(bundle, out, args.threads, args.repeat)
    report["load_after"] = _load()
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
