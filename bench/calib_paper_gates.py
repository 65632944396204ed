"""Follow-up to bench/calib_int8.py on the paper config: per-channel dynamic INT8 encoder (gates +
latency, interleaved with fp32 under the same load), the label gate's sensitivity (fp32 embeddings
with noise at a given cosine), and an INT8 decoder (prefill + step, dynamic) end to end.

    nice -n 10 python bench/calib_paper_gates.py
"""
import json, os, time
from pathlib import Path

import numpy as np

from novic.calib.data import calibration_set
from novic.calib.gates import cosine, run_gates, top1_labels
from novic.calib.ort_int8 import quantize_dynamic_int8
from novic.runtime.backends.ort import OrtDecoderSession, OrtImageEncoder
from novic.runtime.bundle import Bundle
from novic.runtime.classifier import Classifier

out = Path("/tmp/calib_bench"); out.mkdir(exist_ok=True)
b = Bundle.open(str(Path.home() / ".cache/novic/bench/paper/bundle"), verify=False)
src = b.artifact_path("image_encoder", "fp32")
d = calibration_set(b.preprocess, None, n_calib=8, n_heldout=40)
rep = {"load_before": os.getloadavg()}
dst = out / "image_encoder.int8.dynamic_pc.onnx"
rep["quant"] = quantize_dynamic_int8(src, dst)
e32, e8 = OrtImageEncoder(src, threads=2), OrtImageEncoder(dst, threads=2)
ref = np.concatenate([e32(d.heldout[i:i + 8]) for i in range(0, 40, 8)])
var = np.concatenate([e8(d.heldout[i:i + 8]) for i in range(0, 40, 8)])
clf = Classifier.load(b, backend="ort-cpu", precision="fp32", threads=2)
t0 = time.perf_counter(); ref_labels = top1_labels(clf, ref); t_dec = time.perf_counter() - t0
rep["decode_fp32_s_per_image"] = round(t_dec / 40, 3)
g = run_gates(ref, var, classifier=clf, names=d.heldout_names, ref_labels=ref_labels)
rep["dynamic_per_channel"] = g.to_dict(); print(g.summary(), flush=True)
# latency, interleaved fp32 / int8 (same load)
for bs in (1, 8):
    x = np.ascontiguousarray(d.heldout[:bs]); t = {"fp32": [], "int8": []}
    e32(x); e8(x)
    for _ in range(6):
        for k, e in (("fp32", e32), ("int8", e8)):
            t0 = time.perf_counter(); e(x); t[k].append((time.perf_counter() - t0) * 1e3)
    rep[f"b{bs}"] = {k: round(float(np.median(v)), 1) for k, v in t.items()}
    rep[f"b{bs}"]["min"] = {k: round(float(np.min(v)), 1) for k, v in t.items()}
    rep[f"b{bs}"]["ratio_median"] = round(rep[f"b{bs}"]["fp32"] / rep[f"b{bs}"]["int8"], 2)
    print(rep[f"b{bs}"], flush=True)
# sensitivity of the label gate: fp32 embeddings + noise
rng = np.random.default_rng(0)
sens = {}
for eps in (0.005, 0.01, 0.02):
    noisy = ref + eps * rng.standard_normal(ref.shape).astype(np.float32) / np.sqrt(ref.shape[1])
    labels = top1_labels(clf, noisy)
    sens[eps] = {"cos_mean": round(float(cosine(ref, noisy).mean()), 6),
                 "agreement": float(np.mean([a == c for a, c in zip(ref_labels, labels)]))}
    print(eps, sens[eps], flush=True)
rep["label_sensitivity"] = sens
# int8 decoder (dynamic, per channel), fp32 embeddings
p8, s8 = out / "decoder_prefill.int8.onnx", out / "decoder_step.int8.onnx"
quantize_dynamic_int8(b.artifact_path("decoder_prefill", "fp32"), p8)
quantize_dynamic_int8(b.artifact_path("decoder_step", "fp32"), s8)
dec8 = OrtDecoderSession(p8, s8, b.decoder_config, provider="cpu", threads=2)
fp32_dec = clf.decoder
clf.decoder = dec8
t0 = time.perf_counter(); lab8 = top1_labels(clf, ref); t8 = time.perf_counter() - t0
clf.decoder = fp32_dec
t0 = time.perf_counter(); top1_labels(clf, ref); t32 = time.perf_counter() - t0
rep["decoder_int8"] = {"agreement": float(np.mean([a == c for a, c in zip(ref_labels, lab8)])),
                       "s_per_image_fp32": round(t32 / 40, 3), "s_per_image_int8": round(t8 / 40, 3)}
print(rep["decoder_int8"], flush=True)
rep["load_after"] = os.getloadavg()
print(json.dumps(rep, indent=1))
