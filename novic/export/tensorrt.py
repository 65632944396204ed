"""``novic-export trt BUNDLE``: TensorRT engines from the bundle's fp16 graphs.

``--precision int8|fp8`` builds the image encoder from the bundle's quantised graph (explicit Q/DQ,
written by ``novic-export calib``; FP8 needs compute capability >= 8.9) and the decoder from its
fp16 graphs: the decoder is small and launch-bound on a GPU, so it is not quantised.

TensorRT 11 Python API (docs.nvidia.com/deeplearning/tensorrt, "Migrating from TensorRT 10.x to
11.x" and the Python API reference), used as follows:
- Strongly typed networks: TensorRT 11 removed the precision builder flags (BuilderFlag.FP16,
  INT8, ...: "Removed Python APIs and Replacements"); precision comes from the ONNX types, which is
  why the bundle carries fp16 graphs (novic.export.fp16). ``NetworkDefinitionCreationFlag
  .STRONGLY_TYPED`` is passed when the enum still has it (TensorRT 10.x needs it; 11.x ignores it:
  "Strongly typed mode is always enabled ... retained for API compatibility").
- ``trt.OnnxParser(network, logger).parse_from_file(path)`` (resolves external weight files next
  to the graph), errors via ``parser.num_errors`` / ``parser.get_error(i)``.
- One optimization profile per batch bucket (``builder.create_optimization_profile()``,
  ``profile.set_shape(name, min, opt, max)``, ``config.add_optimization_profile``), computed by
  ``novic.runtime.trt_plan`` (the same code the runtime uses to pick a profile and size buffers).
- A persisted timing cache (``config.create_timing_cache(bytes)``, ``config.set_timing_cache(cache,
  ignore_mismatch=False)``, ``cache.serialize()``), one per GPU and TensorRT release
  (``engines/timing.sm90.trt11.4.0.cache``), so rebuilding (other buckets, the next novic version)
  skips most kernel timing. A cache TensorRT refuses (``set_timing_cache`` returns False, e.g.
  after a driver change) is replaced by a fresh one.
- ``builder.build_serialized_network(network, config)`` -> engine file, checked by deserializing it
  (``trt.Runtime(logger).deserialize_cuda_engine``) and comparing its I/O tensors and profile
  count with the plan.
Engines are tied to the TensorRT version and the GPU's compute capability; both are recorded in
the manifest, and the runtime refuses engines that do not match (novic.runtime.backends.select).

TensorRT is imported only here (lazily); without it, one line says how to install it.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from novic.atomic import write_bytes_atomic
from novic.errors import NovicError, first_line
from novic.runtime import trt_plan
from novic.runtime.backends.select import INSTALL, probe, trt_release
from novic.runtime.bundle import MANIFEST, QUANTIZED, ROLES, Bundle, BundleError, read_manifest

ENGINE_DIR = "engines"
FP8_MIN_CC = (8, 9)   # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores


class TensorRTMissing(NovicError):
    """TensorRT (or the GPU it needs) is not available."""


class EngineBuildError(NovicError):
    """TensorRT could not parse or build a graph."""


def import_tensorrt():
    """`import tensorrt` or a one-line TensorRTMissing naming the fix."""
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (missing libs)
        raise TensorRTMissing(f"TensorRT is not installed ({first_line(exc)}); install it with: {INSTALL['trt']} "
                              "(needs an NVIDIA GPU and driver), then run novic-export trt again") from None
    return trt


def engine_file_name(role: str, precision: str, compute_capability: str, trt_version: str) -> str:
    """decoder_step.fp16.sm90.trt11.4.0.engine: one file per GPU architecture and TensorRT release
    (the runtime accepts an engine only on that pair; see select.trt_release)."""
    sm = compute_capability.replace(".", "")
    return f"{role}.{precision}.sm{sm}.trt{trt_release(trt_version)}.engine"


def timing_cache_name(compute_capability: str, trt_version: str) -> str:
    """timing.sm90.trt11.4.0.cache: TensorRT refuses a cache made on another device or release."""
    return f"timing.sm{compute_capability.replace('.', '')}.trt{trt_release(trt_version)}.cache"


def role_precision(role: str, precision: str) -> str:
    """The graph precision an engine of `role` is built from: quantised variants exist only for the
    image encoder; with them the decoder engines come from the fp16 graphs."""
    return "fp16" if precision in QUANTIZED and role != "image_encoder" else precision


def check_quantized_encoder(bundle: Bundle, precision: str) -> None:
    """A quantised encoder graph TensorRT can build: Q/DQ, not onnxruntime's dynamic int8."""
    artifact = bundle.artifact("image_encoder", precision)   # BundleError if missing
    info = artifact.extra.get("quantization") or {}
    if info.get("tensorrt") is False or info.get("method") == "dynamic":
        raise BundleError(f"{bundle.path / artifact.file}: this {precision} encoder was made with --method "
                          f"{info.get('method', 'dynamic')} (onnxruntime-only operators); TensorRT needs Q/DQ: "
                          f"rerun novic-export calib {bundle.path} --method static (or modelopt-{precision})")


