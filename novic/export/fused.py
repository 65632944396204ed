"""Fused graph variants for onnxruntime: plain ONNX graphs -> graphs with ``com.microsoft`` ops.

onnxruntime runs a plain transformer graph op by op; its contrib ops do a block's work in one
kernel (on CUDA: flash / memory-efficient attention, one-pass residual + LayerNorm). The fused
variants are for onnxruntime only; the plain graphs stay in the bundle for TensorRT and as the
reference. Three rewrites, applied in this order (each one a pass over the graph):

- attention (ours): ``Softmax(q @ k^T * s) @ v`` -> ``MultiHeadAttention``, in the image
  encoders (no mask), the decoder prefill (its mask, when it masks anything, becomes an additive
  ``attention_bias``) and the decoder step. The step scores the token against the fixed-slot
  cache (masked by position) and against its own key, which joins the cache only at the end of
  the step; the fused op gets the cache with that key/value appended as 4-D BNSH key/value
  ([B, h, Smax + 1, hd]) plus the mask as a bias, so the cache write and the step contract stay
  as they are. (MultiHeadAttention's past-key inputs would concatenate the same way, but
  onnxruntime 1.32's CPU kernel gave wrong numbers for them unless the present outputs were
  requested, which copy the whole cache again.) onnxruntime's own clip/vit attention
  fusion matches neither open_clip's nor timm's export, hence our pass; it keeps the graph's own
  head tensors and bypasses the head split/merge where the graph has the usual one.
- residual + LayerNorm (ours): ``LayerNormalization(a + b)`` -> ``SkipLayerNormalization`` (which
  also returns ``a + b`` for the next residual). onnxruntime's fusion needs symbolic shape
  inference, which fails on our L2-normalised output, and it cannot fuse a LayerNorm without a
  bias (the decoder's); the pattern is one node pair, so we match it directly.
- GELU (onnxruntime's fuser, ``onnxruntime.transformers.optimizer`` with only its GELU fusions on):
  the erf GELU -> ``Gelu``, and ``Gelu(x + bias)`` -> ``BiasGelu``. Both are the exact erf GELU;
  the tanh approximation (FastGelu) is not used.

Every fused graph is gated against the plain fp32 graph before it goes into a bundle
(novic.export.fused_gate).
"""
from __future__ import annotations

import collections
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from novic.atomic import move_written_files
from novic.export.decoder_onnx import io_signature
from novic.export.fp16 import DECODER_FP16_IO, FP16_OPS, convert_graph, logits_head

MS_DOMAIN = "com.microsoft"
# The contrib ops a fused graph may hold (tests check that they appear; nothing else is added).
FUSED_OPS = frozenset({"MultiHeadAttention", "SkipLayerNormalization", "Gelu", "BiasGelu"})
# Which fused ops each graph must hold: a fusion that silently stops matching is an error.
EXPECTED = {"image_encoder": ("MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"),
            "decoder_prefill": ("MultiHeadAttention", "SkipLayerNormalization", "Gelu"),
            "decoder_step": ("MultiHeadAttention", "SkipLayerNormalization", "Gelu")}
FUSED_FP16_OPS = FP16_OPS | {"MultiHeadAttention"}


def fused_name(path, precision: str = "fp32") -> str:
    """image_encoder.onnx -> image_encoder.fused.onnx (fp16: image_encoder.fused.fp16.onnx)."""
    p = Path(path)
    return p.stem + ".fused" + (".fp16" if precision == "fp16" else "") + p.suffix


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


