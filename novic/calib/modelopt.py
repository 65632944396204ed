"""TensorRT-style INT8 / FP8 Q/DQ graphs through NVIDIA ModelOpt's ONNX PTQ, run out of process.

ModelOpt (``nvidia-modelopt[onnx]``) pins onnx/onnxruntime-gpu versions that break this
environment, so it lives in its own virtual environment and is called as
``<python> -m modelopt.onnx.quantization`` (calibration on the CPU: ``--calibration_eps cpu``).
The input graph is copied first (ModelOpt rewrites its input in place). The result has symmetric Q/DQ pairs (zero point 0) as TensorRT's explicit quantisation requires;
onnxruntime-CPU can run it too (FP8 emulated), which is how the gates check it here.

Setting up such an environment (as done for the numbers in docs/benchmarks.md), without pulling
CUDA torch, cupy and onnxruntime-gpu:
    python3 -m venv /tmp/modelopt-venv && . /tmp/modelopt-venv/bin/activate
    pip install --no-deps nvidia-modelopt==0.47.0 onnx==1.21.0 onnxruntime==1.24.4 onnx_graphsurgeon \
        onnxconverter-common onnxslim onnxscript onnx-ir ml_dtypes polygraphy PuLP pydantic pydantic_core \
        annotated-types typing-inspection omegaconf PyYAML nvidia-ml-py numpy flatbuffers protobuf packaging \
        rich markdown-it-py mdurl pygments tqdm scipy regex safetensors typing_extensions sympy mpmath ninja \
        lief cppimport pybind11 Mako coloredlogs humanfriendly
    # + torch importable (modelopt.onnx imports it): a .pth pointing at an existing torch install
Not wired into the bundle yet: the manifest has one ``image_encoder``/``int8`` slot (used by the
onnxruntime-CPU variant) and no ``fp8`` precision; see the calib report in issue 8.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from novic.errors import NovicError

MODES = ("int8", "fp8")


class ModelOptError(NovicError):
    """ModelOpt is missing or failed."""


def modelopt_quantize(src, dst, mode: str, calib_pixels: np.ndarray, *, python: str,
                      method: str = "max", op_types=None, timeout: float = 1800) -> dict:
    """Run ModelOpt's ONNX PTQ in the interpreter `python` (a venv with nvidia-modelopt[onnx]).
    `op_types`: restrict quantisation to these ONNX ops (e.g. ("MatMul", "Conv", "Gemm")); None =
    ModelOpt's default (which also puts Q/DQ in front of LayerNormalization and Add)."""
    if mode not in MODES:
        raise ModelOptError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    dst = Path(dst)
    # ModelOpt rewrites its input file in place (and leaves files next to it): work on a copy
    work = Path(tempfile.mkdtemp(prefix="novic-modelopt-", dir=dst.parent))
    model = work / Path(src).name
    shutil.copyfile(src, model)
    npy = work / "calib.npy"
    np.save(npy, np.ascontiguousarray(calib_pixels, dtype=np.float32))
    cmd = [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(model), "--quantize_mode", mode,
           "--calibration_data_path", str(npy), "--calibration_method", method, "--calibration_eps", "cpu",
           "--high_precision_dtype", "fp32", "--output_path", str(work / dst.name)]
    if op_types:
        cmd += ["--op_types_to_quantize", *op_types]
    t0 = time.perf_counter()
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise ModelOptError(f"{python}: interpreter not found; point it at a venv with nvidia-modelopt[onnx] "
                                f"(see novic/calib/modelopt.py)") from None
        if proc.returncode != 0 or not (work / dst.name).is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelOptError(f"ModelOpt {mode} quantisation of {Path(src).name} failed: {tail[0]}")
        os.replace(work / dst.name, dst)   # (intermediate files stay in `work` and go with it)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": f"modelopt-{mode}", "calibration_method": method, "op_types": list(op_types or []),
            "format": "QDQ (symmetric, zero point 0)",
            "calibration": f"{len(calib_pixels)} images", "seconds": round(time.perf_counter() - t0, 2)}