def plans_for_bundle(bundle: Bundle, params: trt_plan.PlanParams, precision: str = "fp16",
                     roles=ROLES) -> dict:
    """role -> (Artifact, GraphPlan) for the graphs the engines are built from."""
    cfg, topk = bundle.decoder_config, bundle.graph_topk
    image_size = trt_plan.image_size_from_preprocess(bundle.preprocess)
    if precision in QUANTIZED and "image_encoder" in roles:
        check_quantized_encoder(bundle, precision)
    out = {}
    for role in roles:
        artifact = bundle.artifact(role, role_precision(role, precision))
        try:
            plan = trt_plan.plan_graph(role, artifact.signature(), cfg, topk, params, image_size)
        except trt_plan.PlanError as exc:
            raise BundleError(f"{bundle.path / artifact.file}: {exc}") from None
        out[role] = (artifact, plan)
    return out


class _Monitor:
    """TensorRT IProgressMonitor -> a callback(text); created lazily since it subclasses a trt type."""

    @staticmethod
    def create(trt, callback):
        base = getattr(trt, "IProgressMonitor", None)
        if base is None or callback is None:
            return None

        class Monitor(base):
            def __init__(self):
                base.__init__(self)
                self.phases = {}

            def phase_start(self, parent_phase, phase_name, num_steps):
                self.phases[phase_name] = num_steps
                callback(f"{phase_name} (0/{num_steps})")

            def step_complete(self, phase_name, step):
                callback(f"{phase_name} ({step + 1}/{self.phases.get(phase_name, '?')})")
                return True  # False would cancel the build

            def phase_finish(self, phase_name):
                self.phases.pop(phase_name, None)

        return Monitor()


def build_engine(trt, logger, onnx_path: Path, plan: trt_plan.GraphPlan, timing_cache: bytes | None,
                 workspace_bytes: int | None = None, status=None) -> tuple[bytes, bytes]:
    """Parse + build one engine; returns (serialized engine, serialized timing cache)."""
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{onnx_path}: the TensorRT ONNX parser failed: {'; '.join(errors) or 'no detail'} "
                               "(check tests/test_onnx_ops_allowlist.py; re-export with novic-export onnx)")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = [t.name for t in plan.inputs if t.name not in names]
    if missing:
        raise EngineBuildError(f"{onnx_path}: the parsed network lacks inputs {missing} (has {sorted(names)})")

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not config.set_timing_cache(config.create_timing_cache(timing_cache or b""), ignore_mismatch=False):
        if status is not None:
            status("timing cache refused by TensorRT (other device or driver); starting a fresh one")
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise EngineBuildError(f"{onnx_path}: TensorRT refused an empty timing cache")
    monitor = _Monitor.create(trt, status)
    if monitor is not None:
        config.progress_monitor = monitor
    dynamic = {t.name for t in plan.inputs if t.variables}   # static inputs (temperature) need no range
    for p in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            if name in dynamic:
                profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine (see the messages above; "
                               "a smaller --buckets or more --workspace may help)")
    engine_bytes = bytes(memoryview(serialized))
    cache = config.get_timing_cache()
    cache_bytes = bytes(memoryview(cache.serialize())) if cache is not None else b""

    # Check what we got: the engine's I/O tensors and its profiles match the plan.
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise EngineBuildError(f"{onnx_path}: the built engine does not deserialize")
    io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    want = {t.name for t in plan.tensors}
    if io != want:
        raise EngineBuildError(f"{onnx_path}: engine I/O {sorted(io)} differs from the plan {sorted(want)}")
    if engine.num_optimization_profiles != len(plan.profiles):
        raise EngineBuildError(f"{onnx_path}: engine has {engine.num_optimization_profiles} profiles, "
                               f"planned {len(plan.profiles)}")
    return engine_bytes, cache_bytes


