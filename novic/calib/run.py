"""``novic-export calib``: calibrate, quantise, gate and (only if the gates pass) add a quantised
image encoder to a bundle.

Methods and the precision slot each fills (one graph per slot):
- ``dynamic`` -> ``int8``: onnxruntime dynamic quantisation (MatMulInteger); the fastest on the
  CPU, onnxruntime only (TensorRT cannot build it).
- ``static`` -> ``int8``: onnxruntime static QDQ, symmetric (zero point 0); runs on the CPU and is
  the explicit-quantisation form TensorRT builds from.
- ``modelopt-int8`` / ``modelopt-fp8`` -> ``int8`` / ``fp8``: NVIDIA ModelOpt's ONNX PTQ (Q/DQ for
  TensorRT; FP8 needs an Ada or Hopper GPU), run in its own venv (novic.calib.modelopt).
The gates run every variant with onnxruntime on the CPU (FP8 is emulated there, slowly).

Writing is atomic at every point: the quantised graph is made in a staging directory inside the
bundle; if an older encoder of the same precision is listed, the manifest is first rewritten without
it; then the new file is renamed into place (``image_encoder.int8.onnx`` / ``image_encoder.fp8.onnx``)
and the manifest rewritten with its entry (sha256, size, role ``image_encoder``, the precision, I/O
of the fp32 graph, and how it was made and gated under ``quantization``). A crash leaves a manifest
that matches the files it lists. A variant that fails its gate is discarded; the bundle (including
an older variant) is left as it was. The decoder is not quantised (see docs/benchmarks.md
"Quantisation": it does not pay on the CPU); ``precision='int8'`` runs the int8 encoder with the fp32
decoder (TensorRT: with the fp16 decoder engines).
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from novic.calib.data import calibration_set
from novic.calib.gates import BEAM_WIDTH, MIN_AGREEMENT, MIN_MEAN_COSINE, run_gates, top1_labels
from novic.calib.modelopt import ModelOptError, modelopt_python, modelopt_quantize
from novic.calib.ort_int8 import QuantError, quantize_encoder
from novic.calib.weights import one_weight_file
from novic.errors import NovicError, option

METHOD_PRECISION = {"dynamic": "int8", "static": "int8", "modelopt-int8": "int8", "modelopt-fp8": "fp8"}
METHODS = tuple(METHOD_PRECISION)


def encoder_file(precision: str) -> str:
    return f"image_encoder.{precision}.onnx"


class CalibError(NovicError):
    """Calibration cannot proceed (bad bundle, bad arguments)."""


def add_artifact(bundle_dir, src, *, role: str, precision: str, name: str, info: dict | None = None,
                 weights=()) -> dict:
    """Move graph `src` into the bundle as `name` and list it in the manifest (atomic; see module doc).
    `weights`: its external weight file (``<name>.data``, see novic.calib.weights), moved first.

    Inputs/outputs are copied from the fp32 artifact of the same role (a quantised graph keeps
    the fp32 I/O contract). Returns the manifest entry."""
    from novic.atomic import move_file_atomic, new_file_mode
    from novic.export.bundle import file_entry, write_manifest
    from novic.runtime.bundle import MANIFEST, read_manifest

    root = Path(bundle_dir)
    manifest = read_manifest(root)
    arts = manifest["artifacts"]
    base = next((a for a in arts if a.get("role") == role and a.get("precision") == "fp32"
                 and a.get("variant", "plain") == "plain" and "pixels" not in a), None)
    if base is None:
        raise CalibError(f"{root / MANIFEST}: no fp32 {role} to derive an {precision} variant from; re-export")
    old = [a for a in arts if a.get("role") == role and a.get("precision") == precision]
    dst = root / name
    weight_names = [Path(w).name for w in weights]
    kept = {f["file"] for a in arts if a not in old for f in [a, *a.get("external_data", [])]}
    clash = sorted(kept & {name, *weight_names})
    if clash:   # e.g. weights a u8 twin reads as well: replacing them would break that graph
        raise CalibError(f"{root / MANIFEST}: {', '.join(clash)} belongs to another artifact; not overwriting it")
    if any(w != f"{name}.data" for w in weight_names):
        raise CalibError(f"{name}: its weight file must be {name}.data (got {', '.join(weight_names)})")
    if old:   # first drop the old entry, so that no manifest ever lists a file with a wrong hash
        manifest["artifacts"] = [a for a in arts if a not in old]
        write_manifest(root / MANIFEST, manifest)
    mode = new_file_mode(root)   # onnx writes external weight files 0o600 (the quantisers save through it)
    for source, target in [*zip(weights, (root / w for w in weight_names)), (src, dst)]:   # weights first
        os.chmod(source, mode)
        move_file_atomic(source, target)
    entry = {**file_entry(root, dst), "role": role, "precision": precision,
             "inputs": base.get("inputs", []), "outputs": base.get("outputs", [])}
    if weight_names:
        entry["external_data"] = [file_entry(root, root / w) for w in weight_names]
    if info:
        entry["quantization"] = info
    manifest["artifacts"].append(entry)
    write_manifest(root / MANIFEST, manifest)
    return entry


def _staged_source(bundle, stage: Path) -> Path:
    """A copy of the fp32 encoder graph (and its weight files) in the staging directory:
    onnxruntime's quantiser writes scratch files next to its input, which must not land in the
    bundle (an interrupted run would leave them there). Copies, not links: onnx refuses external
    weight files with several hard links."""
    artifact = bundle.artifact("image_encoder", "fp32")
    for ref in artifact.files():
        dst = stage / "source" / ref.file
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.path / ref.file, dst)
    return stage / "source" / artifact.file


def calibrate_bundle(bundle_dir, *, images=None, n: int = 64, n_heldout: int = 40, method: str = "dynamic",
                     seed: int = 0, min_mean_cosine: float = MIN_MEAN_COSINE,
                     min_agreement: float = MIN_AGREEMENT, beam_width: int = BEAM_WIDTH,
                     threads: int | None = None, console=None, dry_run: bool = False,
                     modelopt: str | None = None) -> dict:
    """Calibrate + quantise the bundle's fp32 image encoder, gate it, write it if it passes.
    `modelopt`: the python of a venv with nvidia-modelopt[onnx] (modelopt-* methods; default
    $NOVIC_MODELOPT_PYTHON).

    Returns {"written": bool, "path", "method", "gates": GateResult.to_dict(), "summary",
    "quantization": {...}, "data": summary, "latency_ms": {...}, "seconds"}."""
    from rich.console import Console

    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.bundle import Bundle
    from novic.runtime.classifier import Classifier

    console = console or Console(stderr=True)
    if method not in METHODS:
        raise CalibError(f"{option('method', '--method')} {method!r}: use one of {', '.join(METHODS)}")
    precision = METHOD_PRECISION[method]
    python = modelopt_python(modelopt) if method.startswith("modelopt-") else None  # fails before any work
    t_start = time.perf_counter()
    root = Path(bundle_dir)
    bundle = Bundle.open(root, verify=True)
    src = bundle.artifact_path("image_encoder", "fp32")     # hash-verified
    external = bool(bundle.artifact("image_encoder", "fp32").external_data)   # weights in side files

    data = calibration_set(bundle.preprocess, images, n_calib=n, n_heldout=n_heldout, seed=seed, console=console)
    console.print(f"calib: {data.summary()}", highlight=False)

    stage = root / f".calib-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        out = stage / encoder_file(precision)
        console.print(f"calib: quantising {src.name} ({method})...", highlight=False)
        try:
            if python:
                info = modelopt_quantize(src, out, method.split("-", 1)[1], data.calib, python=python)
            else:
                info = quantize_encoder(_staged_source(bundle, stage), out, method, data.calib,
                                        external_data=external)
        except (QuantError, ModelOptError):
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantiser fails in many ways
            other = "static" if method == "dynamic" else "dynamic"
            raise CalibError(f"{src.name}: {method} quantisation failed ({type(exc).__name__}: {exc}); "
                             f"try {option('method=' + repr(other), '--method ' + other)}") from None
        # A self-contained source gives a self-contained variant; else its weights go in <name>.data
        # (onnxruntime names them so already; modelopt_quantize tidies ModelOpt's own files).
        weights = one_weight_file(out) if external else []
        info["calibration_data"] = data.summary()
        info["tensorrt"] = method != "dynamic"   # Q/DQ graphs; dynamic uses onnxruntime-only operators

        ref_enc = OrtImageEncoder(src, threads=threads)
        var_enc = OrtImageEncoder(out, threads=threads)
        ref = np.concatenate([ref_enc(data.heldout[i:i + 8]) for i in range(0, len(data.heldout), 8)])
        t0 = time.perf_counter()
        var = np.concatenate([var_enc(data.heldout[i:i + 8]) for i in range(0, len(data.heldout), 8)])
        t_var = time.perf_counter() - t0
        clf = Classifier.load(bundle, backend="ort-cpu", precision="fp32", threads=threads)
        try:
            gates = run_gates(ref, var, classifier=clf, names=data.heldout_names,
                              ref_labels=top1_labels(clf, ref, beam_width),
                              min_mean_cosine=min_mean_cosine, min_agreement=min_agreement,
                              beam_width=beam_width)
        finally:
            clf.close()
        del ref_enc, var_enc
        info["gates"] = gates.to_dict()
        console.print(f"calib: {gates.summary()}", highlight=False)
        for name, a, b in gates.disagreements[:5]:
            console.print(f"  changed: {name}: {a!r} -> {b!r}", highlight=False)
        written = None
        if gates.passed and not dry_run:
            entry = add_artifact(root, out, role="image_encoder", precision=precision, name=encoder_file(precision),
                                 info=info, weights=weights)
            written = str(root / entry["file"])
            console.print(f"calib: wrote {written}", highlight=False)
        elif not gates.passed:
            console.print(f"calib: [red]not written[/]: the {precision} variant failed its gate "
                          f"({'; '.join(gates.reasons)})", highlight=False)
        return {"written": written is not None, "path": written, "method": method, "precision": precision,
                "gates": gates.to_dict(),
                "summary": gates.summary(), "quantization": info, "data": data.summary(),
                "heldout_seconds_variant": round(t_var, 3), "seconds": round(time.perf_counter() - t_start, 2)}
    finally:
        shutil.rmtree(stage, ignore_errors=True)
