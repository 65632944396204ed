"""TensorRT backend (torch-free): the DecoderSession protocol and an image encoder over engines
built by ``novic-export trt``. ``tensorrt`` and cuda-python (``cuda.bindings``) are imported
lazily, when an object is built; this module itself imports with neither installed.

Thin over ``novic.runtime.trt_plan``, which decides everything that is arithmetic (which
profile/bucket a batch uses, every tensor's shape per call, the buffer sizes, which ping-pong
buffer a step reads and writes); this file only talks to TensorRT and CUDA:

- Engines are checked before use: the TensorRT version that built them and the GPU's compute
  capability must match (engines are not portable across either; TensorRT developer guide,
  "Version Compatibility" / "Hardware Compatibility"), with a one-line error naming the fix.
- Buffers are allocated once (``cudaMalloc``) at the largest bucket; inputs are staged in pinned
  host memory (``cudaMallocHost``) and copied with ``cudaMemcpyAsync`` on the session's stream.
- Per call: ``context.set_input_shape`` + ``context.set_tensor_address`` for every I/O tensor,
  then ``context.execute_async_v3(stream)`` (TensorRT Python API, IExecutionContext; the name-based
  I/O API of TensorRT 10+, kept in 11). One execution context per optimization profile
  (``set_optimization_profile_async``), created on first use.
- The KV cache ping-pongs between two device buffers: the prefill writes A, step t reads the
  buffer the previous call wrote and writes the other, so nothing is copied between steps.
- Only the score outputs (top-k log-probs/ids, candidate log-probs: O(rows x k)) are copied back.
- CUDA graphs (optional, on by default): per (bucket, shapes, cache parity) the enqueue is captured
  once with ``cudaStreamBeginCapture``/``cudaStreamEndCapture`` after one plain warm-up enqueue
  (TensorRT developer guide, "CUDA Graphs": call enqueueV3 once before capturing so that shape
  changes are applied), then replayed with ``cudaGraphLaunch``. Tensor addresses are fixed
  (preallocated buffers), which is what makes replay valid.

This code cannot run on a machine without an NVIDIA GPU; its planning logic is tested in
tests/test_trt_plan.py, and the selection logic in tests/test_backend_select.py.
"""
from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from novic.config import DecoderConfig
from novic.errors import NovicError, first_line
from novic.runtime import trt_plan
from novic.runtime.backends.select import INSTALL, _versions_match
from novic.runtime.search import StepScores


class TrtError(NovicError):
    """TensorRT/cuda-python missing, an engine that does not fit this machine, or a CUDA failure."""


# --- lazy imports ------------------------------------------------------------------------------
def import_trt():
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError or missing shared libraries
        raise TrtError(f"TensorRT is not installed ({first_line(exc)}); {INSTALL['trt']}") from None
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 (the [trt] extra)
    except Exception as exc:  # noqa: BLE001
        raise TrtError(f"cuda-python is not installed ({first_line(exc)}); {INSTALL['trt']}") from None
    return cudart


