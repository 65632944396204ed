"""Every op in our exported graphs (fp32 and fp16) is one the TensorRT ONNX parser supports, and
the restrictions the parser puts on those ops hold.

Source: onnx/onnx-tensorrt, docs/operators.md, "Supported ONNX Operators" (the TensorRT 10.x
table, opset 9..24, which the TensorRT 11 parser carries forward). The ops we emit and the
restrictions from that table that we rely on:
- TopK: "`sorted` must be 1. `K` input must be less than 3840"; older parser releases also
  require "`K` input must be an initializer" -- ours is a constant initializer (k fixed at export).
- ReduceL2 / ReduceMean / ReduceSum ...: "`axes` must be an initializer".
- Squeeze / Unsqueeze: "`axes` must be resolvable to a constant"; Slice (older releases):
  "`axes` must be an initializer".
- LayerNormalization: "Only the first output `Y` is supported".
- CumSum: "`axis` must be a build-time constant"; Dropout: "`is_training` must be an initializer
  and evaluate to False" (neither is emitted today; checked in case they appear).
- Gather, GatherElements, GatherND, Where, Equal, LessOrEqual, Not, Erf, LogSoftmax, Softmax,
  MatMul, Gemm, Conv, Pad, Expand, Cast, ...: supported without restrictions relevant here.
- Control flow: If/Loop/Scan are supported with restrictions, but our design forbids them
  (docs/internals.md "The decoder graphs": no control flow), so they are not on the allowlist.
- Types: FP32, FP16, INT32, INT64, BOOL (DOUBLE only "limited", UINT8 only as network I/O).

The fused variants (novic.export.fused) are for onnxruntime only and never reach TensorRT; they
may add exactly the onnxruntime contrib ops listed in ORT_CONTRIB_OPS (domain com.microsoft,
kernels on the CPU and CUDA providers) and otherwise hold to the same list.
"""
import collections
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

# Ops the TensorRT ONNX parser supports (operators.md "Supported: Y") that our exporters may emit.
TRT_SUPPORTED_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "Cast", "CastLike", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "Div", "Equal", "Erf", "Exp", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Gelu",
    "Gemm", "Greater", "GreaterOrEqual", "Identity", "LayerNormalization", "Less", "LessOrEqual", "Log",
    "LogSoftmax", "MatMul", "Max", "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "Range", "Reciprocal",
    "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid", "Slice",
    "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze",
    "Where",
})
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
# Contrib ops a fused graph may hold (onnxruntime docs/ContribOperators.md), deliberately few.
ORT_CONTRIB_OPS = frozenset({"MultiHeadAttention", "SkipLayerNormalization", "Gelu", "BiasGelu"})
ALLOWED_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}
REDUCE_OPS = {"ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "ReduceMin", "ReduceProd", "ReduceSumSquare",
              "ReduceL1", "ReduceLogSum", "ReduceLogSumExp"}
TOPK_MAX = 3840


def _constants(model):
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    return inits, consts


