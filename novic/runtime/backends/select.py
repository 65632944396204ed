"""Backend auto-selection: trt when the bundle's engines fit this GPU and TensorRT imports, else
ort-cuda when onnxruntime has the CUDA execution provider, else ort-cpu.

The decision (`select_backend`) is pure logic over probed facts (`Probe`), so it is tested here
with injected facts; `probe()` gathers the real ones with lazy imports and never raises.
Every choice comes with a one-line human reason, e.g.
"trt: engines built for sm_90 with TensorRT 11.4.0 match this GPU (NVIDIA H100 80GB HBM3)".
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field

from novic.errors import NovicError

BACKENDS = ("trt", "ort-cuda", "ort-cpu")
AUTO = "auto"
ENGINE_ROLES = ("image_encoder", "decoder_prefill", "decoder_step")
ENGINE_PREFERENCE = {"fp8": 0, "int8": 1, "fp16": 2, "fp32": 3}
# Fused graphs (novic.export.fused) on the CPU: onnxruntime's own session-time fusions already
# cover most of what they fuse there, and the ViT-B/16 encoder measured no faster fused
# (docs/benchmarks.md, "Fused graphs on the CPU"), so ort-cpu keeps the plain graphs by default;
# on the GPU they are what ort-cuda takes. The Classifier decides once the precision is final.
CPU_PREFERS_FUSED = False
# Encoders that take uint8 pixels and normalise in the graph (novic.export.u8): on the GPU they
# move a quarter of the bytes over PCIe and take the float work off the host, so ort-cuda loads
# them. On the CPU the graph does the same arithmetic the host would, on the same cores, and
# measured no faster end to end (docs/benchmarks.md, "uint8 encoder input"): ort-cpu stays float.
CPU_PREFERS_U8 = False
INSTALL = {"trt": "pip install 'novic[trt]'", "ort-cuda": "pip install 'novic[gpu]' (onnxruntime-gpu)",
           "ort-cpu": "pip install 'novic[cpu]' (onnxruntime)"}


class BackendError(NovicError):
    """An explicitly requested backend that cannot run here (the message says why and the fix)."""


@dataclass(frozen=True)
class Probe:
    """Facts about this machine that the choice depends on."""

    gpu_name: str | None = None
    compute_capability: str | None = None      # "9.0"; None: no NVIDIA GPU visible
    gpu_error: str | None = None
    tensorrt_version: str | None = None        # None: `import tensorrt` failed
    tensorrt_error: str | None = None
    cuda_python: bool = False                  # cuda.bindings importable
    cuda_python_error: str | None = None
    ort_version: str | None = None
    ort_providers: tuple = ()
    ort_error: str | None = None

    @property
    def sm(self) -> str | None:
        return "sm_" + self.compute_capability.replace(".", "") if self.compute_capability else None


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    precision: str = "fp32"                    # graph precision the backend should load
    engines: dict = field(default_factory=dict)  # role -> Engine (trt only)
    rejected: tuple = ()                       # reasons the better backends were not taken

    def __str__(self) -> str:
        return self.reason


def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def trt_release(version: str) -> str:
    """"11.4.0.106" -> "11.4.0": TensorRT engines are tied to the exact release that built them
    (major.minor.patch); the build number may differ."""
    return ".".join(str(version).split(".")[:3])


def _versions_match(built: str, installed: str) -> bool:
    return trt_release(built) == trt_release(installed)


def trt_fit(engines, probe: Probe) -> tuple[dict | None, str]:
    """-> ({role: engine} for a complete matching set, reason) or (None, why not)."""
    if not engines:
        return None, "trt: the bundle has no TensorRT engines (build them with novic-export trt BUNDLE)"
    if probe.tensorrt_version is None:
        return None, f"trt: TensorRT is not installed ({probe.tensorrt_error or 'import failed'}; {INSTALL['trt']})"
    if not probe.cuda_python:
        return None, f"trt: cuda-python is not installed ({probe.cuda_python_error or 'import failed'}; {INSTALL['trt']})"
    if probe.compute_capability is None:
        return None, f"trt: no NVIDIA GPU visible ({probe.gpu_error or 'no device'})"
    fitting = [e for e in engines
               if _get(e, "compute_capability") == probe.compute_capability
               and _versions_match(str(_get(e, "tensorrt_version")), probe.tensorrt_version)]
    chosen = {}
    for role in ENGINE_ROLES:
        cands = [e for e in fitting if _get(e, "role") == role]
        # prefer the lowest precision available (fp8 < int8 < fp16 < fp32): that is why engines are built
        cands.sort(key=lambda e: ENGINE_PREFERENCE.get(_get(e, "precision"), len(ENGINE_PREFERENCE)))
        if cands:
            chosen[role] = cands[0]
    missing = [r for r in ENGINE_ROLES if r not in chosen]
    if missing:
        built = sorted({f"sm_{str(_get(e, 'compute_capability')).replace('.', '')} with TensorRT "
                        f"{_get(e, 'tensorrt_version')}" for e in engines})
        if not fitting:
            return None, (f"trt: engines were built for {', '.join(built)}, but this GPU is {probe.sm} with "
                          f"TensorRT {probe.tensorrt_version}; rebuild them here with novic-export trt BUNDLE")
        return None, (f"trt: no engine for {', '.join(missing)} matching {probe.sm} / TensorRT "
                      f"{probe.tensorrt_version}; rebuild with novic-export trt BUNDLE")
    e = chosen["decoder_step"]
    return chosen, (f"trt: engines built for {probe.sm} with TensorRT {_get(e, 'tensorrt_version')} match this "
                    f"GPU ({probe.gpu_name or 'device 0'})")


def ort_cuda_fit(probe: Probe) -> tuple[bool, str]:
    if probe.ort_version is None:
        return False, f"ort-cuda: onnxruntime is not installed ({probe.ort_error or 'import failed'}; {INSTALL['ort-cuda']})"
    if "CUDAExecutionProvider" not in probe.ort_providers:
        return False, (f"ort-cuda: onnxruntime {probe.ort_version} has no CUDAExecutionProvider "
                       f"(providers: {', '.join(probe.ort_providers) or 'none'}; {INSTALL['ort-cuda']})")
    if probe.compute_capability is None and probe.gpu_error:
        return False, f"ort-cuda: no NVIDIA GPU visible ({probe.gpu_error})"
    gpu = f" on {probe.gpu_name}" if probe.gpu_name else ""
    return True, f"ort-cuda: onnxruntime {probe.ort_version} has the CUDAExecutionProvider{gpu}"


def ort_cpu_fit(probe: Probe) -> tuple[bool, str]:
    if probe.ort_version is None:
        return False, f"ort-cpu: onnxruntime is not installed ({probe.ort_error or 'import failed'}; {INSTALL['ort-cpu']})"
    return True, f"ort-cpu: onnxruntime {probe.ort_version} on the CPU"


def prefers_fused(backend: str) -> bool:
    """Whether `backend` takes a bundle's fused graphs (of the precision it loads) by default."""
    return backend == "ort-cuda" or (backend == "ort-cpu" and CPU_PREFERS_FUSED)