# --- a thin layer over the CUDA runtime (cuda.bindings.runtime) ----------------------------------
class Cuda:
    """cudart calls return (error, *results); this raises TrtError on a non-zero error."""

    def __init__(self, device: int = 0):
        self.rt = import_cudart()
        self.device = int(device)
        self.set_device()

    def check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise TrtError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name} ({int(err)})")
        return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)

    def set_device(self):
        """The runtime API's current device is per host thread; call at every entry point."""
        self.check(self.rt.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")

    def device_properties(self) -> tuple[str, str]:
        props = self.check(self.rt.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, (bytes, bytearray)) else str(props.name)
        return name.rstrip("\x00"), f"{props.major}.{props.minor}"

    def stream(self):
        return self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")

    @staticmethod
    def handle(stream) -> int:
        """The stream as the int TensorRT takes (cuda-bindings 13 deprecates int(cudaStream_t))."""
        try:
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:   # cuda-bindings < 13
            return int(stream)
        return int(get_cuda_native_handle(stream))

    def malloc(self, nbytes: int) -> int:
        ptr = self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})")
        self.check(self.rt.cudaMemset(ptr, 0, max(int(nbytes), 1)), "cudaMemset")
        return int(ptr)

    def malloc_host(self, nbytes: int, dtype) -> np.ndarray:
        """Pinned host memory as a flat numpy array (freed with free_host)."""
        nbytes = max(int(nbytes), 1)
        ptr = int(self.check(self.rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        arr = np.frombuffer(raw, dtype=np.uint8).view(np.dtype(dtype))
        arr[:] = 0
        return arr

    def h2d(self, dst: int, src: np.ndarray, nbytes: int, stream):
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, nbytes,
                                               self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync H2D")

    def d2h(self, dst: np.ndarray, src: int, nbytes: int, stream):
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, nbytes,
                                               self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync D2H")

    def sync(self, stream):
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def begin_capture(self, stream):
        self.check(self.rt.cudaStreamBeginCapture(
            stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")

    def end_capture(self, stream):
        graph = self.check(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            return self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)

    def launch(self, graph_exec, stream):
        self.check(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def free(self, ptr: int):
        self.rt.cudaFree(ptr)

    def free_host(self, arr: np.ndarray):
        self.rt.cudaFreeHost(arr.ctypes.data)


# --- engines --------------------------------------------------------------------------------------
def _entry(engine, key, default=None):
    if isinstance(engine, dict):
        return engine.get(key, default)
    if hasattr(engine, key):
        return getattr(engine, key)
    return getattr(engine, "extra", {}).get(key, default)


def load_engine(trt, path, entry, cuda: Cuda, logger=None):
    """Deserialize an engine after checking that it was built for this TensorRT and GPU."""
    path = Path(path)
    built_trt = str(_entry(entry, "tensorrt_version", "") or "")
    built_cc = str(_entry(entry, "compute_capability", "") or "")
    gpu, cc = cuda.device_properties()
    if built_trt and not _versions_match(built_trt, trt.__version__):
        raise TrtError(f"{path.name} was built with TensorRT {built_trt} but {trt.__version__} is installed; "
                       f"rebuild the engines here with novic-export trt BUNDLE (or install TensorRT {built_trt})")
    if built_cc and built_cc != cc:
        raise TrtError(f"{path.name} was built for sm_{built_cc.replace('.', '')} but this GPU ({gpu}) is "
                       f"sm_{cc.replace('.', '')}; rebuild the engines on this GPU with novic-export trt BUNDLE")
    logger = logger or trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise TrtError(f"{path}: TensorRT could not deserialize the engine (see the messages above); "
                       "rebuild it with novic-export trt BUNDLE")
    return engine


def engine_signature(trt, engine) -> dict:
    """The engine's I/O as a manifest-style signature (-1 dims become symbolic)."""
    sig = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dims = [int(d) if int(d) >= 0 else f"d{j}" for j, d in enumerate(engine.get_tensor_shape(name))]
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        io = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
        sig[io].append({"name": name, "dtype": dtype, "shape": dims})
    return sig


def check_profiles(engine, plan: trt_plan.GraphPlan, path) -> None:
    """The engine's optimization profiles must be the plan's (same code built them)."""
    if engine.num_optimization_profiles != len(plan.profiles):
        raise TrtError(f"{Path(path).name}: {engine.num_optimization_profiles} optimization profiles, the plan "
                       f"has {len(plan.profiles)}; rebuild the engines with novic-export trt BUNDLE")
    dynamic = {t.name for t in plan.inputs if t.variables}
    for p in plan.profiles:
        for name, want in p.shapes.items():
            if name not in dynamic:
                continue
            got = tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, p.index))
            if got != tuple(tuple(s) for s in want):
                raise TrtError(f"{Path(path).name}: profile {p.index} of {name!r} is {got}, the plan says {want}; "
                               "rebuild the engines with novic-export trt BUNDLE")


def _scratch_size(engine) -> int:
    """Activation memory an execution context of `engine` needs (max over profiles).
    TensorRT 11 removed device_memory_size for device_memory_size_v2 ("Removed Python APIs")."""
    if not hasattr(engine, "device_memory_size_v2"):
        raise TrtError(f"this TensorRT has no ICudaEngine.device_memory_size_v2; novic needs TensorRT >= 11: "
                       f"{INSTALL['trt']}")
    return int(engine.device_memory_size_v2)


def _create_context(trt, engine, scratch: int, scratch_size: int):
    """An execution context that uses our shared activation memory (USER_MANAGED), so that any
    number of contexts cost no extra GPU memory. They never run concurrently (one stream)."""
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if ctx is None:
        raise TrtError("TensorRT could not create an execution context (out of GPU memory?)")
    ctx.set_device_memory(scratch, scratch_size)   # setDeviceMemoryV2(memory, size)
    return ctx


class _Graph:
    """One engine. Every distinct call configuration (profile, input shapes, tensor addresses)
    gets its own execution context, configured once and never changed, and (optionally) the CUDA
    graph captured from it. A captured graph is only valid while the context it was captured
    from keeps its shapes/addresses (TensorRT developer guide, "CUDA Graphs"), hence one context
    per configuration: e.g. the two ping-pong parities of a step bucket are two contexts, as in
    TensorRT-LLM's generation runtime. Contexts share one activation buffer (USER_MANAGED)."""

    MAX_CONFIGS = 64

    def __init__(self, trt, engine, plan: trt_plan.GraphPlan, cuda: Cuda, stream, use_graphs: bool,
                 scratch: int, scratch_size: int):
        self.trt, self.engine, self.plan, self.cuda, self.stream = trt, engine, plan, cuda, stream
        self.stream_handle = cuda.handle(stream)
        self.use_graphs = use_graphs
        self.graph_error: str | None = None   # why capture failed, if it did (then plain runs)
        self.scratch, self.scratch_size = scratch, scratch_size
        self.configs: OrderedDict = OrderedDict()   # key -> [context, graph_exec | None]

    def _configure(self, profile: int, shapes: dict, addresses: dict):
        ctx = _create_context(self.trt, self.engine, self.scratch, self.scratch_size)
        try:   # TensorRT raises (never returns False) when it refuses the profile
            ctx.set_optimization_profile_async(profile, self.stream_handle)
        except RuntimeError as exc:
            raise TrtError(f"{self.plan.role}: TensorRT refused optimization profile {profile} "
                           f"({first_line(exc)}); rebuild the engines with novic-export trt BUNDLE --force") from None
        for t in self.plan.inputs:
            if not ctx.set_input_shape(t.name, shapes[t.name]):
                raise TrtError(f"{self.plan.role}: input {t.name!r} shape {shapes[t.name]} rejected by profile {profile}")
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                raise TrtError(f"{self.plan.role}: cannot bind {name!r}")
        return ctx

    def run(self, profile: int, shapes: dict, addresses: dict):
        """Enqueue one execution (or replay its CUDA graph) on the stream."""
        key = (profile, tuple(sorted((k, tuple(v)) for k, v in shapes.items())), tuple(sorted(addresses.items())))
        entry = self.configs.get(key)
        if entry is not None:
            self.configs.move_to_end(key)
            ctx, graph = entry
            if graph is not None:
                self.cuda.launch(graph, self.stream)
            else:
                self._enqueue(ctx)
            return
        ctx = self._configure(profile, shapes, addresses)
        self._enqueue(ctx)                    # first run: applies the shapes (and computes this call)
        graph = self._capture(ctx) if self.use_graphs else None
        self.configs[key] = [ctx, graph]
        while len(self.configs) > self.MAX_CONFIGS:
            _, (_old, old_graph) = self.configs.popitem(last=False)
            if old_graph is not None:
                self.cuda.rt.cudaGraphExecDestroy(old_graph)

    def _capture(self, ctx):
        """The CUDA graph of one execution of `ctx`, or None when the capture fails: then this
        engine runs without graphs from now on (plain execute_async_v3, same results), and
        `graph_error` says why. Nothing runs while capturing, so this call's outputs are those
        of the plain run before it."""
        self.cuda.begin_capture(self.stream)
        try:
            self._enqueue(ctx)
        except Exception as exc:  # noqa: BLE001 - TrtError or TensorRT's RuntimeError
            try:   # leave capture mode; its own error is secondary, a graph it still made is dropped
                graph = self.cuda.end_capture(self.stream)
                if graph is not None:
                    self.cuda.rt.cudaGraphExecDestroy(graph)
            except TrtError:
                pass
            return self._graphs_off(exc)
        try:
            return self.cuda.end_capture(self.stream)
        except TrtError as exc:
            return self._graphs_off(exc)

    def _graphs_off(self, exc: BaseException) -> None:
        why = first_line(exc)
        self.use_graphs = False
        self.graph_error = why if why.startswith(self.plan.role) else f"{self.plan.role}: {why}"
        return None

    def _enqueue(self, ctx):
        if not ctx.execute_async_v3(self.stream_handle):
            raise TrtError(f"{self.plan.role}: execute_async_v3 failed (see TensorRT's messages above)")

    def close(self):
        for _ctx, graph in self.configs.values():
            if graph is not None:
                self.cuda.rt.cudaGraphExecDestroy(graph)
        self.configs.clear()


def _release(session) -> None:
    """Free a session's device and pinned host buffers and its stream (close() of both sessions)."""
    for ptr in session.dev.values():
        session.cuda.free(ptr)
    for arr in session.host.values():
        session.cuda.free_host(arr)
    session.dev, session.host = {}, {}
    session.cuda.rt.cudaStreamDestroy(session.stream)


def _g_bucket(g: int, g_max: int) -> int:
    """Candidate columns are padded to a power of two (few distinct shapes -> few CUDA graphs)."""
    b = 1
    while b < g:
        b *= 2
    return min(b, g_max)


# --- the decoder session -----------------------------------------------------------------------------
class _GraphStatus:
    """`cuda_graphs` / `cuda_graph_error` of a session over its engines' `_Graph`s (`self.graphs`)."""

    graphs: tuple = ()

    @property
    def cuda_graphs(self) -> bool:
        """Whether calls are replayed as CUDA graphs (else `cuda_graph_error` may say why not)."""
        return bool(self.graphs) and all(g.use_graphs for g in self.graphs)

    @property
    def cuda_graph_error(self) -> str | None:
        return next((g.graph_error for g in self.graphs if g.graph_error), None)


class TrtDecoderSession(_GraphStatus):
    """DecoderSession over the prefill and step engines (docs/internals.md "Decoder session")."""

    # Search gives it every row: rows are padded to buckets anyway (one image: always its bucket),
    # and shrinking rows would multiply the CUDA graphs captured per (bucket, previous bucket).
    # Not measured on a GPU either way.
    drops_finished_rows = False

    def __init__(self, prefill_path, step_path, config: DecoderConfig, *, engines: dict,
                 device_id: int = 0, cuda_graphs: bool = True):
        trt = import_trt()
        self.cuda = cuda = Cuda(device_id)
        self.config = config
        self._lock = threading.Lock()
        self.stream = cuda.stream()
        logger = trt.Logger(trt.Logger.WARNING)
        pre_entry, step_entry = engines["decoder_prefill"], engines["decoder_step"]
        params = trt_plan.PlanParams.from_dict(_entry(step_entry, "plan", {}) or {})
        self.params = params
        pre_engine = load_engine(trt, prefill_path, pre_entry, cuda, logger)
        step_engine = load_engine(trt, step_path, step_entry, cuda, logger)
        pre_sig, step_sig = engine_signature(trt, pre_engine), engine_signature(trt, step_engine)
        topk = next(int(t["shape"][1]) for t in step_sig["outputs"] if t["name"] == "topk_ids")
        self.topk = topk
        try:
            pre_plan = trt_plan.plan_graph(trt_plan.PREFILL, pre_sig, config, topk, params)
            step_plan = trt_plan.plan_graph(trt_plan.STEP, step_sig, config, topk, params)
        except trt_plan.PlanError as exc:
            raise TrtError(f"{Path(step_path).name}: {exc}") from None
        check_profiles(pre_engine, pre_plan, prefill_path)
        check_profiles(step_engine, step_plan, step_path)
        self.plan = trt_plan.plan_decoder_buffers(pre_plan, step_plan)
        self.prefill_plan, self.step_plan = pre_plan, step_plan
        self.dev = {n: cuda.malloc(b.nbytes) for n, b in self.plan.buffers.items()}
        # One activation buffer for both engines: they run one after the other on one stream.
        size = max(_scratch_size(pre_engine), _scratch_size(step_engine))
        self.dev["_scratch"] = cuda.malloc(size)
        self._pre = _Graph(trt, pre_engine, pre_plan, cuda, self.stream, cuda_graphs, self.dev["_scratch"], size)
        self._step = _Graph(trt, step_engine, step_plan, cuda, self.stream, cuda_graphs, self.dev["_scratch"], size)
        self.graphs = (self._pre, self._step)
        self.host = {n: cuda.malloc_host(b.nbytes, b.dtype) for n, b in self.plan.buffers.items() if b.host}
        self.max_images = pre_plan.max_batch      # largest batch the engines were built for
        self.max_rows = step_plan.max_batch       # images x beams
        self._rows = 0        # padded rows of the cache written by the last call
        self._step_no = 0     # 0 after the prefill, t after step t

    # --- helpers ---------------------------------------------------------------------------
    def _stage(self, name: str, array: np.ndarray) -> int:
        """Copy a (padded) host array into the pinned staging buffer and on to the device."""
        host = self.host[name]
        flat = np.ascontiguousarray(array, dtype=host.dtype).reshape(-1)
        host[:flat.size] = flat
        self.cuda.h2d(self.dev[name], host, flat.nbytes, self.stream)
        return flat.nbytes

    @staticmethod
    def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
        if a.shape[0] == rows:
            return a
        out = np.zeros((rows, *a.shape[1:]), a.dtype)
        out[:a.shape[0]] = a
        return out

    def _read(self, rows: int, g: int, gp: int) -> StepScores:
        k = self.topk
        cuda, s = self.cuda, self.stream
        for name, n in (("topk_logprobs", rows * k), ("topk_ids", rows * k), ("cand_logprobs", rows * gp)):
            h = self.host[name]
            cuda.d2h(h, self.dev[name], n * h.itemsize, s)
        cuda.sync(s)
        lp = self.host["topk_logprobs"][:rows * k].reshape(rows, k).copy()
        ids = self.host["topk_ids"][:rows * k].reshape(rows, k).astype(np.int64, copy=True)
        cand = self.host["cand_logprobs"][:rows * gp].reshape(rows, gp)[:, :g].copy()
        return StepScores(lp, ids, cand)

    def _cands(self, cand_ids, rows: int, g_max: int):
        cand = np.ascontiguousarray(cand_ids, dtype=np.int64)
        if cand.ndim != 2 or cand.shape[0] != rows:
            raise ValueError(f"cand_ids must have shape [{rows}, G], got {cand.shape}")
        return cand

    # --- DecoderSession --------------------------------------------------------------------
    def prefill(self, embeds, temperature: float, cand_ids) -> StepScores:
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        B = len(embeds)
        plan = self.prefill_plan
        cand = self._cands(cand_ids, B, plan.ranges["G"][2])
        G = cand.shape[1]
        g_max = plan.ranges["G"][2]
        if G > g_max:
            raise ValueError(f"{G} candidate ids per row exceed the prefill engine's {g_max}")
        with self._lock:
            self.cuda.set_device()
            bp = plan.bucket_for(B)
            gp = _g_bucket(G, g_max)
            self._stage("embedding", self._pad_rows(embeds, bp))
            self._stage("temperature", np.array([temperature], np.float32))
            padded = np.zeros((bp, gp), np.int64)
            padded[:B, :G] = cand
            self._stage("cand_ids", padded)
            shapes = plan.shapes(bp, G=gp)
            addresses = {t: self.dev[b] for t, b in self.plan.prefill_bindings.items()}
            self._pre.run(plan.profile_index(bp), {t.name: shapes[t.name] for t in plan.inputs}, addresses)
            out = self._read(B, G, gp)
            self._rows, self._step_no = bp, 0
            return out

    def step(self, tokens, position: int, beam_idx, temperature: float, cand_ids) -> StepScores:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        beam_idx = np.ascontiguousarray(beam_idx, dtype=np.int64).reshape(-1)
        N = len(tokens)
        if beam_idx.shape != tokens.shape:
            raise ValueError(f"tokens {tokens.shape} and beam_idx {beam_idx.shape} must have one entry per row")
        plan = self.step_plan
        g_max = plan.ranges["G"][2]
        cand = self._cands(cand_ids, N, g_max)
        with self._lock:
            if self._rows == 0:
                raise RuntimeError("step() before prefill()")
            if beam_idx.size and (beam_idx.min() < 0 or beam_idx.max() >= self._rows):
                raise ValueError(f"beam_idx must index the previous call's rows (0..{self._rows - 1})")
            self.cuda.set_device()
            np_ = plan.bucket_for(N)
            self._stage("tokens", self._pad_rows(tokens, np_))
            self._stage("beam_idx", self._pad_rows(beam_idx, np_))
            self._stage("position", np.array([position], np.int64))
            self._stage("temperature", np.array([temperature], np.float32))
            src, dst = self.plan.cache_pair(self._step_no + 1)
            bindings = {**self.plan.step_static, "kv_cache": src, "kv_cache_out": dst}
            addresses = {t: self.dev[b] for t, b in bindings.items()}
            # More candidates than the engine takes: repeat the step on column chunks. Each repeat
            # reads the same source buffer and rewrites the same destination, so it is idempotent.
            pieces, out = [], None
            for lo in range(0, max(cand.shape[1], 1), g_max):
                chunk = cand[:, lo:lo + g_max]
                G = chunk.shape[1]
                gp = _g_bucket(G, g_max)
                padded = np.zeros((np_, gp), np.int64)
                padded[:N, :G] = chunk
                self._stage("cand_ids", padded)
                shapes = plan.shapes(np_, M=self._rows, G=gp)
                self._step.run(plan.profile_index(np_), {t.name: shapes[t.name] for t in plan.inputs}, addresses)
                res = self._read(N, G, gp)
                if out is None:
                    out = res
                pieces.append(res.cand_logprobs)
            self._rows, self._step_no = np_, self._step_no + 1
            return StepScores(out.topk_logprobs, out.topk_ids, np.concatenate(pieces, axis=1))

    def close(self):
        with self._lock:
            for g in self.graphs:
                g.close()
            _release(self)

    def __del__(self):  # best effort; explicit close() is preferred
        try:
            if getattr(self, "dev", None):
                self.close()
        except Exception:  # noqa: BLE001
            pass


# --- the image encoder --------------------------------------------------------------------------
class TrtImageEncoder(_GraphStatus):
    """pixels f32[B,3,H,W] (preprocessed) -> unit embeddings f32[B,F], in chunks of the largest bucket."""

    def __init__(self, path, entry, *, device_id: int = 0, cuda_graphs: bool = True):
        trt = import_trt()
        self.cuda = cuda = Cuda(device_id)
        self._lock = threading.Lock()
        self.stream = cuda.stream()
        engine = load_engine(trt, path, entry, cuda)
        params = trt_plan.PlanParams.from_dict(_entry(entry, "plan", {}) or {})
        try:
            self.plan = trt_plan.plan_encoder(engine_signature(trt, engine), params.buckets)
        except trt_plan.PlanError as exc:
            raise TrtError(f"{Path(path).name}: {exc}") from None
        check_profiles(engine, self.plan, path)
        x, y = self.plan.inputs[0], self.plan.outputs[0]
        self._in, self._out = x, y
        self.image_size = tuple(x.template[2:4])
        self.embed_dim = int(y.template[1])
        bufs = trt_plan.plan_encoder_buffers(self.plan)
        self.dev = {n: cuda.malloc(b.nbytes) for n, b in bufs.items()}
        size = _scratch_size(engine)
        self.dev["_scratch"] = cuda.malloc(size)
        self._graph = _Graph(trt, engine, self.plan, cuda, self.stream, cuda_graphs, self.dev["_scratch"], size)
        self.graphs = (self._graph,)
        self.host = {n: cuda.malloc_host(b.nbytes, b.dtype) for n, b in bufs.items()}

    def __call__(self, pixels) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != self.image_size:
            raise ValueError(f"pixels must have shape [B, 3, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {pixels.shape}")
        out = []
        with self._lock:
            self.cuda.set_device()
            for lo in range(0, len(pixels), self.plan.max_batch):
                out.append(self._run(pixels[lo:lo + self.plan.max_batch]))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        B = len(chunk)
        bp = self.plan.bucket_for(B)
        cuda, s = self.cuda, self.stream
        host_in, host_out = self.host[self._in.name], self.host[self._out.name]
        host_in[:chunk.size] = chunk.reshape(-1)
        host_in[chunk.size:bp * chunk[0].size] = 0
        cuda.h2d(self.dev[self._in.name], host_in, bp * chunk[0].size * host_in.itemsize, s)
        shapes = self.plan.shapes(bp)
        self._graph.run(self.plan.profile_index(bp), {self._in.name: shapes[self._in.name]},
                        {t.name: self.dev[t.name] for t in self.plan.tensors})
        n = B * self.embed_dim
        cuda.d2h(host_out, self.dev[self._out.name], n * host_out.itemsize, s)
        cuda.sync(s)
        return host_out[:n].reshape(B, self.embed_dim).astype(np.float32, copy=True)

    def close(self):
        with self._lock:
            for g in self.graphs:
                g.close()
            _release(self)
