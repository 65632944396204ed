"""`novic-export triton`: a Triton Inference Server model repository from a bundle (torch-free).

    REPO/
      novic_image_encoder/        backend "onnxruntime" (or "python" with --encoder-backend python,
                                  for servers without it: novic.serve.triton_encoder_model):
                                  pixels [3,H,W] -> embedding [F]
        config.pbtxt              dynamic batching, instance group (KIND_CPU or KIND_GPU)
        1/model.onnx              the bundle's image encoder (fp32 for CPU, fp16 for GPU if present)
      novic/                      backend "python": the model clients call
        config.pbtxt              image BYTES [1] (+ optional topk) -> labels, probs, error
        1/model.py                novic.serve.triton_model: decodes and preprocesses the images,
                                  calls novic_image_encoder (BLS), runs novic's beam search over
                                  the decoder graphs with onnxruntime
        1/bundle/                 the decoder graphs, tokenizer and manifest (a bundle without
                                  the image encoder)

The `novic` model is novic's protocol (novic.serve.triton_requests): the same inputs and outputs
as `novic.serve.triton.serve`. Triton's Python backend runs model.py with the server's Python, which
must have novic's runtime installed (`pip install 'novic[cpu]'`, or onnxruntime-gpu for
`--target gpu`). docs/triton.md says what runs where.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from novic.atomic import fsync_dir, write_bytes_atomic, write_json_atomic
from novic.errors import NovicError
from novic.runtime.bundle import MANIFEST, Bundle

ENCODER_MODEL, NOVIC_MODEL = "novic_image_encoder", "novic"
TARGETS = ("cpu", "gpu")
ENCODER_BACKENDS = ("onnxruntime", "python")
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


class TritonRepoError(NovicError):
    """A bad option or an output that cannot be written; one line with the fix."""


@dataclass(frozen=True)
class RepoPlan:
    target: str               # cpu | gpu
    encoder_precision: str
    decoder_precision: str
    max_batch: int
    max_wait_us: int
    instances: int
    topk: int
    encoder_backend: str = "onnxruntime"


def plan_repo(bundle: Bundle, *, target: str = "cpu", precision: str | None = None, max_batch: int = 32,
              max_wait_ms: float = 2, instances: int = 1, topk: int = 5,
              encoder_backend: str = "onnxruntime") -> RepoPlan:
    """Check the options against the bundle; fp16 graphs for a GPU when the bundle has them."""
    if target not in TARGETS:
        raise TritonRepoError(f"target {target!r} is not one of {TARGETS}")
    if encoder_backend not in ENCODER_BACKENDS:
        raise TritonRepoError(f"encoder backend {encoder_backend!r} is not one of {ENCODER_BACKENDS}")
    for name, value in (("max_batch", max_batch), ("instances", instances), ("topk", topk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TritonRepoError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(max_wait_ms, (int, float)) and 0 <= max_wait_ms <= 10_000):
        raise TritonRepoError(f"max_wait_ms must be between 0 and 10000, got {max_wait_ms!r}")
    beam_width = int(bundle.search_defaults.get("beam_width", 10))
    if topk > beam_width:
        raise TritonRepoError(f"topk {topk} exceeds the bundle's beam width {beam_width}; use at most {beam_width}")
    encoders, decoders = bundle.precisions("image_encoder"), bundle.precisions("decoder_step")
    if precision is None:
        want = "fp16" if target == "gpu" else "fp32"
        enc = want if want in encoders else "fp32"
        dec = want if want in decoders else "fp32"
    else:
        if precision not in ("fp32", "fp16"):
            raise TritonRepoError(f"precision {precision!r}: use fp32 or fp16 (int8/fp8 encoders are served by "
                                  f"novic-run / novic.serve.triton)")
        if precision not in encoders or precision not in decoders:
            raise TritonRepoError(f"{bundle.path}: no {precision} graphs in this bundle; re-export it with "
                                  f"novic-export onnx (fp16 is written unless --no-fp16)")
        enc = dec = precision
    return RepoPlan(target, enc, dec, max_batch, int(round(max_wait_ms * 1000)), instances, topk, encoder_backend)


# ---- config.pbtxt ------------------------------------------------------------------------------
def _dims(shape) -> str:
    return ", ".join(str(d) for d in shape)


def _batching(plan: RepoPlan) -> str:
    kind = "KIND_GPU" if plan.target == "gpu" else "KIND_CPU"
    return (f"max_batch_size: {plan.max_batch}\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {plan.max_wait_us} }}\n"
            f"instance_group [ {{ count: {plan.instances} kind: {kind} }} ]\n")


def encoder_config(bundle: Bundle, plan: RepoPlan) -> str:
    art = bundle.artifact("image_encoder", plan.encoder_precision)
    (inp,), (out,) = art.inputs, art.outputs
    return (f'name: "{ENCODER_MODEL}"\n'
            f'backend: "{plan.encoder_backend}"\n'
            + _batching(plan) +
            f'input [ {{ name: "{inp.name}" data_type: {_triton_type(inp.dtype, art.file)} '
            f'dims: [ {_dims(inp.shape[1:])} ] }} ]\n'
            f'output [ {{ name: "{out.name}" data_type: {_triton_type(out.dtype, art.file)} '
            f'dims: [ {_dims(out.shape[1:])} ] }} ]\n')


def novic_config(bundle: Bundle, plan: RepoPlan) -> str:
    art = bundle.artifact("image_encoder", plan.encoder_precision)
    (inp,), (out,) = art.inputs, art.outputs
    params = {"encoder_model": ENCODER_MODEL, "encoder_input": inp.name, "encoder_output": out.name,
              "encoder_dtype": inp.dtype, "decoder_precision": plan.decoder_precision,
              "decoder_provider": "cuda" if plan.target == "gpu" else "cpu", "topk": str(plan.topk)}
    # The Python model runs on the CPU (KIND_CPU); on a GPU target its decoder uses onnxruntime's CUDA provider.
    batching = _batching(plan).replace("KIND_GPU", "KIND_CPU")
    return (f'name: "{NOVIC_MODEL}"\n'
            f'backend: "python"\n'
            + batching +
            'input [\n'
            '  { name: "image" data_type: TYPE_STRING dims: [ 1 ] },\n'
            '  { name: "topk" data_type: TYPE_INT32 dims: [ 1 ] optional: true }\n'
            ']\n'
            'output [\n'
            '  { name: "labels" data_type: TYPE_STRING dims: [ -1 ] },\n'
            '  { name: "probs" data_type: TYPE_FP32 dims: [ -1 ] },\n'
            '  { name: "error" data_type: TYPE_STRING dims: [ 1 ] }\n'
            ']\n'
            'parameters [\n'
            + ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
            + '\n]\n')


def _triton_type(dtype: str, file: str) -> str:
    try:
        return _TRITON_TYPES[dtype]
    except KeyError:
        raise TritonRepoError(f"{file}: tensor type {dtype!r} has no Triton mapping here; re-export the bundle") from None


# ---- writing -----------------------------------------------------------------------------------
def export_triton_repo(bundle, out, *, target: str = "cpu", precision: str | None = None, max_batch: int = 32,
                       max_wait_ms: float = 2, instances: int = 1, topk: int = 5,
                       encoder_backend: str = "onnxruntime", force: bool = False) -> dict:
    """Write the repository to `out` (staged next to it, moved into place when complete)."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    plan = plan_repo(bundle, target=target, precision=precision, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     instances=instances, topk=topk, encoder_backend=encoder_backend)
    out = Path(out).absolute()
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir()
        _write(bundle, plan, stage)
        _check_target(out, force)
        _replace_dir(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {"path": str(out), "plan": plan, "files": [(str(p.relative_to(out)), p.stat().st_size) for p in files]}


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TritonRepoError(f"{out} exists and is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / NOVIC_MODEL / "config.pbtxt").is_file():
            raise TritonRepoError(f"{out} exists and is not a novic Triton repository; refusing to replace it, "
                                  f"choose another --out")
        if not force:
            raise TritonRepoError(f"{out} already holds a Triton repository; pass --force to replace it")


def _replace_dir(stage: Path, out: Path) -> None:
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, out)
    fsync_dir(out.parent)


def _copy(bundle: Bundle, rel: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle.path / rel, dest)


def _write(bundle: Bundle, plan: RepoPlan, root: Path) -> None:
    # The image encoder: model.onnx plus its external-data files under their own names (the graph
    # refers to them by name).
    enc = bundle.artifact("image_encoder", plan.encoder_precision)
    bundle.artifact_path("image_encoder", plan.encoder_precision)        # sha256 checked before copying
    version = root / ENCODER_MODEL / "1"
    _copy(bundle, enc.file, version / "model.onnx")
    for ref in enc.external_data:
        _copy(bundle, ref.file, version / Path(ref.file).name)
    write_bytes_atomic(root / ENCODER_MODEL / "config.pbtxt", encoder_config(bundle, plan).encode())
    if plan.encoder_backend == "python":
        write_bytes_atomic(version / "model.py", Path(__file__).with_name("triton_encoder_model.py").read_bytes())

    # The novic model: model.py and a bundle with the decoder graphs only (engines are GPU-specific
    # and served by novic-run, not here).
    version = root / NOVIC_MODEL / "1"
    sub = version / "bundle"
    manifest = dict(bundle.manifest)
    keep = {("decoder_prefill", plan.decoder_precision, "plain"), ("decoder_step", plan.decoder_precision, "plain")}
    manifest["artifacts"] = [a for a in bundle.manifest["artifacts"]
                             if (a["role"], a["precision"], a.get("variant", "plain")) in keep]
    manifest["engines"] = []
    manifest.pop("hierarchy", None)   # the Triton model answers fine labels; its file is not copied
    for art in bundle.artifacts:
        if (art.role, art.precision, art.variant) in keep:
            bundle.artifact_path(art.role, art.precision)
            for ref in art.files():
                _copy(bundle, ref.file, sub / ref.file)
    tok = bundle.manifest.get("tokenizer")
    if tok:
        bundle.tokenizer_file  # noqa: B018 (sha256 checked before copying)
        _copy(bundle, tok["file"], sub / tok["file"])
    write_json_atomic(sub / MANIFEST, manifest)
    model_py = Path(__file__).with_name("triton_model.py").read_bytes()
    write_bytes_atomic(version / "model.py", model_py)
    write_bytes_atomic(root / NOVIC_MODEL / "config.pbtxt", novic_config(bundle, plan).encode())