def problems(model: onnx.ModelProto) -> list[str]:
    """Everything in `model` the TensorRT ONNX parser would refuse (per operators.md)."""
    out = []
    g = model.graph
    opset = {o.domain: o.version for o in model.opset_import}
    if not 9 <= opset.get("", 0) <= 24:
        out.append(f"opset {opset.get('')} outside TensorRT's 9..24")
    if model.functions:
        out.append("local functions")
    inits, consts = _constants(model)
    initializer_like = set(inits) | set(consts)
    for node in g.node:
        op = node.op_type
        where = f"{op} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            out.append(f"{where}: custom domain {node.domain!r}")
        if op in CONTROL_FLOW:
            out.append(f"{where}: control flow")
        elif op not in TRT_SUPPORTED_OPS:
            out.append(f"{where}: not on the TensorRT allowlist")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "TopK":
            if attrs.get("sorted", 1) != 1:
                out.append(f"{where}: sorted must be 1")
            k = node.input[1]
            if k not in initializer_like:
                out.append(f"{where}: K must be a constant initializer")
            else:
                value = onnx.numpy_helper.to_array(inits[k] if k in inits else consts[k]).reshape(-1)
                if not (value.size == 1 and 1 <= int(value[0]) < TOPK_MAX):
                    out.append(f"{where}: K={value} must be in [1, {TOPK_MAX})")
        if op in REDUCE_OPS and len(node.input) > 1 and node.input[1] and node.input[1] not in initializer_like:
            out.append(f"{where}: axes must be an initializer")
        if op in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1] not in initializer_like:
            out.append(f"{where}: axes must be a constant")
        if op == "Slice" and len(node.input) > 3 and node.input[3] and node.input[3] not in initializer_like:
            out.append(f"{where}: axes must be an initializer")
        if op == "LayerNormalization" and any(node.output[1:]):
            out.append(f"{where}: only output Y is supported")
        if op == "CumSum" and node.input[1] not in initializer_like:
            out.append(f"{where}: axis must be a build-time constant")
        if op == "Dropout" and (len(node.input) < 3 or node.input[2] not in initializer_like):
            out.append(f"{where}: is_training must be an initializer")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    typed = [(t.name, t.data_type) for t in inferred.graph.initializer] + [
        (v.name, v.type.tensor_type.elem_type)
        for v in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info)]
    for name, dtype in typed:
        if dtype and dtype not in ALLOWED_TYPES:
            out.append(f"tensor {name!r}: type {TensorProto.DataType.Name(dtype)} not supported by TensorRT")
    return out


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """fp32 + fp16 graphs of the tiny encoder (tiny open_clip ViT) and a small decoder."""
    import torch

    from novic.config import DecoderConfig
    from novic.export.decoder_onnx import export_decoder
    from novic.export.encoder_onnx import export_encoder
    from novic.export.fp16 import decoder_fp16, encoder_fp16
    from novic.model.decoder import ObjectDecoder
    from novic.model.embedder import Embedder, tiny_spec

    out = tmp_path_factory.mktemp("graphs")
    torch.manual_seed(0)
    cfg = DecoderConfig(embed_dim=32, vocab_size=50, max_tokens=5, prefix_len=2, width=32, layers=2, heads=2,
                        ffn_width=16)
    dec = export_decoder(ObjectDecoder(cfg), out, topk=10)
    enc = export_encoder(Embedder.load(tiny_spec()).model, out)
    dec16, enc16 = decoder_fp16(dec), encoder_fp16(enc)
    paths = {"prefill": dec["prefill"]["path"], "step": dec["step"]["path"], "encoder": enc["path"],
             "prefill.fp16": dec16["prefill"]["path"], "step.fp16": dec16["step"]["path"],
             "encoder.fp16": enc16["path"]}
    from novic.export.fused import fuse_file
    roles = {"prefill": "decoder_prefill", "step": "decoder_step", "encoder": "image_encoder"}
    for name, role in roles.items():
        for precision in ("fp32", "fp16"):
            paths[f"{name}.fused.{precision}"] = fuse_file(paths[name], role, precision)["path"]
    return paths


@pytest.mark.parametrize("name", ["prefill", "step", "encoder", "prefill.fp16", "step.fp16", "encoder.fp16"])
def test_graph_ops_are_supported_by_tensorrt(graphs, name):
    model = onnx.load(graphs[name], load_external_data=False)
    assert problems(model) == []
    ops = collections.Counter(n.op_type for n in model.graph.node)
    if name.startswith(("prefill", "step")):
        assert ops["TopK"] == 1 and ops["LogSoftmax"] == 1   # in-graph scores (host reads O(k))
        assert ops["GatherElements"] == 1                     # candidate log-probs


@pytest.mark.parametrize("name", [f"{g}.fused.{p}" for g in ("prefill", "step", "encoder") for p in ("fp32", "fp16")])
def test_fused_graphs_add_only_the_listed_contrib_ops(graphs, name):
    model = onnx.load(graphs[name], load_external_data=False)
    contrib = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert contrib and contrib <= ORT_CONTRIB_OPS
    assert all(n.domain in ("", "ai.onnx", "com.microsoft") for n in model.graph.node)
    standard = onnx.ModelProto()
    standard.CopyFrom(model)
    del standard.graph.node[:]
    standard.graph.node.extend(n for n in model.graph.node if n.domain != "com.microsoft")
    standard.graph.ClearField("value_info")
    # everything else passes the same checks as the plain graphs
    assert problems(standard) == []


def test_checker_catches_violations(graphs):
    """The checker itself: a dynamic K, an unsupported op and a control-flow node are reported."""
    model = onnx.load(graphs["step"], load_external_data=False)
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    topk.input[1] = "tokens"                                  # K from a graph input: not constant
    model.graph.node.append(onnx.helper.make_node("NonMaxSuppression", ["a", "b"], ["c"]))
    model.graph.node.append(onnx.helper.make_node("If", ["d"], ["e"]))
    found = "\n".join(problems(model))
    assert "K must be a constant initializer" in found
    assert "NonMaxSuppression" in found and "not on the TensorRT allowlist" in found
    assert "control flow" in found


@pytest.mark.slow
def test_siglip_encoder_ops(tmp_path):
    """The real architecture of the released checkpoints' CLIP (random weights, offline)."""
    from novic.export.encoder_onnx import export_encoder
    from novic.export.fp16 import encoder_fp16
    try:
        import open_clip
        model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None)
    except Exception as exc:  # noqa: BLE001 - timm missing etc.
        pytest.skip(f"ViT-B-16-SigLIP unavailable here: {exc}")
    enc = export_encoder(model, tmp_path)
    enc16 = encoder_fp16(enc)
    for path in (enc["path"], enc16["path"]):
        assert problems(onnx.load(Path(path), load_external_data=False)) == []
