"""TensorRT-style INT8 / FP8 Q/DQ graphs through NVIDIA ModelOpt's ONNX PTQ, run out of process.

ModelOpt (``nvidia-modelopt[onnx]``) pins onnx/onnxruntime-gpu versions that break this
environment, so it lives in its own virtual environment and is called as
``<python> -m modelopt.onnx.quantization`` (calibration on the CPU: ``--calibration_eps cpu``).
The input graph is copied first (ModelOpt rewrites its input in place). The result has symmetric Q/DQ pairs (zero point 0) as TensorRT's explicit quantisation requires;
onnxruntime-CPU can run it too (FP8 emulated), which is how the gates check it here.

Create that environment with ``bash scripts/modelopt-venv.sh DIR`` (nvidia-modelopt and its ONNX
dependencies installed without their CUDA extras; torch, which ``modelopt.onnx`` imports, is
borrowed from the interpreter that runs the script), then pass ``--modelopt-python DIR/bin/python``
to ``novic-export calib`` or set ``NOVIC_MODELOPT_PYTHON``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from novic.calib.weights import external_files, one_weight_file
from novic.errors import NovicError

MODES = ("int8", "fp8")
ENV = "NOVIC_MODELOPT_PYTHON"
SETUP = "bash scripts/modelopt-venv.sh DIR, then pass --modelopt-python DIR/bin/python"


class ModelOptError(NovicError):
    """ModelOpt is missing or failed."""


def modelopt_python(python: str | None = None) -> str:
    """The interpreter that runs ModelOpt: `python`, else $NOVIC_MODELOPT_PYTHON; checked to exist and
    to import modelopt.onnx.quantization (one short subprocess), so a bad setup fails before any work."""
    python = python or os.environ.get(ENV)
    if not python:
        raise ModelOptError(f"ModelOpt runs in its own venv and none was given: create one with {SETUP} "
                            f"(or set {ENV})")
    try:
        proc = subprocess.run([python, "-c", "import modelopt.onnx.quantization, modelopt; print(modelopt.__version__)"],
                              capture_output=True, text=True, timeout=300)
    except (FileNotFoundError, PermissionError):
        raise ModelOptError(f"{python}: interpreter not found; create a ModelOpt venv with {SETUP}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelOptError(f"{python} cannot import modelopt.onnx.quantization ({last}); create a ModelOpt venv "
                            f"with {SETUP}")
    return python


def modelopt_quantize(src, dst, mode: str, calib_pixels: np.ndarray, *, python: str,
                      method: str | None = None, op_types=None, timeout: float = 1800) -> dict:
    """Run ModelOpt's ONNX PTQ in the interpreter `python` (a venv with nvidia-modelopt[onnx]).
    `op_types`: restrict quantisation to these ONNX ops (e.g. ("MatMul", "Conv", "Gemm")); None =
    ModelOpt's default (which also puts Q/DQ in front of LayerNormalization and Add).
    `method`: ModelOpt's calibration method ("max", "entropy"); None = its default (entropy)."""
    if mode not in MODES:
        raise ModelOptError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    dst = Path(dst)
    # ModelOpt rewrites its input file in place (and leaves files next to it): work on a copy
    work = Path(tempfile.mkdtemp(prefix="novic-modelopt-", dir=dst.parent))
    model = work / Path(src).name
    shutil.copyfile(src, model)
    weights = external_files(src)        # > 1 GiB towers: their weight files go along
    for f in weights:
        shutil.copyfile(f, work / f.relative_to(Path(src).parent.resolve()))
    npy = work / "calib.npy"
    np.save(npy, np.ascontiguousarray(calib_pixels, dtype=np.float32))
    cmd = [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(model), "--quantize_mode", mode,
           "--calibration_data_path", str(npy), "--calibration_eps", "cpu",
           "--high_precision_dtype", "fp32", "--output_path", str(work / dst.name)]
    if weights:
        cmd += ["--use_external_data_format"]
    if method:
        cmd += ["--calibration_method", method]
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
        for f in one_weight_file(work / dst.name):   # <dst name>.data, next to dst
            os.replace(f, dst.parent / f.name)
        os.replace(work / dst.name, dst)   # (intermediate files stay in `work` and go with it)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": f"modelopt-{mode}", "calibration_method": method or "entropy (ModelOpt's default)",
            "op_types": list(op_types or []),
            "format": "QDQ (symmetric, zero point 0)",
            "calibration": f"{len(calib_pixels)} images", "seconds": round(time.perf_counter() - t0, 2)}