def _up_to_date(root: Path, entry: dict | None, artifact, params, version: str, cc: str) -> bool:
    """An engine already recorded for this source graph, plan, TensorRT and GPU (a resumed or
    repeated build skips it)."""
    if not entry:
        return False
    path = root / entry["file"]
    return (entry.get("source_sha256") == artifact.sha256 and entry.get("plan") == params.to_dict()
            and entry.get("tensorrt_version") == version and entry.get("compute_capability") == cc
            and path.is_file() and path.stat().st_size == entry.get("size"))


def build_engines(bundle_dir, *, buckets=trt_plan.DEFAULT_BUCKETS, beam_width: int | None = None,
                  precision: str = "fp16", roles=ROLES, workspace_gib: float | None = None,
                  step_max_cands: int | None = None, force: bool = False, console=None,
                  verbose: bool = False) -> dict:
    """Build an engine per role from the bundle's `precision` graphs and record each in the
    manifest as soon as it is built. Engines already recorded for the same graph, plan, TensorRT
    and GPU are kept (an interrupted build resumes) unless `force`.
    Returns {"engines": [entries], "skipped": [roles], "seconds": t, "gpu", "compute_capability",
    "tensorrt_version"}."""
    from rich.console import Console

    console = console or Console(stderr=True)
    start = time.perf_counter()
    root = Path(bundle_dir)
    bundle = Bundle.open(root, verify=True)
    params = trt_plan.PlanParams(
        buckets=trt_plan.normalize_buckets(buckets),
        beam_width=int(beam_width or bundle.search_defaults.get("beam_width", trt_plan.DEFAULT_BEAM_WIDTH)),
        # guided steps need the widest trie row of the bundle's nouns; at least STEP_MAX_CANDS so a
        # user vocabulary rarely needs the chunked path (several executions per step)
        step_max_cands=step_max_cands if step_max_cands is not None
        else max(int(bundle.search_defaults.get("guided_max_cands") or 0),
                 min(bundle.decoder_config.vocab_size, trt_plan.STEP_MAX_CANDS)))
    plans = plans_for_bundle(bundle, params, precision, roles)  # fails early on a bad bundle
    trt = import_tensorrt()
    facts = probe()
    if facts.compute_capability is None:
        raise TensorRTMissing(f"no NVIDIA GPU visible ({facts.gpu_error}); TensorRT engines are built on the GPU "
                              "that will run them")
    cc, gpu, version = facts.compute_capability, facts.gpu_name or "", str(trt.__version__)
    if precision == "fp8" and tuple(int(x) for x in cc.split(".")) < FP8_MIN_CC:
        raise TensorRTMissing(f"FP8 engines need an Ada or Hopper GPU (compute capability >= 8.9); {gpu or 'this GPU'} "
                              f"is {facts.sm}: use --precision int8 or fp16")
    engine_dir = root / ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    cache_path = engine_dir / timing_cache_name(cc, version)
    timing = cache_path.read_bytes() if cache_path.is_file() else None
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    console.print(f"TensorRT {version} on {gpu} ({facts.sm}); buckets {list(params.buckets)} "
                  f"images, beam width {params.beam_width}"
                  + (f"; timing cache {cache_path.name} ({len(timing)} bytes)" if timing else ""), highlight=False)

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    entries, skipped = [], []
    recorded = {_engine_key(e.role, e.precision, e.compute_capability, e.tensorrt_version): e
                for e in bundle.engines}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        for role, (artifact, plan) in plans.items():
            graph_precision = artifact.precision
            old = recorded.get(_engine_key(role, graph_precision, cc, version))
            old_entry = {**old.extra, "file": old.file, "size": old.size, "tensorrt_version": old.tensorrt_version,
                         "compute_capability": old.compute_capability} if old else None
            if not force and _up_to_date(root, old_entry, artifact, params, version, cc):
                progress.console.print(f"{role}: {old.file} is up to date (--force rebuilds it)", highlight=False)
                skipped.append(role)
                continue
            task = progress.add_task(f"{role}: parsing {artifact.file}", total=None)

            def status(text, task=task, role=role):
                progress.update(task, description=f"{role}: {text}")

            t0 = time.perf_counter()
            onnx_path = bundle.artifact_path(role, graph_precision)
            engine_bytes, timing = build_engine(trt, logger, onnx_path, plan, timing,
                                                int(workspace_gib * (1 << 30)) if workspace_gib else None, status)
            name = engine_file_name(role, graph_precision, cc, version)
            write_bytes_atomic(engine_dir / name, engine_bytes)
            if timing:   # after each engine: an interrupted run keeps its timings
                write_bytes_atomic(cache_path, timing)
            entry = {
                "file": f"{ENGINE_DIR}/{name}", "role": role, "precision": graph_precision,
                "sha256": hashlib.sha256(engine_bytes).hexdigest(), "size": len(engine_bytes),
                "source": artifact.file, "source_sha256": artifact.sha256,
                "tensorrt_version": version, "compute_capability": cc,
                "device_name": gpu, "plan": params.to_dict(),
                "profiles": [p.to_dict() for p in plan.profiles],
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.perf_counter() - t0, 1)}
            _record_engines(root, [entry], cache_path)   # recorded at once: a later failure keeps it
            entries.append(entry)
            progress.update(task, description=f"{role}: {name} ({len(engine_bytes) / 2**20:.1f} MiB)",
                            total=1, completed=1)
    return {"engines": entries, "skipped": skipped, "seconds": round(time.perf_counter() - start, 1), "gpu": gpu,
            "compute_capability": cc, "tensorrt_version": version}