class _Graph:
    """Index of a graph under rewrite: producers, consumers, constants, known shapes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.producer = {y: n for n in g.node for y in n.output}
        self.consumers = collections.defaultdict(list)
        for n in g.node:
            for x in n.input:
                self.consumers[x].append(n)
        self.inits = {t.name: t for t in g.initializer}
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                                for d in v.type.tensor_type.shape.dim]
                       for v in list(g.value_info) + list(g.input) + list(g.output)
                       if v.type.tensor_type.HasField("shape")}
        self.new_nodes: list[onnx.NodeProto] = []
        self.dead: set[int] = set()
        self._n = 0

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.consts:
            return numpy_helper.to_array(helper.get_attribute_value(self.consts[name].attribute[0]))
        return None

    def scalar(self, name: str) -> float | None:
        """The value of a one-element float constant, else None."""
        arr = self.constant(name)
        return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 and arr.dtype.kind == "f" else None

    def name(self, base: str) -> str:
        self._n += 1
        return f"fused_{base}_{self._n}"

    def const(self, values, dtype=np.int64) -> str:
        name = self.name("const")
        self.model.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype), name))
        return name

    def add(self, op: str, inputs, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.new_nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), domain=domain, **attrs))
        self.model.graph.value_info.append(helper.make_tensor_value_info(outs[0], TensorProto.FLOAT, None))
        return outs

    def only_consumer(self, name: str, op: str | None = None):
        """The one node that reads `name` (of type `op`, when given), else None."""
        cons = self.consumers.get(name, [])
        return cons[0] if len(cons) == 1 and op in (None, cons[0].op_type) else None

    def finish(self) -> None:
        """Drop dead nodes, add the new ones, drop what nothing reads any more (a head split
        the fused op bypasses, a mask it no longer needs) and sort the graph topologically."""
        g = self.model.graph
        nodes = [n for n in g.node if id(n) not in self.dead] + self.new_nodes
        wanted = {v.name for v in g.output}
        while True:
            read = wanted | {x for n in nodes for x in n.input}
            live = [n for n in nodes if any(y in read for y in n.output)]
            if len(live) == len(nodes):
                break
            nodes = live
        for i in reversed(range(len(g.initializer))):
            if g.initializer[i].name not in read:
                del g.initializer[i]
        ready = {x.name for x in g.input} | {t.name for t in g.initializer} | {""}
        ordered, pending = [], nodes
        while pending:
            rest = []
            for n in pending:
                if all(x in ready for x in n.input):
                    ordered.append(n)
                    ready.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                missing = [x for x in rest[0].input if x not in ready]
                raise RuntimeError(f"fusion left node {rest[0].name} without its inputs {missing}")
            pending = rest
        del g.node[:]
        g.node.extend(ordered)


def _perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _axis(node, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), default)


def _scale_of(graph: _Graph, name: str) -> tuple[str, float]:
    """Strip a Mul/Div by a scalar constant off `name`: -> (the unscaled tensor, the factor)."""
    node = graph.producer.get(name)
    if node is not None and node.op_type in ("Mul", "Div") and len(graph.consumers[name]) == 1:
        for i in (1, 0) if node.op_type == "Mul" else (1,):
            value = graph.scalar(node.input[i])
            if value is not None and value != 0:
                graph.dead.add(id(node))
                return node.input[1 - i], (value if node.op_type == "Mul" else 1.0 / value)
    return name, 1.0


def _ints(graph: _Graph, name: str) -> list[int] | None:
    """The values of an integer constant (Slice starts/ends), else None."""
    arr = graph.constant(name)
    return [int(x) for x in arr.reshape(-1)] if arr is not None and arr.dtype.kind == "i" else None


@dataclass
class _Attention:
    """One matched attention: head tensors [B, h, S, hd] (names in the graph) and what to replace.
    For the decoder step, `k_new`/`v_new` are the token's own key and value, which the plain
    graph scores beside the cache (the cache slots first, then its own)."""
    q: str
    k: str                       # k itself, not k^T
    v: str
    out: str                     # the attention's output [B, h, Sq, hd]
    scale: float
    mask: tuple[str, str] | None = None    # (condition "masked", fill value) of a Where
    k_new: str | None = None
    v_new: str | None = None


def _scores(graph: _Graph, name: str):
    """``(q @ k^T) * s`` -> (q, k^T, s), marking the MatMul and scale dead; None if not that."""
    scores, s_scale = _scale_of(graph, name)
    qk = graph.producer.get(scores)
    if qk is None or qk.op_type != "MatMul" or len(graph.consumers[scores]) != 1:
        return None
    q, q_scale = _scale_of(graph, qk.input[0])
    kt, k_scale = _scale_of(graph, qk.input[1])
    graph.dead.add(id(qk))
    return q, kt, q_scale * k_scale * s_scale


def _unmask(graph: _Graph, name: str):
    """``Where(masked, fill, x)`` (masked_fill) -> (x, (masked, fill)); anything else -> (name, None)."""
    where = graph.producer.get(name)
    if where is None or where.op_type != "Where" or len(graph.consumers[name]) != 1 \
            or graph.scalar(where.input[1]) is None:
        return name, None
    graph.dead.add(id(where))
    return where.input[2], (where.input[0], where.input[1])


def _match_output(graph: _Graph, softmax, slots: int | None):
    """The softmax's consumers -> (v, v_new, output name) or None. Plain: ``weights @ v``. Step
    (`slots` cache slots scored before the token's own key): ``w[..., :slots] @ v_cache +
    w[..., slots:] * v_new``."""
    weights = softmax.output[0]
    if slots is None:
        mm = graph.only_consumer(weights, "MatMul")
        if mm is None or mm.input[0] != weights:
            return None
        graph.dead.add(id(mm))
        return mm.input[1], None, mm.output[0]
    cons = graph.consumers.get(weights, [])
    if len(cons) != 2 or any(c.op_type != "Slice" or len(c.input) < 4 for c in cons):
        return None
    parts = {}
    for sl in cons:
        starts, ends, axes = (_ints(graph, x) for x in sl.input[1:4])
        user = graph.only_consumer(sl.output[0])
        if starts is None or axes not in ([-1], [3]) or user is None:
            return None
        if starts == [0] and ends in ([slots], [-1]) and user.op_type == "MatMul" and user.input[0] == sl.output[0]:
            parts["cache"] = (sl, user, user.input[1])
        elif starts in ([slots], [-1]) and user.op_type == "Mul":
            parts["own"] = (sl, user, user.input[1] if user.input[0] == sl.output[0] else user.input[0])
    if set(parts) != {"cache", "own"}:
        return None
    add = graph.only_consumer(parts["cache"][1].output[0], "Add")
    if add is None or set(add.input) != {parts["cache"][1].output[0],
                                                                  parts["own"][1].output[0]}:
        return None
    graph.dead.update(id(n) for n in (*parts["cache"][:2], *parts["own"][:2], add))
    return parts["cache"][2], parts["own"][2], add.output[0]


def _match(graph: _Graph, softmax) -> _Attention | None:
    """An attention ending in `softmax`, with its scores either plain (encoder), masked
    (prefill) or [masked cache scores, own score] (step); marks its nodes dead."""
    if _axis(softmax, -1) not in (-1, 3) or len(graph.consumers[softmax.input[0]]) != 1:
        return None
    cat = graph.producer.get(softmax.input[0])
    own = None
    if cat is not None and cat.op_type == "Concat" and len(cat.input) == 2 and _axis(cat, 0) in (-1, 3):
        graph.dead.add(id(cat))
        (cached, own_scores) = cat.input
        own = _scores(graph, own_scores)
        if own is None or len(graph.consumers[cached]) != 1:
            return None
    else:
        cached = softmax.input[0]
    scores, mask = _unmask(graph, cached)
    qks = _scores(graph, scores)
    if qks is None:
        return None
    q, kt, scale = qks
    slots = None
    if own is not None:
        k_shape = graph.shapes.get(kt)
        if own[0] != q or not np.isclose(own[2], scale, rtol=1e-6) or not k_shape or len(k_shape) != 4 \
                or k_shape[3] is None:
            return None
        slots = k_shape[3]   # k^T is [B, h, hd, Smax]
    matched = _match_output(graph, softmax, slots)
    if matched is None:
        return None
    v, v_new, out = matched
    graph.dead.add(id(softmax))
    return _Attention(q, _untranspose(graph, kt), v, out, scale, mask,
                      _untranspose(graph, own[1]) if own else None, v_new)


def _untranspose(graph: _Graph, kt: str) -> str:
    """k from k^T: the Transpose's input when k^T is one (dead then), else a new Transpose."""
    trans = graph.producer.get(kt)
    if trans is not None and trans.op_type == "Transpose" and _perm(trans) == [0, 1, 3, 2]:
        if len(graph.consumers[kt]) == 1:
            graph.dead.add(id(trans))
        return trans.input[0]
    return graph.add("Transpose", [kt], perm=[0, 1, 3, 2])[0]


def _to_bsd(graph: _Graph, x: str, heads: int, head_dim: int) -> str:
    """Head tensor [B, h, S, hd] -> [B, S, h*hd]: the projection it was split from when the graph
    has ``Transpose(Reshape(p, [B, S, h, hd]))`` (the usual split_heads), else Transpose+Reshape."""
    trans = graph.producer.get(x)
    if trans is not None and trans.op_type == "Transpose" and _perm(trans) == [0, 2, 1, 3]:
        split = graph.producer.get(trans.input[0])
        if split is not None and split.op_type == "Reshape":
            flat, heads_shape = graph.shapes.get(split.input[0]), graph.shapes.get(split.output[0])
            if flat and heads_shape and len(flat) == 3 and flat[2] == heads * head_dim \
                    and heads_shape == [*flat[:2], heads, head_dim]:
                return split.input[0]
    (t,) = graph.add("Transpose", [x], perm=[0, 2, 1, 3])
    return graph.add("Reshape", [t, graph.const([0, 0, heads * head_dim])])[0]


def _merged_output(graph: _Graph, out: str, heads: int, head_dim: int) -> str | None:
    """When the only reader of the attention output [B, h, S, hd] is merge_heads (Transpose +
    Reshape to [B, S, h*hd]), the fused op's output can take merge_heads' place: its name, with
    the pair marked dead; else None."""
    trans = graph.only_consumer(out, "Transpose")
    if trans is None or _perm(trans) != [0, 2, 1, 3]:
        return None
    merge = graph.only_consumer(trans.output[0], "Reshape")
    if merge is None or (graph.shapes.get(merge.output[0]) or [None])[-1] != heads * head_dim:
        return None
    graph.dead.update({id(trans), id(merge)})
    return merge.output[0]


def _attention_bias(graph: _Graph, att: _Attention, cache: dict) -> str:
    """The additive bias [1, 1, Sq, Sk(+1)] of a masked attention: ``fill`` where masked, else 0
    (the step's own key, scored last, is never masked); "" when nothing is ever masked (the
    prefill's all-visible prefix). One bias per mask, shared by the layers."""
    if att.mask is None:
        return ""
    cond, fill = att.mask
    masked = graph.constant(cond)
    if masked is not None and not masked.any():
        return ""
    key = (cond, fill, att.k_new is not None)
    if key not in cache:
        shape = graph.shapes.get(cond)
        if not shape or len(shape) not in (2, 4) or (len(shape) == 4 and shape[:2] != [1, 1]):
            raise RuntimeError(f"attention mask {cond} of shape {shape}: not a [Sq, Sk] or [1, 1, Sq, Sk] mask")
        (bias,) = graph.add("Where", [cond, fill, graph.const(0.0, np.float32)])
        if len(shape) == 2:
            (bias,) = graph.add("Reshape", [bias, graph.const([1, 1, *shape])])
        if att.k_new is not None:
            if shape[-2] is None:
                raise RuntimeError(f"attention mask {cond}: unknown query length")
            own = graph.const(np.zeros((1, 1, shape[-2], 1)), np.float32)
            (bias,) = graph.add("Concat", [bias, own], axis=-1)
        cache[key] = bias
    return cache[key]


def fuse_attention(model: onnx.ModelProto) -> int:
    """Attention over head tensors [B, h, S, hd] -> MultiHeadAttention. Three forms:

    - ``Softmax(q @ k^T * s) @ v`` (the image encoders);
    - the same with ``masked_fill`` on the scores (the decoder prefill): the mask becomes an
      additive ``attention_bias`` (0 / -inf), or none when it masks nothing;
    - the decoder step: softmax over [masked scores against the fixed-slot cache, the token's
      score against its own key], then ``w_cache @ v_cache + w_own * v_new``. The fused op gets
      the cache with the token's key/value appended (key/value [B, h, Smax + 1, hd], BNSH, as
      MultiHeadAttention takes them when 4-D) and the bias of the cache's mask with a 0 appended.
      The cache write at the end of the step is untouched (the step contract stays).

    q (and the encoder's and prefill's k, v) go in as [B, S, h*hd]: the projection before the
    head split where the graph has one, else a Transpose + Reshape. Needs the exporter's
    value_info (head count and size). Returns the number of fused attentions."""
    graph = _Graph(model)
    biases: dict = {}
    fused = 0
    for softmax in list(model.graph.node):
        if softmax.op_type != "Softmax":
            continue
        dead_before, new_before = set(graph.dead), len(graph.new_nodes)
        att = _match(graph, softmax)
        shapes = [graph.shapes.get(x) for x in (att.q, att.v, att.out)] if att else []
        if att is None or any(s is None or len(s) != 4 or s[1] is None or s[3] is None for s in shapes):
            graph.dead = dead_before
            del graph.new_nodes[new_before:]
            continue
        heads, head_dim = shapes[0][1], shapes[0][3]
        query = _to_bsd(graph, att.q, heads, head_dim)
        if att.k_new is None:
            key, value = (_to_bsd(graph, x, heads, head_dim) for x in (att.k, att.v))
        else:
            (key,) = graph.add("Concat", [att.k, att.k_new], axis=2)
            (value,) = graph.add("Concat", [att.v, att.v_new], axis=2)
        bias = _attention_bias(graph, att, biases)
        inputs = [query, key, value] + (["", "", bias] if bias else [])
        attrs = dict(domain=MS_DOMAIN, num_heads=int(heads), scale=float(att.scale))
        merged = _merged_output(graph, att.out, heads, head_dim)
        if merged is not None:
            graph.new_nodes.append(helper.make_node("MultiHeadAttention", inputs, [merged],
                                                    name=graph.name("MultiHeadAttention"), **attrs))
        else:   # split back into heads under the old name
            (attn,) = graph.add("MultiHeadAttention", inputs, **attrs)
            (split,) = graph.add("Reshape", [attn, graph.const([0, 0, heads, head_dim])])
            graph.new_nodes.append(helper.make_node("Transpose", [split], [att.out], perm=[0, 2, 1, 3],
                                                    name=graph.name("Transpose")))
        fused += 1
    graph.finish()
    return fused


def fuse_skip_layer_norm(model: onnx.ModelProto) -> int:
    """``LayerNormalization(a + b)`` with a, b of the same rank-3 shape -> SkipLayerNormalization,
    whose fourth output is ``a + b`` (the residual stream) when something else reads it."""
    graph = _Graph(model)
    fused = 0
    for ln in list(model.graph.node):
        if ln.op_type != "LayerNormalization" or any(ln.output[1:]):
            continue
        axis = next((a.i for a in ln.attribute if a.name == "axis"), -1)
        add = graph.producer.get(ln.input[0])
        if add is None or add.op_type != "Add" or axis not in (-1, 2):
            continue
        a, b = add.input
        sa, sb, so = (graph.shapes.get(x) for x in (a, b, add.output[0]))
        if not (sa and sb and so and len(sa) == 3 and sa[1:] == sb[1:] == so[1:] and sa[2]) \
                or a in graph.inits or b in graph.inits:
            continue
        eps = next((a_.f for a_ in ln.attribute if a_.name == "epsilon"), 1e-5)
        others = [n for n in graph.consumers[add.output[0]] if n is not ln]
        outputs = [ln.output[0], "", "", add.output[0] if others else ""]
        inputs = [a, b, *ln.input[1:3]]   # gamma (and beta when the LayerNorm has one)
        graph.new_nodes.append(helper.make_node("SkipLayerNormalization", inputs, outputs, domain=MS_DOMAIN,
                                                name=graph.name("SkipLayerNormalization"), epsilon=eps))
        graph.dead.update({id(ln), id(add)})
        fused += 1
    graph.finish()
    return fused


def fuse_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's own GELU fusions (erf GELU -> Gelu, + bias -> BiasGelu), nothing else."""
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        wrapped = BertOnnxModel(model)
        wrapped.fuse_gelu()
        wrapped.fuse_bias_gelu(is_fastgelu=False)
        wrapped.prune_graph()
    finally:
        quiet.setLevel(level)
    return wrapped.model


def fuse_model(model: onnx.ModelProto, role: str) -> onnx.ModelProto:
    """All fusions on an fp32 graph (exported by torch.onnx, value_info present); raises if an
    op that `role` should get did not appear (a fusion that stopped matching)."""
    fuse_attention(model)
    fuse_skip_layer_norm(model)
    model = fuse_gelu(model)
    _Graph(model).finish()   # the GELU fuser appends its nodes at the end: sort again
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    # Type the fused ops' outputs (the fp16 converter reads every tensor's type; onnx's shape
    # inference does not know the com.microsoft ops).
    typed = {v.name for v in list(model.graph.value_info) + list(model.graph.output)}
    for node in model.graph.node:
        if node.op_type in FUSED_OPS:
            model.graph.value_info.extend(helper.make_tensor_value_info(y, TensorProto.FLOAT, None)
                                          for y in node.output if y and y not in typed)
    counts = op_counts(model)
    missing = [op for op in EXPECTED[role] if not counts.get(op)]
    if missing:
        raise RuntimeError(f"{role}: fusion found no {', '.join(missing)} pattern (ops: {counts}); "
                           "the exporter's graph changed shape")
    return model


def _save(model: onnx.ModelProto, dst: Path, external_data: bool) -> list[str]:
    """Write `model` next to `dst` and move it into place (no half-written files)."""
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".fused-") as scratch:
        tmp = Path(scratch) / dst.name
        onnx.save(model, tmp, save_as_external_data=external_data, all_tensors_to_one_file=True,
                  location=dst.name + ".data", size_threshold=1024)
        return move_written_files(scratch, dst.parent, last=dst.name)


