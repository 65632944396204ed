"""fp32 ONNX graph -> fp16 graph for GPU backends (TensorRT takes precision from the ONNX types).

Why a small converter of our own: onnxconverter-common's float16 converter decides by a fixed
op block list and knows nothing of where these graphs need fp32 (the decoder's scores), and
NVIDIA ModelOpt AutoCast, the reference tool, pulls onnxruntime-gpu and an older onnx into the
export environment. Our graphs are plain transformer graphs from torch.onnx (MatMul/Gemm/Conv,
elementwise, LayerNormalization, Softmax, a few data-movement ops), so the rules fit in a page:

- ``FP16_OPS`` (MatMul, Gemm, Conv, ...) compute in fp16: they carry the FLOPs and the weights
  (half the memory traffic); GPU fp16 GEMMs accumulate in fp32.
- ``FP32_OPS`` (LayerNormalization, Softmax, LogSoftmax, reductions, Pow/Sqrt/Exp/Log, TopK)
  compute in fp32: their sums of squares/exponentials overflow or lose the small terms in fp16
  (the same ops torch.autocast runs in float32).
- every other op follows its inputs: fp16 if any non-constant float input is fp16 (or all
  inputs are constants), else fp32. So the residual stream stays fp16 between the MatMuls,
  while chains that start in fp32 stay fp32 -- the decoder's scores after LogSoftmax (EOS mask,
  TopK, candidate Gather) and the L2 norm of the embedding input.
- named nodes can be kept in fp32 (``fp32_nodes``): the decoder's output head, see
  :func:`decoder_fp16`.
- Casts are inserted where a tensor's precision differs from what its consumer computes in;
  float constants (initializers, Constant nodes) are converted instead, saturated to +-65504.
- Graph inputs and outputs keep fp32 unless named in ``fp16_io`` (the decoder's KV cache).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from novic.atomic import move_written_files
from novic.export.decoder_onnx import io_signature

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
FP32_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "RMSNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSumExp", "Pow", "Sqrt", "Exp", "Log", "TopK", "CumSum", "Range",
})
# Ops that accept any input type (no cast needed) and whose output type does not follow it.
TYPE_AGNOSTIC_OPS = frozenset({"Shape", "Size", "Cast", "CastLike"})
# Float inputs that the ONNX spec fixes to float32 whatever the data type (op -> input indices).
FIXED_FP32_INPUTS = {"Resize": {2}, "Upsample": {1}}
DECODER_FP16_IO = ("kv_cache", "kv_cache_out")
FP16_MAX = float(np.finfo(np.float16).max)


def _to_fp16(array: np.ndarray) -> np.ndarray:
    """Saturate finite values to the fp16 range (inf/-inf stay, e.g. attention masks)."""
    finite = np.isfinite(array)
    return np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array).astype(np.float16)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor in the graph. torch.onnx writes value_info for every
    intermediate; shape inference (which copies the whole model, weights included) runs only
    when some are missing."""
    g = model.graph
    produced = {y for n in g.node for y in n.output if y}
    known = {v.name for v in list(g.value_info) + list(g.output)}
    if not produced <= known:
        g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        types[v.name] = v.type.tensor_type.elem_type
    return types


def convert_graph(model: onnx.ModelProto, fp16_io=(), fp16_ops=FP16_OPS, fp32_ops=FP32_OPS,
                  fp32_nodes=()) -> onnx.ModelProto:
    """Convert `model` (an fp32 graph with its initializer data loaded) to fp16 in place and
    return it. fp32_nodes: names of nodes to keep in fp32 whatever their op type."""
    if model.functions:
        raise ValueError("graphs with local functions are not supported (export with optimize=True)")
    types = _elem_types(model)
    g = model.graph
    nodes = list(g.node)
    del g.node[:]
    del g.value_info[:]  # stale types; consumers (ORT, TensorRT) re-infer

    initializers = {t.name: t for t in g.initializer}
    constants = {n.output[0]: n for n in nodes if n.op_type == "Constant"
                 and [a.name for a in n.attribute] == ["value"]}
    precision: dict[str, int] = {}     # non-constant float tensor -> FLOAT or FLOAT16
    for v in g.input:
        if types.get(v.name) == FLOAT:
            if v.name in fp16_io:
                v.type.tensor_type.elem_type = FLOAT16
            precision[v.name] = v.type.tensor_type.elem_type
    const16: dict[str, str] = {}        # constant name -> its fp16 copy
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def is_const(name):
        return name in initializers or name in constants

    def as_fp16_constant(name):
        if name not in const16:
            copy = name + "__fp16"
            if name in initializers:
                arr = numpy_helper.to_array(initializers[name])
                g.initializer.append(numpy_helper.from_array(_to_fp16(arr), copy))
            else:
                arr = numpy_helper.to_array(helper.get_attribute_value(constants[name].attribute[0]))
                new_nodes.append(helper.make_node("Constant", [], [copy],
                                                  value=numpy_helper.from_array(_to_fp16(arr))))
            const16[name] = copy
        return const16[name]

    def cast(name, to):
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__{'fp16' if to == FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to,
                                              name=f"cast_{casts[key]}"))
        return casts[key]

    for node in nodes:
        if node.op_type == "Constant":
            new_nodes.append(node)  # fp32 original kept; dropped at the end if unused
            continue
        fixed = FIXED_FP32_INPUTS.get(node.op_type, set())
        data_in = [(i, x) for i, x in enumerate(node.input)
                   if x and types.get(x) == FLOAT and i not in fixed]
        float_out = [y for y in node.output if types.get(y) == FLOAT]
        if node.op_type in TYPE_AGNOSTIC_OPS or not (data_in or float_out):
            mode = None
        elif node.op_type in fp32_ops or node.name in fp32_nodes:
            mode = FLOAT
        elif node.op_type in fp16_ops or not data_in:
            mode = FLOAT16 if data_in else None  # ConstantOfShape, RandomX: leave fp32
        else:
            live = [precision[x] for _, x in data_in if not is_const(x)]
            mode = FLOAT16 if (FLOAT16 in live or not live) else FLOAT

        if mode is not None:
            for i, x in data_in:
                if is_const(x):
                    if mode == FLOAT16:
                        node.input[i] = as_fp16_constant(x)
                elif precision[x] != mode:
                    node.input[i] = cast(x, mode)
        for y in float_out:
            precision[y] = mode if mode is not None else FLOAT
        new_nodes.append(node)

    # Graph outputs: fp32 unless named in fp16_io.
    for v in g.output:
        if types.get(v.name) != FLOAT:
            continue
        want = FLOAT16 if v.name in fp16_io else FLOAT
        v.type.tensor_type.elem_type = want
        have = precision.get(v.name, FLOAT)
        if have != want:
            inner = v.name + "__inner"
            for n in new_nodes:
                n.output[:] = [inner if y == v.name else y for y in n.output]
                n.input[:] = [inner if x == v.name else x for x in n.input]
            new_nodes.append(helper.make_node("Cast", [inner], [v.name], to=want,
                                              name=f"cast_out_{v.name}"))

    # Drop constants that only fp16 consumers used.
    consumed = {x for n in new_nodes for x in n.input} | {v.name for v in g.output}
    g.node.extend(n for n in new_nodes
                  if not (n.op_type == "Constant" and n.output[0] not in consumed))
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in consumed:
            del g.initializer[i]
    return model