def _engine_key(role, precision, compute_capability, tensorrt_version) -> tuple:
    """What one engine is for: a rebuild for the same key replaces it (same file name)."""
    return role, precision, compute_capability, trt_release(tensorrt_version)


def _record_engines(root: Path, entries: list[dict], cache_path: Path) -> None:
    """Replace engines of the same role/precision/GPU/TensorRT release in the manifest (atomic
    rewrite), then delete a replaced engine's file if it had another name (bundles built before
    engine names carried the patch release) so that it does not linger unlisted."""
    from novic.export.bundle import write_manifest

    def key(e):
        return _engine_key(e.get("role"), e.get("precision"), e.get("compute_capability"), e.get("tensorrt_version", ""))

    data = read_manifest(root)
    new = {key(e) for e in entries}
    old = data.get("engines", []) or []
    data["engines"] = [e for e in old if key(e) not in new] + entries
    data["tensorrt"] = {"timing_cache": f"{ENGINE_DIR}/{cache_path.name}"}
    write_manifest(root / MANIFEST, data)
    listed = {e["file"] for e in data["engines"]}
    engines = (root / ENGINE_DIR).resolve()
    for e in old:
        replaced = (root / str(e.get("file", ""))).resolve()
        if key(e) in new and e.get("file") not in listed and replaced.parent == engines:
            replaced.unlink(missing_ok=True)
