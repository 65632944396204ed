"""TensorRT planning without TensorRT: optimization profiles and the device-buffer plan.

Pure numpy-free arithmetic over the graph signatures recorded in the bundle manifest and the
decoder config, shared by the engine builder (``novic.export.tensorrt``: one optimization profile
per batch bucket) and the TensorRT backend (``novic.runtime.backends.trt``: preallocated buffers,
input shapes per call, ping-pong KV-cache buffers, one CUDA graph per bucket). Keeping it here
means both sides agree by construction and the arithmetic is unit-tested on machines without a
GPU (tests/test_trt_plan.py).

Batch buckets. Buckets are given in images (default 1, 8, 32, 256). The image encoder and the
decoder prefill run on images; the decoder step runs on rows = images x beams, so its buckets are
the image buckets times the beam width (greedy uses rows = images, which the same row buckets
cover). Profile i accepts batch sizes (bucket[i-1], bucket[i]] and is tuned for bucket[i]
(opt = max): the runtime pads a batch up to its bucket, so every call runs at a shape the engine
was tuned for and the CUDA graph captured for that bucket can be replayed.

Shapes follow docs/internals.md "ONNX graph I/O". Symbolic dims: B (images), N (rows of this
step), M (rows of the previous call's cache: B after the prefill, N afterwards), G (candidate ids
per row for guided search; 1 when unused). The cache tensor [L, 2, rows, heads, Smax, hd] keeps
the batch on axis 2, so a buffer written with R rows must be read back as exactly R rows (the
layer/key-value axes are outside it): the plan therefore tracks M separately from N.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

DEFAULT_BUCKETS = (1, 8, 32, 256)
DEFAULT_BEAM_WIDTH = 10
# Guided search asks for the log-probs of a node's children (cand_ids [rows, G]); at the trie root
# that is every first token of every noun, so G may approach V at the prefill. The step graph is
# planned for up to STEP_MAX_CANDS per row by default (a caller with more calls it in chunks).
STEP_MAX_CANDS = 1024
OPT_CANDS = 64

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1,
            "uint8": 1, "bool": 1, "float64": 8}

ENCODER, PREFILL, STEP = "image_encoder", "decoder_prefill", "decoder_step"

# Which axis of which tensor is which batch variable (docs/internals.md).
PREFILL_AXES = {"embedding": {0: "B"}, "cand_ids": {0: "B", 1: "G"}, "topk_logprobs": {0: "B"},
                "topk_ids": {0: "B"}, "cand_logprobs": {0: "B", 1: "G"}, "kv_cache": {2: "B"}}
STEP_AXES = {"tokens": {0: "N"}, "beam_idx": {0: "N"}, "kv_cache": {2: "M"}, "cand_ids": {0: "N", 1: "G"},
             "topk_logprobs": {0: "N"}, "topk_ids": {0: "N"}, "cand_logprobs": {0: "N", 1: "G"},
             "kv_cache_out": {2: "N"}}
PREFILL_IO = (("embedding", "temperature", "cand_ids"), ("topk_logprobs", "topk_ids", "cand_logprobs", "kv_cache"))
STEP_IO = (("tokens", "position", "beam_idx", "kv_cache", "temperature", "cand_ids"),
           ("topk_logprobs", "topk_ids", "cand_logprobs", "kv_cache_out"))


class PlanError(ValueError):
    """A signature or parameter that does not fit the plan (message names the tensor)."""


# --- buckets ------------------------------------------------------------------------------------
def normalize_buckets(buckets) -> tuple[int, ...]:
    """Sorted, unique, positive ints; accepts "1,8,32" too."""
    if isinstance(buckets, str):
        try:
            buckets = [int(b) for b in buckets.replace(" ", "").split(",") if b]
        except ValueError:
            raise PlanError(f"buckets {buckets!r}: expected comma-separated integers like 1,8,32,256") from None
    out = sorted({int(b) for b in buckets})
    if not out or out[0] < 1:
        raise PlanError(f"buckets {list(buckets)}: need at least one, all >= 1")
    return tuple(out)


def bucket_for(n: int, buckets) -> int:
    """Smallest bucket >= n."""
    if n < 1:
        raise PlanError(f"batch size {n} must be >= 1")
    for b in buckets:
        if n <= b:
            return b
    raise PlanError(f"batch size {n} exceeds the largest bucket {buckets[-1]}; split the batch or "
                    f"rebuild the engines with larger --buckets")


def row_buckets(image_buckets, beam_width: int) -> tuple[int, ...]:
    """Decoder step buckets: rows = images x beams."""
    if beam_width < 1:
        raise PlanError(f"beam width {beam_width} must be >= 1")
    return tuple(b * beam_width for b in normalize_buckets(image_buckets))


# --- tensors and graph plans ---------------------------------------------------------------------
@dataclass(frozen=True)
class TensorPlan:
    """One I/O tensor: its dims are ints or batch-variable names resolved per call."""

    name: str
    io: str                 # "input" | "output"
    dtype: str
    template: tuple

    @property
    def itemsize(self) -> int:
        try:
            return ITEMSIZE[self.dtype]
        except KeyError:
            raise PlanError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}") from None

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(d for d in self.template if isinstance(d, str))

    def shape(self, dims: dict) -> tuple[int, ...]:
        try:
            return tuple(int(dims[d]) if isinstance(d, str) else int(d) for d in self.template)
        except KeyError as exc:
            raise PlanError(f"tensor {self.name!r}: no value for dim {exc.args[0]!r}") from None

    def nbytes(self, dims: dict) -> int:
        return prod(self.shape(dims)) * self.itemsize


@dataclass(frozen=True)
class Profile:
    """One optimization profile: batches (lo, bucket] of the graph's batch variable."""

    index: int
    bucket: int
    lo: int
    shapes: dict            # input name -> (min, opt, max) shapes (tuples of ints)

    def to_dict(self) -> dict:
        return {"index": self.index, "bucket": self.bucket, "min_batch": self.lo,
                "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


@dataclass(frozen=True)
class GraphPlan:
    role: str
    batch_var: str                      # "B" (encoder, prefill) or "N" (step)
    buckets: tuple[int, ...]
    tensors: tuple[TensorPlan, ...]
    ranges: dict                        # variable -> (min, opt-or-None, max) outside the batch var
    profiles: tuple[Profile, ...] = field(default=())

    @property
    def inputs(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.io == "input")

    @property
    def outputs(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.io == "output")

    def tensor(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise PlanError(f"{self.role}: no tensor {name!r}")

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, n: int) -> int:
        return bucket_for(n, self.buckets)

    def profile_index(self, n: int) -> int:
        return self.buckets.index(self.bucket_for(n))

    def dims(self, batch: int, **others) -> dict:
        """Concrete dims for a call with `batch` (already padded or not) and the other variables."""
        dims = {self.batch_var: int(batch)}
        for var, (lo, _opt, hi) in self.ranges.items():
            value = int(others.get(var, lo))
            if not lo <= value <= hi:
                raise PlanError(f"{self.role}: {var}={value} is outside the planned range [{lo}, {hi}]")
            dims[var] = value
        if batch > self.max_batch:
            bucket_for(batch, self.buckets)  # raises with the fix
        return dims

    def shapes(self, batch: int, **others) -> dict:
        dims = self.dims(batch, **others)
        return {t.name: t.shape(dims) for t in self.tensors}

    def max_dims(self) -> dict:
        return {self.batch_var: self.max_batch, **{v: hi for v, (_lo, _o, hi) in self.ranges.items()}}

    def max_nbytes(self, name: str) -> int:
        return self.tensor(name).nbytes(self.max_dims())


def _tensors_from_signature(signature: dict, axes: dict, expected: dict, role: str, io_names) -> tuple:
    """Check a manifest signature against the contract and return TensorPlans.

    `axes`: tensor -> {axis: variable}; `expected`: tensor -> full expected shape (ints, with the
    variables' axes ignored). A variable axis must be symbolic in the graph (else no dynamic batch);
    a fixed axis must match the config."""
    out = []
    want_in, want_out = io_names
    for io, names in (("input", want_in), ("output", want_out)):
        have = {t["name"]: t for t in signature.get(io + "s", [])}
        for name in names:
            if name not in have:
                raise PlanError(f"{role}: the graph has no {io} {name!r} (has {sorted(have)}); "
                                "re-export with novic-export onnx")
            t = have[name]
            shape = list(t["shape"])
            exp = expected[name]
            if len(shape) != len(exp):
                raise PlanError(f"{role}: {io} {name!r} has rank {len(shape)}, expected {len(exp)} {exp}")
            template = []
            for axis, (got, want) in enumerate(zip(shape, exp)):
                var = axes.get(name, {}).get(axis)
                if var is not None:
                    if isinstance(got, int) and got > 0:
                        raise PlanError(f"{role}: {io} {name!r} axis {axis} is fixed to {got}; it must be "
                                        f"dynamic ({var}) for batch buckets")
                    template.append(var)
                else:
                    if isinstance(got, int) and got > 0 and got != want:
                        raise PlanError(f"{role}: {io} {name!r} axis {axis} is {got}, the config says {want}")
                    template.append(int(want))
            out.append(TensorPlan(name, io, str(t["dtype"]), tuple(template)))
    return tuple(out)


def _with_profiles(plan: GraphPlan) -> GraphPlan:
    profiles = []
    lo = 1
    for i, bucket in enumerate(plan.buckets):
        shapes = {}
        for t in plan.inputs:
            if not t.variables:
                s = t.shape({})
                shapes[t.name] = (s, s, s)
                continue
            mins = {plan.batch_var: lo}
            opts = {plan.batch_var: bucket}
            maxs = {plan.batch_var: bucket}
            for var, (vlo, vopt, vhi) in plan.ranges.items():
                mins[var], maxs[var] = vlo, vhi
                opts[var] = bucket if vopt is None else vopt
            shapes[t.name] = (t.shape(mins), t.shape(opts), t.shape(maxs))
        profiles.append(Profile(i, bucket, lo, shapes))
        lo = bucket + 1
    return GraphPlan(plan.role, plan.batch_var, plan.buckets, plan.tensors, plan.ranges, tuple(profiles))


# --- the three graphs ----------------------------------------------------------------------------
def plan_encoder(signature: dict, buckets=DEFAULT_BUCKETS, image_size=None) -> GraphPlan:
    """Image encoder: one input [B,3,H,W] (name from the signature), one output [B,F]."""
    buckets = normalize_buckets(buckets)
    ins, outs = signature.get("inputs", []), signature.get("outputs", [])
    if len(ins) != 1 or len(outs) != 1:
        raise PlanError(f"{ENCODER}: expected one input and one output, got {len(ins)} and {len(outs)}")
    x, y = ins[0], outs[0]
    shape = list(x["shape"])
    if len(shape) != 4:
        raise PlanError(f"{ENCODER}: input {x['name']!r} has rank {len(shape)}, expected 4 [B,3,H,W]")
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for axis, want in ((2, h), (3, w)):
            if isinstance(shape[axis], int) and shape[axis] > 0 and shape[axis] != want:
                raise PlanError(f"{ENCODER}: input {x['name']!r} axis {axis} is {shape[axis]}, preprocessing says {want}")
            shape[axis] = want
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise PlanError(f"{ENCODER}: input {x['name']!r} shape {x['shape']} needs static C,H,W (pass image_size)")
    yshape = list(y["shape"])
    if len(yshape) != 2 or not (isinstance(yshape[1], int) and yshape[1] > 0):
        raise PlanError(f"{ENCODER}: output {y['name']!r} shape {y['shape']} must be [B, F] with F fixed")
    for t, s in ((x, shape), (y, yshape)):
        if isinstance(s[0], int) and s[0] > 0:
            raise PlanError(f"{ENCODER}: {t['name']!r} axis 0 is fixed to {s[0]}; it must be dynamic (B)")
    tensors = (TensorPlan(x["name"], "input", str(x["dtype"]), ("B", *shape[1:])),
               TensorPlan(y["name"], "output", str(y["dtype"]), ("B", yshape[1])))
    return _with_profiles(GraphPlan(ENCODER, "B", buckets, tensors, {}))


def plan_prefill(signature: dict, cfg, topk: int, buckets=DEFAULT_BUCKETS, max_cands: int | None = None,
                 opt_cands: int = OPT_CANDS) -> GraphPlan:
    buckets = normalize_buckets(buckets)
    g_max = cfg.vocab_size if max_cands is None else int(max_cands)
    _check_cands(g_max, opt_cands)
    expected = {"embedding": (0, cfg.embed_dim), "temperature": (1,), "cand_ids": (0, 0),
                "topk_logprobs": (0, topk), "topk_ids": (0, topk), "cand_logprobs": (0, 0),
                "kv_cache": cfg.cache_shape(0)}
    tensors = _tensors_from_signature(signature, PREFILL_AXES, expected, PREFILL, PREFILL_IO)
    ranges = {"G": (1, min(opt_cands, g_max), g_max)}
    return _with_profiles(GraphPlan(PREFILL, "B", buckets, tensors, ranges))


def plan_step(signature: dict, cfg, topk: int, buckets=DEFAULT_BUCKETS, beam_width: int = DEFAULT_BEAM_WIDTH,
              max_cands: int | None = None, opt_cands: int = OPT_CANDS) -> GraphPlan:
    """Step graph over rows; `buckets` are image buckets (multiplied by the beam width here)."""
    rows = row_buckets(buckets, beam_width)
    g_max = min(cfg.vocab_size, STEP_MAX_CANDS) if max_cands is None else int(max_cands)
    _check_cands(g_max, opt_cands)
    expected = {"tokens": (0,), "position": (1,), "beam_idx": (0,), "kv_cache": cfg.cache_shape(0),
                "temperature": (1,), "cand_ids": (0, 0), "topk_logprobs": (0, topk), "topk_ids": (0, topk),
                "cand_logprobs": (0, 0), "kv_cache_out": cfg.cache_shape(0)}
    tensors = _tensors_from_signature(signature, STEP_AXES, expected, STEP, STEP_IO)
    # M (previous rows) is independent of N: B after the prefill, N later, anything <= max rows.
    ranges = {"M": (1, None, rows[-1]), "G": (1, min(opt_cands, g_max), g_max)}
    return _with_profiles(GraphPlan(STEP, "N", rows, tensors, ranges))


def _check_cands(g_max, opt):
    if g_max < 1 or opt < 1:
        raise PlanError(f"max_cands={g_max} and opt_cands={opt} must be >= 1")


# --- device buffers of a decoder session -----------------------------------------------------------
@dataclass(frozen=True)
class Buffer:
    """One preallocated device buffer, sized for the largest bucket; `host` = has a pinned mirror."""

    name: str
    dtype: str
    shape: tuple
    nbytes: int
    host: bool


KV_A, KV_B = "kv_cache_a", "kv_cache_b"


@dataclass(frozen=True)
class DecoderBuffers:
    """Buffers shared by the prefill and step engines of one session.

    The cache lives in two ping-pong buffers: the prefill writes KV_A; step t (t = 1, 2, ...)
    reads the buffer written by the call before it and writes the other one, so input and output
    never alias and nothing is copied between steps. Score outputs are the only tensors copied
    back to the host (topk_logprobs, topk_ids, cand_logprobs)."""

    buffers: dict           # name -> Buffer
    prefill_bindings: dict  # tensor -> buffer
    step_static: dict       # step tensors other than the cache -> buffer

    def step_bindings(self, step: int) -> dict:
        src, dst = self.cache_pair(step)
        return {**self.step_static, "kv_cache": src, "kv_cache_out": dst}

    @staticmethod
    def cache_pair(step: int) -> tuple[str, str]:
        """(read, write) cache buffers of step `step` (1-based; the prefill is step 0 and writes KV_A)."""
        if step < 1:
            raise PlanError(f"step {step}: steps count from 1 (the prefill is step 0)")
        return (KV_A, KV_B) if step % 2 == 1 else (KV_B, KV_A)

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    @property
    def host_outputs(self) -> tuple[str, ...]:
        return tuple(n for n, b in self.buffers.items() if b.host and n in ("topk_logprobs", "topk_ids", "cand_logprobs"))


def plan_decoder_buffers(prefill: GraphPlan, step: GraphPlan) -> DecoderBuffers:
    if prefill.tensor("kv_cache").dtype != step.tensor("kv_cache").dtype:
        raise PlanError("prefill and step graphs disagree on the cache dtype "
                        f"({prefill.tensor('kv_cache').dtype} vs {step.tensor('kv_cache').dtype})")
    pmax, smax = prefill.max_dims(), step.max_dims()
    sizes: dict[str, tuple] = {}

    def want(buffer: str, t: TensorPlan, dims: dict, host: bool):
        shape = t.shape(dims)
        nbytes = prod(shape) * t.itemsize
        old = sizes.get(buffer)
        if old is not None:
            if old[0] != t.dtype:
                raise PlanError(f"buffer {buffer!r} is used with dtypes {old[0]} and {t.dtype}")
            if old[2] >= nbytes:
                return
        sizes[buffer] = (t.dtype, shape, nbytes, host or (old[3] if old else False))

    host_inputs = {"embedding", "temperature", "cand_ids", "tokens", "position", "beam_idx"}
    prefill_bindings = {}
    for t in prefill.tensors:
        buf = KV_A if t.name == "kv_cache" else t.name
        prefill_bindings[t.name] = buf
        want(buf, t, pmax, host=t.name in host_inputs or t.name in SCORE_NAMES)
    step_static = {}
    for t in step.tensors:
        if t.name in ("kv_cache", "kv_cache_out"):
            want(KV_A, t, smax, host=False)
            want(KV_B, t, smax, host=False)
            continue
        step_static[t.name] = t.name
        want(t.name, t, smax, host=t.name in host_inputs or t.name in SCORE_NAMES)
    buffers = {n: Buffer(n, d, s, b, h) for n, (d, s, b, h) in sizes.items()}
    return DecoderBuffers(buffers, prefill_bindings, step_static)


SCORE_NAMES = ("topk_logprobs", "topk_ids", "cand_logprobs")


def plan_encoder_buffers(encoder: GraphPlan) -> dict:
    dims = encoder.max_dims()
    return {t.name: Buffer(t.name, t.dtype, t.shape(dims), t.nbytes(dims), True) for t in encoder.tensors}


# --- whole-bundle plan (what the builder records and the runtime rebuilds) -------------------------
@dataclass(frozen=True)
class PlanParams:
    """Everything besides the bundle that determines the plan; stored with each engine."""

    buckets: tuple = DEFAULT_BUCKETS
    beam_width: int = DEFAULT_BEAM_WIDTH
    prefill_max_cands: int | None = None     # None: V
    step_max_cands: int | None = None        # None: min(V, STEP_MAX_CANDS)
    opt_cands: int = OPT_CANDS

    def to_dict(self) -> dict:
        return {"buckets": list(self.buckets), "beam_width": self.beam_width,
                "prefill_max_cands": self.prefill_max_cands, "step_max_cands": self.step_max_cands,
                "opt_cands": self.opt_cands}

    @classmethod
    def from_dict(cls, d: dict) -> "PlanParams":
        return cls(normalize_buckets(d.get("buckets", DEFAULT_BUCKETS)), int(d.get("beam_width", DEFAULT_BEAM_WIDTH)),
                   d.get("prefill_max_cands"), d.get("step_max_cands"), int(d.get("opt_cands", OPT_CANDS)))


def plan_graph(role: str, signature: dict, cfg, topk: int, params: PlanParams, image_size=None) -> GraphPlan:
    if role == ENCODER:
        return plan_encoder(signature, params.buckets, image_size)
    if role == PREFILL:
        return plan_prefill(signature, cfg, topk, params.buckets, params.prefill_max_cands, params.opt_cands)
    if role == STEP:
        return plan_step(signature, cfg, topk, params.buckets, params.beam_width, params.step_max_cands,
                         params.opt_cands)
    raise PlanError(f"unknown role {role!r}")


def image_size_from_preprocess(preprocess: dict):
    """(H, W) from the bundle's preprocessing dict, or None if it does not say."""
    size = preprocess.get("image_size") or preprocess.get("size")
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return tuple(int(s) for s in size)


def describe(plan: GraphPlan) -> str:
    """Human summary for logs and the CLI."""
    lines = [f"{plan.role}: buckets {list(plan.buckets)} ({plan.batch_var})"]
    for p in plan.profiles:
        dyn = {k: v for k, v in p.shapes.items() if v[0] != v[2]}
        lines.append(f"  profile {p.index}: {plan.batch_var} in [{p.lo}, {p.bucket}] "
                     + ", ".join(f"{k} {list(v[0])}..{list(v[2])}" for k, v in dyn.items()))
    return "\n".join(lines)