def fuse_file(src, role: str, precision: str = "fp32") -> dict:
    """Fused variant of the plain fp32 graph at `src` in `precision` ("fp32" or "fp16"), written
    beside it. Returns ``{"path", "files", "io", "ops", "seconds"}`` like the exporters."""
    start = time.perf_counter()
    src = Path(src)
    model = fuse_model(onnx.load(src), role)
    if precision == "fp16":
        decoder = role != "image_encoder"
        model = convert_graph(model, fp16_io=DECODER_FP16_IO if decoder else (), fp16_ops=FUSED_FP16_OPS,
                              fp32_nodes=logits_head(model) if decoder else ())
    external = sum(len(t.raw_data) for t in model.graph.initializer) > (1 << 30)
    dst = src.parent / fused_name(src, precision)
    files = _save(model, dst, external)
    return {"path": str(dst), "files": files, "io": io_signature(model), "ops": op_counts(model),
            "seconds": round(time.perf_counter() - start, 2)}


def export_fused(encoder: dict, decoder: dict, config, *, fp16: bool, noun_tokens=None, width: int = 10,
                 say=print) -> tuple[list[tuple[dict, str, str]], dict]:
    """Fused variants of the plain fp32 exports (`encoder`: export_encoder's result, `decoder`:
    export_decoder's), each gated (novic.export.fused_gate) before it is kept.

    Returns ([(export, role, precision)] of the variants that passed, with ``export["gate"]``
    holding their numbers; {"<part> <precision>": "pass" | "fail: why" | "error: why"} for the
    manifest). A variant that fails is deleted, with one line through `say`."""
    from novic.errors import first_line
    from novic.export.fused_gate import gate_decoder, gate_encoder

    kept, summary = [], {}
    reference: dict = {}
    for precision in ("fp32", "fp16") if fp16 else ("fp32",):
        for part in ("image encoder", "decoder"):
            key = f"{part} {precision}"
            made: dict = {}
            try:
                if part == "image encoder":
                    made["image_encoder"] = fuse_file(encoder["path"], "image_encoder", precision)
                    gate = gate_encoder(encoder["path"], made["image_encoder"]["path"], precision)
                else:
                    for k in ("prefill", "step"):
                        made[f"decoder_{k}"] = fuse_file(decoder[k]["path"], f"decoder_{k}", precision)
                    gate = gate_decoder((decoder["prefill"]["path"], decoder["step"]["path"]),
                                        (made["decoder_prefill"]["path"], made["decoder_step"]["path"]),
                                        config, precision, noun_tokens=noun_tokens, width=width,
                                        reference=reference)
            except Exception as exc:  # noqa: BLE001 - a tower the passes do not know: no fused variant
                _remove(made)
                summary[key] = f"error: {first_line(exc)}"
                say(f"fused {key}: not made ({first_line(exc)})")
                continue
            say(gate.line(key))
            summary[key] = "pass" if gate.passed else f"fail: {gate.why}"
            if gate.passed:
                kept += [({**export, "gate": gate.numbers}, role, precision) for role, export in made.items()]
            else:
                _remove(made)
    return kept, summary


def _remove(made: dict) -> None:
    for export in made.values():
        for f in export["files"]:
            Path(f).unlink(missing_ok=True)
