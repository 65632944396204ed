"""onnxruntime backend (torch-free): the decoder session and the image encoder over ONNX graphs.

- ``OrtDecoderSession``: the DecoderSession protocol (docs/internals.md) over the exported
  ``decoder_prefill`` / ``decoder_step`` graphs. The session keeps the KV cache between calls.
  On the CPU it is a plain numpy array fed back into ``run()``. With the CUDA provider the
  cache never leaves the GPU: it is an OrtValue bound with IOBinding, the step writes into the
  other of two preallocated buffers (ping-pong, as the graphs are built for), and only the
  scores (O(rows x k) numbers) are copied to the host.
- ``OrtImageEncoder``: pixels f32[B,3,H,W] -> unit embeddings f32[B,F]; or, for a graph that
  normalises in itself (novic.export.u8), the resized pixels u8[B,H,W,3].

Provider names: "cpu" or "cuda". onnxruntime is imported lazily so that importing this module
never fails; using it without onnxruntime raises a one-line error with the install command.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from novic.config import DecoderConfig
from novic.errors import NovicError, first_line
from novic.runtime.bundle import REEXPORT
from novic.runtime.search import StepScores

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
INSTALL = {"cpu": "pip install 'novic[cpu]' (onnxruntime)",
           "cuda": "pip install 'novic[gpu]' (onnxruntime-gpu)"}
PREFILL_INPUTS = ("embedding", "temperature", "cand_ids")
STEP_INPUTS = ("tokens", "position", "beam_idx", "kv_cache", "temperature", "cand_ids")
SCORE_OUTPUTS = ("topk_logprobs", "topk_ids", "cand_logprobs")
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(uint8)": np.uint8}


class OrtError(NovicError):
    """onnxruntime missing, a provider that is not available, or a graph that does not fit."""


class DeviceEmbeddings:
    """Image embeddings f32 [B, F] left where the encoder wrote them (an OrtValue, on the GPU with
    "cuda"), so that the decoder's prefill reads them in place instead of through the host
    (`OrtImageEncoder.embed_on_device`, `OrtDecoderSession.prefill`). `numpy()` copies them out."""

    on_device = True   # novic.runtime.search passes them through to the session

    def __init__(self, value):
        self.value = value
        self.shape = tuple(value.shape())

    def __len__(self) -> int:
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        return self.value.numpy()


def import_ort(provider: str = "cpu"):
    try:
        import onnxruntime
    except ImportError as exc:
        raise OrtError(f"onnxruntime is not installed ({exc}); {INSTALL.get(provider, INSTALL['cpu'])}") from None
    return onnxruntime


def make_session(path, provider: str = "cpu", *, threads: int | None = None, device_id: int = 0,
                 optimize: bool | None = None, tf32: bool = False, cuda_graph: bool = False,
                 spinning: bool = False):
    """An onnxruntime InferenceSession for `path` on `provider` ("cpu" or "cuda").

    threads: intra-op threads (None: onnxruntime's default, one per physical core).
    optimize: graph optimisations; None = on, except for fp16 graphs (``*.fp16[.u8].onnx``) on the
    CPU, where the default fusions crashed onnxruntime on an fp16 ViT (and CPU fp16 is only
    used for checking: most fp16 ops run through inserted casts there anyway).
    tf32 (CUDA): onnxruntime's CUDA provider may use TF32 for fp32 MatMul/Conv; off by default so
    that an fp32 graph means fp32 (measured on an H100: 2.6e-2 log-prob error with TF32 on).
    cuda_graph (CUDA): capture/replay CUDA graphs (needs IOBinding with fixed buffers).
    spinning: keep intra-op threads busy-waiting after a run returns (onnxruntime's default).
    Off (``session.force_spinning_stop``): they spin only while a run is active. A classifier
    holds three sessions that run in turn (encoder, prefill, step), and each one's idle spinning
    threads steal the cores from the next: on 2 cores, one guided beam-10 decode took 39 ms with
    the default and 21 ms without (bench/cpu_rounds.py; docs/benchmarks.md, "CPU", run 2).
    """
    if provider not in PROVIDERS:
        raise OrtError(f"unknown provider {provider!r}; use one of: {', '.join(PROVIDERS)}")
    ort = import_ort(provider)
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise OrtError(f"onnxruntime {ort.__version__} has no {PROVIDERS[provider]} "
                       f"(available: {', '.join(available)}); {INSTALL[provider]}")
    path = Path(path)
    if not path.is_file():
        raise OrtError(f"ONNX graph not found: {path}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spinning:   # threads still spin within a run; they stop as soon as it returns
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if optimize is None:
        optimize = not (provider == "cpu" and ".fp16." in path.name)   # *.fp16.onnx, *.fp16.u8.onnx
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = [PROVIDERS[provider]]
    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip wheels, when no system CUDA is on the path
    if provider == "cuda":
        options_cuda = {"device_id": str(device_id), "use_tf32": "1" if tf32 else "0"}
        if cuda_graph:
            options_cuda["enable_cuda_graph"] = "1"
        providers = [(PROVIDERS["cuda"], options_cuda), PROVIDERS["cpu"]]
    return ort.InferenceSession(str(path), options, providers=providers)


def _check_io(session, path, inputs, outputs):
    have_in = [i.name for i in session.get_inputs()]
    have_out = [o.name for o in session.get_outputs()]
    if sorted(have_in) != sorted(inputs) or sorted(have_out) != sorted(outputs):
        raise OrtError(f"{Path(path).name}: graph I/O {have_in} -> {have_out} does not match the "
                       f"decoder contract {list(inputs)} -> {list(outputs)}; re-export with novic-export onnx")


def _check_dims(session, path, expected: dict) -> None:
    """Each named input/output of `session` has the `expected` dims (None: any size)."""
    specs = {t.name: t for t in (*session.get_inputs(), *session.get_outputs())}
    for name, want in expected.items():
        got = [d if isinstance(d, int) else None for d in specs[name].shape]
        if got != want:
            shown = ", ".join("N" if d is None else str(d) for d in want)
            raise OrtError(f"{Path(path).name}: {name} has shape {specs[name].shape} but the bundle's decoder "
                           f"config needs [{shown}]: the graph comes from another model; {REEXPORT}")


class _GraphsOrPlain:
    """`cuda_graphs` / `cuda_graph_error` of a session that replays CUDA graphs (`self._graphs`)
    where onnxruntime can capture them, and otherwise runs plainly with the same results."""

    _graphs = None
    cuda_graph_error: str | None = None

    @property
    def cuda_graphs(self) -> bool:
        """Whether calls are replayed as CUDA graphs (else `cuda_graph_error` may say why not)."""
        return self._graphs is not None

    def _start_graphs(self, make) -> None:
        try:
            self._graphs = make()
        except Exception as exc:  # noqa: BLE001 - e.g. nodes that onnxruntime keeps on the CPU
            self._graphs_off(exc)

    def _graphs_off(self, exc: BaseException) -> None:
        self.cuda_graph_error = first_line(exc)
        self._graphs = None

    _SESSIONS: tuple[str, ...] = ()   # the attributes that hold onnxruntime sessions and buffers

    def close(self) -> None:
        """Let go of the onnxruntime sessions and device buffers. onnxruntime has no close of its
        own: a session frees its memory (GPU memory included) when the last reference goes, so
        this drops ours at once, even while something (an error's traceback) still holds this
        object. Idempotent; not usable afterwards."""
        self._graphs = None
        for name in self._SESSIONS:
            setattr(self, name, None)


class OrtDecoderSession(_GraphsOrPlain):
    """DecoderSession over the prefill/step ONNX graphs (fp32 or fp16 cache)."""

    _SESSIONS = ("_prefill", "_step", "_graph_prefill", "_graph_step", "_cache", "_buffers")

    def __init__(self, prefill_path, step_path, config: DecoderConfig, *, provider: str = "cpu",
                 threads: int | None = None, device_id: int = 0, optimize: bool | None = None,
                 iobinding: bool | None = None, cuda_graph: bool = True):
        """iobinding: None = only with "cuda" (keeps the cache on the device); True on the CPU
        runs the same binding code against host memory (used by the tests).
        cuda_graph (CUDA only): replay the prefill and the step as CUDA graphs (`_DecoderGraphs`);
        falls back to plain IOBinding if onnxruntime cannot capture them."""
        self.config = config
        self.provider, self.device_id = provider, device_id
        kw = dict(threads=threads, device_id=device_id, optimize=optimize)
        self._prefill = make_session(prefill_path, provider, **kw)
        self._step = make_session(step_path, provider, **kw)
        _check_io(self._prefill, prefill_path, PREFILL_INPUTS, SCORE_OUTPUTS + ("kv_cache",))
        _check_io(self._step, step_path, STEP_INPUTS, SCORE_OUTPUTS + ("kv_cache_out",))
        outs = {o.name: o for o in self._step.get_outputs()}
        self.topk = int(outs["topk_ids"].shape[1])
        cache = {i.name: i for i in self._step.get_inputs()}["kv_cache"]
        self.cache_dtype = ORT_DTYPES[cache.type]
        # Both graphs against the bundle's decoder config, now rather than mid-classification
        # (graphs of another model in a re-hashed manifest load fine and fail on first use).
        cache_dims = list(config.cache_shape(None))
        _check_dims(self._prefill, prefill_path, {"embedding": [None, config.embed_dim], "kv_cache": cache_dims,
                                                  "topk_ids": [None, self.topk]})
        _check_dims(self._step, step_path, {"kv_cache": cache_dims, "kv_cache_out": cache_dims})
        self.iobinding = (provider == "cuda") if iobinding is None else bool(iobinding)
        self._device = "cuda" if provider == "cuda" else "cpu"
        self._ort = import_ort(provider)
        self._cache = None          # np.ndarray (plain run) or OrtValue (IOBinding)
        self._buffers: list = []    # the two ping-pong OrtValues of the current row count
        if provider == "cuda" and cuda_graph:
            def graphs():
                self._graph_prefill = make_session(prefill_path, provider, cuda_graph=True, **kw)
                self._graph_step = make_session(step_path, provider, cuda_graph=True, **kw)
                return _DecoderGraphs(self)
            self._start_graphs(graphs)

    @property
    def drops_finished_rows(self) -> bool:
        """Whether search may step only the unfinished beams (search.beam_search). Not while
        steps replay CUDA graphs: those are keyed by row count and read fixed buffers, so a step
        with fewer rows than the cache it reads would run uncaptured (and allocate new buffers)."""
        return self._graphs is None

    # --- inputs -----------------------------------------------------------------------------
    @staticmethod
    def _common(temperature, cand_ids, rows):
        cand = np.ascontiguousarray(cand_ids, dtype=np.int64)
        if cand.ndim != 2 or cand.shape[0] != rows:
            raise ValueError(f"cand_ids must have shape [{rows}, G], got {cand.shape}")
        return np.array([temperature], np.float32), cand

    def _scores(self, values) -> StepScores:
        return StepScores(*values[:3])

    # --- DecoderSession ---------------------------------------------------------------------
    @property
    def reads_device_embeddings(self) -> bool:
        """Whether `prefill` binds `DeviceEmbeddings` in place (IOBinding without CUDA graphs: a
        captured prefill reads its own fixed input buffer, which only a host copy can fill)."""
        return self.iobinding and self._graphs is None

    def prefill(self, embeds, temperature: float, cand_ids) -> StepScores:
        """embeds: f32 [B, F] on the host, or `DeviceEmbeddings` (read in place where
        `reads_device_embeddings`, else copied to the host first)."""
        if isinstance(embeds, DeviceEmbeddings) and not self.reads_device_embeddings:
            embeds = embeds.numpy()
        if not isinstance(embeds, DeviceEmbeddings):
            embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        temp, cand = self._common(temperature, cand_ids, len(embeds))
        feeds = {"embedding": embeds, "temperature": temp, "cand_ids": cand}
        if not self.iobinding:
            *scores, self._cache = self._prefill.run(list(SCORE_OUTPUTS) + ["kv_cache"], feeds)
            return self._scores(scores)
        self._buffers = []
        if self._graphs is not None:
            try:
                return self._graphs.prefill(feeds)
            except Exception as exc:  # noqa: BLE001 - capture failed at run time: go on without
                self._graphs_off(exc)
        # The cache output is allocated by onnxruntime on the device; steps then ping-pong.
        scores, self._cache = self._run_bound(self._prefill, feeds, "kv_cache", None)
        return self._scores(scores)

    def step(self, tokens, position: int, beam_idx, temperature: float, cand_ids) -> StepScores:
        if self._cache is None:
            raise RuntimeError("step() before prefill()")
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        beam_idx = np.ascontiguousarray(beam_idx, dtype=np.int64).reshape(-1)
        if beam_idx.shape != tokens.shape:
            raise ValueError(f"tokens {tokens.shape} and beam_idx {beam_idx.shape} must have one entry per row")
        temp, cand = self._common(temperature, cand_ids, len(tokens))
        feeds = {"tokens": tokens, "position": np.array([position], np.int64),
                 "beam_idx": beam_idx, "temperature": temp, "cand_ids": cand}
        if not self.iobinding:
            feeds["kv_cache"] = self._cache
            *scores, self._cache = self._step.run(list(SCORE_OUTPUTS) + ["kv_cache_out"], feeds)
            return self._scores(scores)
        if self._graphs is not None:
            try:
                return self._graphs.step(feeds)
            except Exception as exc:  # noqa: BLE001 - capture failed at run time: go on without
                self._graphs_off(exc)
                if self._cache is None:
                    raise
        scores, self._cache = self._run_bound(self._step, feeds, "kv_cache_out",
                                              self._next_buffer(len(tokens)))
        return self._scores(scores)

    # --- IOBinding --------------------------------------------------------------------------
    def _next_buffer(self, rows: int):
        """A cache buffer for `rows` rows that is not the current cache: two ping-pong while the
        row count stays; a new count (search drops finished beams) starts over with one."""
        shape = list(self.config.cache_shape(rows))
        if self._buffers and list(self._buffers[0].shape()) != shape:
            self._buffers = []
        for buffer in self._buffers:
            if buffer is not self._cache:
                return buffer
        make = self._ort.OrtValue.ortvalue_from_shape_and_type
        self._buffers.append(make(shape, self.cache_dtype, self._device, self.device_id))
        return self._buffers[-1]

    def _run_bound(self, session, feeds, cache_out: str, out_buffer):
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, DeviceEmbeddings):   # already on the device: read in place
                binding.bind_ortvalue_input(name, value.value)
            else:
                binding.bind_cpu_input(name, value)  # small host arrays; copied to the device by ORT
        if "kv_cache" in {i.name for i in session.get_inputs()}:
            binding.bind_ortvalue_input("kv_cache", self._cache)
        for name in SCORE_OUTPUTS:
            binding.bind_output(name, "cpu")  # only the scores come back to the host
        if out_buffer is None:
            binding.bind_output(cache_out, self._device, self.device_id)
        else:
            binding.bind_ortvalue_output(cache_out, out_buffer)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in binding order: the scores, then the cache
        scores = [outputs[i].numpy() for i in range(len(SCORE_OUTPUTS))]
        return scores, (outputs[len(SCORE_OUTPUTS)] if out_buffer is None else out_buffer)


class _CapturedRuns:
    """Runs onnxruntime sessions as CUDA graphs (``enable_cuda_graph``) from fixed buffers.

    A captured graph replays with the device addresses it was captured with. So every buffer is
    allocated once per key (`buffer`), and `run` checks that a graph is always bound to the same
    buffers: a mismatch would replay against stale memory and give wrong results silently, so it
    raises instead, and the caller falls back to plain runs. Graph ids start at 1; -1 runs
    uncaptured (onnxruntime's convention)."""

    reuse_bindings = True   # a graph's IOBinding and RunOptions are made once (fewer host calls per run)

    def __init__(self, ort, device: str, device_id: int):
        self._ort, self.device, self.device_id = ort, device, device_id
        self.buffers: dict[tuple, object] = {}
        self.ids: dict[tuple, int] = {}
        self._bound: dict[int, dict] = {}
        self._bindings: dict[int, tuple] = {}   # graph id -> (IOBinding, RunOptions)

    def buffer(self, key: tuple, shape, dtype):
        if key not in self.buffers:
            self.buffers[key] = self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), dtype, self.device, self.device_id)
        return self.buffers[key]

    def run(self, session, inputs: dict, outputs: dict, graph: tuple | None) -> None:
        """Run `session` on bound OrtValues as captured graph `graph` (None: uncaptured)."""
        graph_id = -1
        if graph is not None:
            graph_id = self.ids.setdefault(graph, len(self.ids) + 1)
            addresses = {name: value.data_ptr() for name, value in {**inputs, **outputs}.items()}
            if self._bound.setdefault(graph_id, addresses) != addresses:
                raise RuntimeError(f"CUDA graph {graph} was bound to other buffers than it was captured with")
        # A graph always runs on the same buffers (checked above), so its binding is kept.
        cached = self._bindings.get(graph_id) if graph_id > 0 and self.reuse_bindings else None
        if cached is None:
            cached = self._bind(session, inputs, outputs, graph_id)
            if graph_id > 0:
                self._bindings[graph_id] = cached
        binding, run_options = cached
        # update_inplace copies on the default CUDA stream; onnxruntime computes on its own
        # non-blocking stream, so wait for the copies before the replay reads the buffers.
        binding.synchronize_inputs()
        session.run_with_iobinding(binding, run_options)

    def _bind(self, session, inputs: dict, outputs: dict, graph_id: int) -> tuple:
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        run_options = self._ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return binding, run_options


class _DecoderGraphs:
    """The prefill and the step replayed as CUDA graphs (`_CapturedRuns`).

    Buffers: inputs and scores per (graph, rows N, candidates G); the prefill's cache per batch
    size M; the two ping-pong step caches A/B per N (guided search changes G from step to step,
    the cache flows on). New host values are copied into the buffers (``update_inplace``) and the
    scores read back from them. One graph per (N, G, source): the prefill, and steps reading the
    prefill's cache (the first step), A or B. Uncaptured, the first step took 2.4 ms against
    0.66 ms for a captured one on an H100 (docs/benchmarks.md "GPU", run 2). A step whose cache
    is none of those buffers runs uncaptured into A. Per call the host does: a few tiny copies
    in, one graph launch, three small copies out.
    """

    INPUTS = {"prefill": PREFILL_INPUTS, "step": tuple(n for n in STEP_INPUTS if n != "kv_cache")}

    def __init__(self, owner: "OrtDecoderSession"):
        self.owner = owner
        self.sessions = {"prefill": owner._graph_prefill, "step": owner._graph_step}
        self.runs = _CapturedRuns(owner._ort, owner._device, owner.device_id)
        self.uncaptured = 0   # steps that ran without a graph (their cache came from elsewhere)

    def _io(self, graph: str, rows: int, cands: int) -> dict:
        """The input and score buffers of `graph` ("prefill" or "step") for one shape."""
        o, cfg = self.owner, self.owner.config
        shapes = {"embedding": ([rows, cfg.embed_dim], np.float32), "tokens": ([rows], np.int64),
                  "position": ([1], np.int64), "beam_idx": ([rows], np.int64),
                  "temperature": ([1], np.float32), "cand_ids": ([rows, cands], np.int64),
                  "topk_logprobs": ([rows, o.topk], np.float32), "topk_ids": ([rows, o.topk], np.int64),
                  "cand_logprobs": ([rows, cands], np.float32)}
        return {name: self.runs.buffer((graph, rows, cands, name), *shapes[name])
                for name in self.INPUTS[graph] + SCORE_OUTPUTS}

    def _cache(self, key: tuple, rows: int):
        o = self.owner
        return self.runs.buffer(key, o.config.cache_shape(rows), o.cache_dtype)

    def _run(self, graph: str, feeds: dict, cache_in, cache_out, source) -> StepScores:
        """Copy `feeds` into the buffers of this shape and run graph `source` (None: uncaptured)."""
        rows, cands = feeds["cand_ids"].shape
        io = self._io(graph, rows, cands)
        inputs = {name: io[name] for name in self.INPUTS[graph]}
        for name, value in inputs.items():
            value.update_inplace(np.ascontiguousarray(feeds[name]))
        if cache_in is not None:
            inputs["kv_cache"] = cache_in
        outputs = {name: io[name] for name in SCORE_OUTPUTS}
        outputs["kv_cache" if graph == "prefill" else "kv_cache_out"] = cache_out
        self.runs.run(self.sessions[graph], inputs, outputs,
                      None if source is None else (graph, rows, cands, source))
        self.owner._cache = cache_out
        return StepScores(*(io[name].numpy() for name in SCORE_OUTPUTS))

    def prefill(self, feeds: dict) -> StepScores:
        rows = len(feeds["embedding"])
        return self._run("prefill", feeds, None, self._cache(("prefill cache", rows), rows), "embedding")

    def step(self, feeds: dict) -> StepScores:
        current = self.owner._cache
        rows = len(feeds["tokens"])
        a, b = (self._cache((side, rows), rows) for side in ("A", "B"))
        images = current.shape()[2]   # the cache's row count: the prefill's batch size, if it is its cache
        if current is a or current is b:
            src, dst, source = (a, b, "A") if current is a else (b, a, "B")
        elif current is self.runs.buffers.get(("prefill cache", images)):   # the first step after a prefill
            src, dst, source = current, a, f"prefill{images}"
        else:   # a cache from elsewhere: run uncaptured, write side A
            src, dst, source = current, a, None
            self.uncaptured += 1
        return self._run("step", feeds, src, dst, source)


class OrtImageEncoder(_GraphsOrPlain):
    """pixels f32[B,3,H,W] (preprocessed) -> unit embeddings f32[B,F]; a graph with a uint8 input
    (`takes_uint8`) takes the resized, cropped pixels u8[B,H,W,3] instead.

    cuda_graph (CUDA only): batches of up to GRAPH_BUCKETS[-1] images are padded to the next
    bucket and replayed as CUDA graphs (`_EncoderGraphs`, its own session: the weights are held
    twice on the GPU, as for the decoder step); larger batches are compute-bound and run plainly.
    Falls back to plain runs if onnxruntime cannot capture the graph. Not yet measured on a GPU:
    bench/gpu_check.py times both paths side by side."""

    _SESSIONS = ("_session",)

    def __init__(self, path, *, provider: str = "cpu", threads: int | None = None,
                 device_id: int = 0, optimize: bool | None = None, cuda_graph: bool = True,
                 device_output: bool | None = None):
        """device_output: `embed_on_device` may leave embeddings on the device (None: with "cuda";
        True on the CPU runs the same binding code against host memory, for the tests)."""
        kw = dict(threads=threads, device_id=device_id, optimize=optimize)
        self._session = make_session(path, provider, **kw)
        (inp,), (out,) = self._session.get_inputs(), self._session.get_outputs()
        self._input, self._output, self._output_type = inp.name, out.name, out.type
        self.device_output = (provider == "cuda") if device_output is None else bool(device_output)
        self._device, self._device_id = ("cuda" if provider == "cuda" else "cpu"), device_id
        self.takes_uint8 = inp.type == "tensor(uint8)"
        self._dtype = np.uint8 if self.takes_uint8 else np.float32
        self.image_size = tuple(inp.shape[1:3] if self.takes_uint8 else inp.shape[2:4])   # (H, W)
        self.embed_dim = out.shape[1]
        if provider == "cuda" and cuda_graph:
            self._start_graphs(lambda: _EncoderGraphs(make_session(path, provider, cuda_graph=True, **kw),
                                                      import_ort(provider), device_id))

    def _checked(self, pixels) -> np.ndarray:
        h, w = self.image_size
        want = (h, w, 3) if self.takes_uint8 else (3, h, w)
        if self.takes_uint8 and np.asarray(pixels).dtype != np.uint8:
            raise ValueError(f"this image encoder takes uint8 pixels [B, {h}, {w}, 3] (normalised in the graph), "
                             f"got {np.asarray(pixels).dtype}")
        pixels = np.ascontiguousarray(pixels, dtype=self._dtype)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"pixels must have shape [B, {', '.join(map(str, want))}], got {pixels.shape}")
        return pixels

    def embed_on_device(self, pixels) -> DeviceEmbeddings | None:
        """Like calling the encoder, but the embeddings stay on the device (`DeviceEmbeddings`),
        for a decoder that `reads_device_embeddings`. None where this encoder cannot leave them
        there: a batch replayed as a CUDA graph (its output buffer is rewritten by the next batch,
        which another thread may encode before this batch's prefill has read it), or an encoder
        whose embeddings are not fp32 (the prefill's input type)."""
        pixels = self._checked(pixels)
        if not self.device_output or self._output_type != "tensor(float)" or (
                self._graphs is not None and len(pixels) <= GRAPH_BUCKETS[-1]):
            return None
        binding = self._session.io_binding()
        binding.bind_cpu_input(self._input, pixels)
        binding.bind_output(self._output, self._device, self._device_id)   # allocated anew: this batch's own
        self._session.run_with_iobinding(binding)
        return DeviceEmbeddings(binding.get_outputs()[0])

    def __call__(self, pixels) -> np.ndarray:
        pixels = self._checked(pixels)
        if self._graphs is not None and 0 < len(pixels) <= GRAPH_BUCKETS[-1]:
            try:
                return self._graphs(pixels)
            except Exception as exc:  # noqa: BLE001 - capture failed at run time: go on without
                self._graphs_off(exc)
        return self._session.run([self._output], {self._input: pixels})[0]


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32)   # images per captured encoder graph


