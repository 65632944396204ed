"""ModelOpt INT8/FP8 Q/DQ of the paper encoder (random weights), checked with onnxruntime-CPU:
embedding cosine vs fp32 on held-out images, CPU latency (batch 1) next to fp32.

    nice -n 10 python bench/calib_modelopt.py .modelopt-venv/bin/python [int8,fp8] [MatMul,Conv,Gemm|-] [max|entropy]
"""
import json, os, sys, time
from pathlib import Path

import numpy as np

from novic.calib.data import calibration_set
from novic.calib.gates import cosine
from novic.calib.modelopt import modelopt_quantize
from novic.runtime.backends.ort import OrtImageEncoder
from novic.runtime.bundle import Bundle

python = sys.argv[1]
modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["int8", "fp8"]
op_types = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] != "-" else None   # e.g. MatMul,Conv,Gemm
method = sys.argv[4] if len(sys.argv) > 4 else None   # None: ModelOpt's default (entropy)
out = Path("/tmp/calib_bench"); out.mkdir(exist_ok=True)
b = Bundle.open(str(Path.home() / ".cache/novic/bench/paper/bundle"), verify=False)
src = b.artifact_path("image_encoder", "fp32")
d = calibration_set(b.preprocess, None, n_calib=32, n_heldout=16)
e32 = OrtImageEncoder(src, threads=2)
ref = e32(d.heldout)
rep = {"load_before": os.getloadavg(), "calib_images": 32, "heldout": 16}
rep["op_types"], rep["calibration_method"] = op_types, method or "entropy (default)"
for mode in modes:
    dst = out / f"image_encoder.modelopt.{mode}.onnx"
    info = modelopt_quantize(src, dst, mode, d.calib, python=python, op_types=op_types, method=method)
    e = OrtImageEncoder(dst, threads=2)
    c = cosine(ref, e(d.heldout))
    x = np.ascontiguousarray(d.heldout[:1]); t = {"fp32": [], mode: []}
    for _ in range(4):
        for k, enc in (("fp32", e32), (mode, e)):
            t0 = time.perf_counter(); enc(x); t[k].append((time.perf_counter() - t0) * 1e3)
    rep[mode] = {"quantize_seconds": info["seconds"], "cos_mean": round(float(c.mean()), 6),
                 "cos_min": round(float(c.min()), 6),
                 "ort_cpu_b1_ms": {k: round(float(np.median(v)), 1) for k, v in t.items()}}
    print(json.dumps({mode: rep[mode]}), flush=True)
rep["load_after"] = os.getloadavg()
print(json.dumps(rep, indent=1))