def prefers_u8(backend: str) -> bool:
    """Whether `backend` takes a bundle's uint8-input encoder (where it has one) by default."""
    return backend == "ort-cuda" or (backend == "ort-cpu" and CPU_PREFERS_U8)


def select_backend(engines=(), precisions=("fp32",), requested: str = AUTO, facts: Probe | None = None) -> Choice:
    """Choose a backend.

    engines: the bundle's engine entries (``Bundle.engines`` or dicts); precisions: the ONNX graph
    precisions the bundle holds (the decoder's); requested: "auto" or one of BACKENDS;
    facts: injected `Probe` (tests); None probes this machine. Fused or plain graphs: the
    Classifier's choice once the precision is final (`prefers_fused`)."""
    requested = (requested or AUTO).lower()
    if requested not in (AUTO, *BACKENDS):
        raise BackendError(f"unknown backend {requested!r}; use one of: auto, {', '.join(BACKENDS)}")
    probe_ = facts if facts is not None else probe(parts=probe_parts(requested, engines))
    gpu_precision = "fp16" if "fp16" in precisions else "fp32"
    rejected = []

    if requested in (AUTO, "trt"):
        chosen, why = trt_fit(list(engines), probe_)
        if chosen is not None:
            precision = _get(chosen["decoder_step"], "precision", "fp16")
            encoder = _get(chosen["image_encoder"], "precision", precision)
            if encoder != precision:   # a quantised encoder engine with the fp16 decoder engines
                precision = f"{encoder} encoder, {precision} decoder"
            return Choice("trt", why, precision, chosen)
        if requested == "trt":
            raise BackendError(f"backend 'trt' is not usable: {why.removeprefix('trt: ')}")
        rejected.append(why)
    if requested in (AUTO, "ort-cuda"):
        ok, why = ort_cuda_fit(probe_)
        if ok:
            reason = why + (f" ({rejected[-1]})" if requested == AUTO and rejected else "")
            return Choice("ort-cuda", reason, gpu_precision, {}, tuple(rejected))
        if requested == "ort-cuda":
            raise BackendError(f"backend 'ort-cuda' is not usable: {why.removeprefix('ort-cuda: ')}")
        rejected.append(why)
    ok, why = ort_cpu_fit(probe_)
    if ok:
        if requested == AUTO and probe_.compute_capability is not None and rejected:
            why += f" (a GPU is present but {rejected[-1]})"
        return Choice("ort-cpu", why, "fp32", {}, tuple(rejected))
    raise BackendError(f"no backend can run this bundle: {why.removeprefix('ort-cpu: ')}"
                       + (f"; also {'; '.join(rejected)}" if rejected else ""))


