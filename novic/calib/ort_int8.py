"""onnxruntime-CPU INT8 variants of an ONNX graph (image encoder, decoder step).

Two methods, both from ``onnxruntime.quantization``:
- ``dynamic``: ``quantize_dynamic`` on MatMul only, int8 weights (per-channel optional); activations
  are quantised at run time per tensor (DynamicQuantizeLinear + MatMulInteger). No calibration
  data. Usually the better choice for transformers on CPU.
- ``static``: ``quantize_static`` in QDQ format, per-channel symmetric int8 weights and *symmetric*
  int8 activations (zero point 0: the form TensorRT's explicit quantisation accepts), MatMul + Conv,
  ranges from MinMax calibration over the calibration pixels.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from novic.errors import NovicError

METHODS = ("dynamic", "static")


class QuantError(NovicError):
    """Quantisation could not run (missing onnxruntime.quantization, bad graph)."""


def _quant():
    try:
        from onnxruntime import quantization as q
    except ImportError as exc:  # pragma: no cover - onnxruntime without the quantization extras
        raise QuantError(f"onnxruntime.quantization is unavailable ({exc}); pip install onnxruntime onnx") from None
    return q


@contextlib.contextmanager
def _without_preprocess_advice():
    """Hide _skip_preprocess_advice's lines for the duration only (not from the caller's logs after)."""
    root = logging.getLogger()
    root.addFilter(_skip_preprocess_advice)
    try:
        yield
    finally:
        root.removeFilter(_skip_preprocess_advice)


def _skip_preprocess_advice(record: logging.LogRecord) -> bool:
    """onnxruntime's quantizers log "Please consider to run pre-processing before quantization" on
    every call; our graphs come straight from the exporter (shapes inferred), so it is only noise."""
    return not str(record.msg).startswith("Please consider to run pre-processing")


class PixelReader:
    """CalibrationDataReader over preprocessed pixels f32[N,3,H,W], in batches."""

    def __init__(self, pixels: np.ndarray, input_name: str = "pixels", batch: int = 8, progress=None):
        self.pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        self.input_name, self.batch, self.progress = input_name, max(1, int(batch)), progress
        self._i = 0

    def get_next(self):
        if self._i >= len(self.pixels):
            return None
        chunk = self.pixels[self._i:self._i + self.batch]
        self._i += len(chunk)
        if self.progress is not None:
            self.progress(len(chunk))
        return {self.input_name: chunk}

    def rewind(self):
        self._i = 0


def activation_matmuls(src) -> list[str]:
    """Names of MatMul nodes without a constant (initializer) input: attention's Q.K^T and P.V."""
    import onnx

    m = onnx.load(str(src), load_external_data=False)
    consts = {i.name for i in m.graph.initializer}
    consts |= {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def quantize_dynamic_int8(src, dst, *, per_channel: bool = True, op_types=("MatMul",),
                          weight_matmuls_only: bool = False, external_data: bool = False) -> dict:
    """Per-channel weights are what keeps accuracy (ViT-B-16-SigLIP, random weights: embedding cosine
    0.9996 per channel vs 0.98 per tensor). `weight_matmuls_only` also excludes attention's
    activation x activation MatMuls by name (measured: no change with onnxruntime 1.32)."""
    q = _quant()
    t0 = time.perf_counter()
    exclude = activation_matmuls(src) if weight_matmuls_only else []
    with _without_preprocess_advice():
        q.quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
                           reduce_range=False, weight_type=q.QuantType.QInt8, nodes_to_exclude=exclude,
                           use_external_data_format=external_data)
    return {"method": "dynamic", "op_types": list(op_types), "per_channel": per_channel, "weight_type": "int8",
            "excluded_activation_matmuls": len(exclude), "seconds": round(time.perf_counter() - t0, 2)}


def quantize_static_int8(src, dst, calib_pixels: np.ndarray, *, input_name: str = "pixels",
                         op_types=("MatMul", "Conv"), batch: int = 8, progress=None,
                         external_data: bool = False) -> dict:
    q = _quant()
    t0 = time.perf_counter()
    reader = PixelReader(calib_pixels, input_name, batch, progress)
    with _without_preprocess_advice():
        q.quantize_static(str(src), str(dst), reader, quant_format=q.QuantFormat.QDQ,
                          op_types_to_quantize=list(op_types), per_channel=True, reduce_range=False,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax,
                          extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                          use_external_data_format=external_data)
    return {"method": "static", "format": "QDQ", "op_types": list(op_types), "per_channel": True,
            "activations": "int8 symmetric (zero point 0)", "weights": "int8 symmetric per channel",
            "calibration": f"MinMax over {len(calib_pixels)} images",
            "seconds": round(time.perf_counter() - t0, 2)}


def quantize_encoder(src, dst, method: str, calib_pixels: np.ndarray | None = None, progress=None,
                     external_data: bool = False) -> dict:
    """Write the INT8 variant of the encoder graph `src` to `dst`; returns how it was made.
    external_data: `src` keeps its weights in side files (> 1 GiB); the calibration graphs and the
    result are then written that way too (novic.calib.weights tidies the result's files)."""
    if method == "dynamic":
        return quantize_dynamic_int8(src, dst, external_data=external_data)
    if method == "static":
        if calib_pixels is None or not len(calib_pixels):
            raise QuantError("static quantisation needs calibration images")
        return quantize_static_int8(src, dst, calib_pixels, progress=progress, external_data=external_data)
    raise QuantError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def time_session(path, feeds: dict, *, threads: int | None = None, repeat: int = 10, warmup: int = 2) -> dict:
    """Median / min latency (ms) of one onnxruntime CPU session on fixed inputs."""
    from novic.runtime.backends.ort import make_session

    sess = make_session(Path(path), "cpu", threads=threads)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "repeat": repeat}