class _EncoderGraphs:
    """The image encoder replayed as CUDA graphs (`_CapturedRuns`), one per batch bucket.

    A ViT runs a few hundred kernels; at small batches their launches, not the arithmetic, set
    the time (measured on an H100: 4.3 ms for one image on plain onnxruntime-cuda, fp16). Each
    bucket (GRAPH_BUCKETS) has its own input and output buffers; a batch is copied into the
    smallest bucket that holds it (the padding rows are zeros and their outputs are dropped:
    images do not interact in the encoder)."""

    def __init__(self, session, ort, device_id: int = 0, device: str = "cuda"):
        self.session = session
        self.runs = _CapturedRuns(ort, device, device_id)
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        self.input, self.output = inp.name, out.name
        self.in_shape, self.embed_dim = [int(d) for d in inp.shape[1:]], int(out.shape[1])
        self.in_dtype, self.out_dtype = ORT_DTYPES[inp.type], ORT_DTYPES[out.type]
        self.host: dict[int, np.ndarray] = {}   # per bucket: the padded batch before upload

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        bucket = next(b for b in GRAPH_BUCKETS if b >= n)
        if bucket not in self.host:
            self.host[bucket] = np.zeros([bucket, *self.in_shape], self.in_dtype)
        host = self.host[bucket]
        host[:n] = pixels
        host[n:] = 0
        src = self.runs.buffer(("pixels", bucket), [bucket, *self.in_shape], self.in_dtype)
        dst = self.runs.buffer(("embedding", bucket), [bucket, self.embed_dim], self.out_dtype)
        src.update_inplace(host)
        self.runs.run(self.session, {self.input: src}, {self.output: dst}, ("bucket", bucket))
        return dst.numpy()[:n].astype(np.float32)   # a copy: the buffer is rewritten by the next call