# --- probing the real machine ------------------------------------------------------------------
def _probe_gpu_cuda_python(device: int):
    from cuda.bindings import runtime as cudart  # lazy; cuda-python >= 12.6

    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        raise RuntimeError(f"cudaGetDeviceProperties failed: {err}")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


def _probe_gpu_nvidia_smi(device: int):
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise RuntimeError("nvidia-smi not found")
    out = subprocess.run([exe, f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError((out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout).strip()
                           else f"nvidia-smi exited {out.returncode}")
    name, cc = [s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1)]
    return name, cc


PROBE_PARTS = ("gpu", "trt", "ort")


def probe_parts(requested: str, engines=()) -> tuple:
    """The facts a request needs: probing the others would import CUDA and TensorRT libraries for
    nothing (their import can print driver warnings, and costs time on a CPU-only machine)."""
    if requested == "ort-cpu":
        return ("ort",)
    if requested == "ort-cuda" or (requested == AUTO and not engines):  # no engines: TensorRT is moot
        return ("gpu", "ort")
    return PROBE_PARTS


def probe(device: int = 0, parts=PROBE_PARTS) -> Probe:
    """Gather the facts named in `parts` (gpu: cuda-python and the device; trt: TensorRT;
    ort: onnxruntime) with lazy imports; never raises. Facts not gathered keep Probe's defaults."""
    facts: dict = {}
    if "gpu" in parts or "trt" in parts:   # cuda-python: the device query, and what TensorRT runs on
        try:
            from cuda.bindings import runtime as _  # noqa: F401
            facts["cuda_python"] = True
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
            facts["cuda_python_error"] = _short(exc)
        gpu_errors = []
        for fn in ((_probe_gpu_cuda_python,) if facts.get("cuda_python") else ()) + (_probe_gpu_nvidia_smi,):
            try:
                facts["gpu_name"], facts["compute_capability"] = fn(device)
                break
            except Exception as exc:  # noqa: BLE001
                gpu_errors.append(_short(exc))
        if "compute_capability" not in facts:
            facts["gpu_error"] = "; ".join(gpu_errors) or "no GPU"
    if "trt" in parts:
        try:
            import tensorrt as trt
            facts["tensorrt_version"] = str(trt.__version__)
        except Exception as exc:  # noqa: BLE001
            facts["tensorrt_error"] = _short(exc)
    if "ort" in parts:
        try:
            import onnxruntime as ort
            facts["ort_version"] = str(ort.__version__)
            facts["ort_providers"] = tuple(ort.get_available_providers())
        except Exception as exc:  # noqa: BLE001
            facts["ort_error"] = _short(exc)
    return Probe(**facts)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def select_for_bundle(bundle, requested: str = AUTO, facts: Probe | None = None) -> Choice:
    """Convenience: `select_backend` with a `novic.runtime.bundle.Bundle`."""
    return select_backend(bundle.engines, bundle.precisions("decoder_step"), requested, facts)