def logits_head(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes that produce the input of a LogSoftmax (through
    elementwise ops such as the temperature Div): the decoder's output head."""
    producer = {y: n for n in model.graph.node for y in n.output}
    heads = []
    for node in model.graph.node:
        if node.op_type != "LogSoftmax":
            continue
        n = producer.get(node.input[0])
        while n is not None and n.op_type in ("Div", "Mul", "Cast", "Identity", "Reshape"):
            n = producer.get(n.input[0])
        if n is not None and n.op_type in ("MatMul", "Gemm"):
            heads.append(n.name)
    return heads


def convert_file(src, dst, *, fp16_io=(), fp32_nodes=(), external_data: bool | None = None) -> dict:
    """Convert the fp32 graph at `src` (external data allowed) into `dst`.

    external_data: None = when the fp16 weights exceed 1 GiB. Returns ``{"path", "files",
    "io", "seconds"}`` like the exporters.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    model = onnx.load(src)  # loads external data too
    fp32_nodes = fp32_nodes(model) if callable(fp32_nodes) else fp32_nodes
    fp16 = convert_graph(model, fp16_io=fp16_io, fp32_nodes=fp32_nodes)
    if external_data is None:
        external_data = sum(len(t.raw_data) for t in fp16.graph.initializer) > (1 << 30)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".fp16-") as scratch:
        tmp = Path(scratch) / dst.name
        onnx.save(fp16, tmp, save_as_external_data=external_data, all_tensors_to_one_file=True,
                  location=dst.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(tmp), full_check=not external_data)
        files = move_written_files(scratch, dst.parent, last=dst.name)
    return {"path": str(dst), "files": files,
            "io": io_signature(fp16), "seconds": round(time.perf_counter() - start, 2)}


def fp16_name(path) -> str:
    """decoder_step.onnx -> decoder_step.fp16.onnx"""
    p = Path(path)
    return p.stem + ".fp16" + p.suffix


def decoder_fp16(export: dict, out_dir=None, *, fp32_head: bool = True) -> dict:
    """fp16 variants of :func:`novic.export.decoder_onnx.export_decoder`'s two graphs
    (fp16 KV cache, fp32 scores and embedding). Returns the same layout.

    fp32_head: keep the output head (final LayerNorm output @ token table) in fp32. Its logits
    go straight into log-softmax and top-k, and an fp16 logit of 10-50 is rounded by 0.01-0.03
    nats, the size of the gaps between near-tied beams. Measured on a peaked random full-size
    decoder (500 embeddings, beam 10, CPU onnxruntime): top-1 labels as fp32 99.4% with the
    fp32 head vs 99.2% without (fp16 weights alone, fp32 arithmetic: 99.4%), top-5 81.4% vs
    80.0%. Small, but the head is one [H, V] matrix per step (e.g. 25 MB fp32 at V=12000:
    microseconds of GPU memory bandwidth), so the fp32 copy costs little."""
    result = {k: v for k, v in export.items() if k not in ("prefill", "step", "seconds")}
    for key in ("prefill", "step"):
        src = Path(export[key]["path"])
        dst = Path(out_dir or src.parent) / fp16_name(src)
        result[key] = convert_file(src, dst, fp16_io=DECODER_FP16_IO,
                                   fp32_nodes=logits_head if fp32_head else ())
    return result


def encoder_fp16(export: dict, out_dir=None) -> dict:
    """fp16 variant of :func:`novic.export.encoder_onnx.export_encoder`'s graph (fp32 I/O)."""
    src = Path(export["path"])
    return convert_file(src, Path(out_dir or src.parent) / fp16_name(src))
