"""Image encoders that take uint8 pixels: the normalisation moves from the host into the graph.

The float encoder graphs take f32[B,3,H,W], already scaled and normalised with the embedder's
mean/std, which the host computes (novic.runtime.preprocess: ``(x / 255 - mean) / std`` in
float32, ~38 M float ops for 256 images at 224x224) and then ships at 4 bytes a value. A u8
variant takes the resized, cropped pixels as Pillow leaves them, u8[B,H,W,3], and starts with a
small prologue that does the same arithmetic on the device:

    Transpose(NHWC -> NCHW) -> Cast(float32) -> Div(255) -> Sub(mean) -> Div(std) -> the encoder

The same float32 operations in the same order as the host path, so the encoder sees the same
numbers (tested equal). An fp16 graph keeps its fp32 input and its own cast to fp16 after it,
so the normalisation is done in fp32 there too. The resize and the crop stay on the host: they
depend on each image's size.

Written at export (``novic-export onnx``) for the encoder graphs ort-cuda loads, each gated
against the float graph it wraps on real photos (min cosine >= 0.99999) before it is kept.

The twin holds no weights of its own: its initializers are ONNX external data pointing into the
float graph's weight file (same location, offset and length), so the twin is the graph alone
(tens of KB) and the bundle keeps one copy of the encoder's weights (ViT-B/16: 370 MB fp32 +
185 MB fp16 saved). A fused float graph, onnxruntime's alone, first has its weights moved out
into ``<graph>.data``; a plain graph (TensorRT's source) stays as exported, so its twin shares
its weights only where they are in a side file already (towers over 1 GiB), and is a full copy
otherwise.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from novic.export.decoder_onnx import io_signature
from novic.runtime.bundle import U8_PIXELS  # noqa: F401  (the manifest's "pixels" of these graphs)

U8_INPUT = "pixels_u8"
GATE_COS = 0.99999
GATE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def u8_name(path) -> str:
    """image_encoder.fused.fp16.onnx -> image_encoder.fused.fp16.u8.onnx"""
    p = Path(path)
    return p.stem + ".u8" + p.suffix


def add_u8_prologue(model: onnx.ModelProto, mean, std) -> onnx.ModelProto:
    """Replace the graph's float pixel input f32[B,3,H,W] by u8[B,H,W,3] + the normalisation."""
    graph = model.graph
    (inp,) = graph.input
    t = inp.type.tensor_type
    if t.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(t.shape.dim) != 4 \
            or t.shape.dim[1].dim_value != 3:
        raise ValueError(f"input {inp.name} is not float [B,3,H,W]; cannot add a uint8 prologue")
    batch, _, height, width = t.shape.dim
    new_input = helper.make_tensor_value_info(U8_INPUT, TensorProto.UINT8, [
        batch.dim_param or batch.dim_value, height.dim_value, width.dim_value, 3])

    def const(name, values):   # per-channel values broadcast over [B,3,H,W]
        values = np.asarray(values, np.float32)
        graph.initializer.append(numpy_helper.from_array(values.reshape(1, 3, 1, 1) if values.size == 3 else values,
                                                         name))
        return name

    # The divisions are divisions, not multiplications by the reciprocal: the host path divides,
    # and equal arithmetic gives equal embeddings.
    names = [f"u8_prologue_{k}" for k in ("nchw", "float", "unit", "centred")]
    normalised = names[-1] + "_scaled" if t.elem_type == TensorProto.FLOAT16 else inp.name
    nodes = [helper.make_node("Transpose", [U8_INPUT], [names[0]], perm=[0, 3, 1, 2], name="u8_prologue_transpose"),
             helper.make_node("Cast", [names[0]], [names[1]], to=TensorProto.FLOAT, name="u8_prologue_cast"),
             helper.make_node("Div", [names[1], const("u8_prologue_255", np.float32(255.0))], [names[2]],
                              name="u8_prologue_div255"),
             helper.make_node("Sub", [names[2], const("u8_prologue_mean", mean)], [names[3]], name="u8_prologue_sub_mean"),
             helper.make_node("Div", [names[3], const("u8_prologue_std", std)], [normalised], name="u8_prologue_div_std")]
    if t.elem_type == TensorProto.FLOAT16:   # a graph with fp16 input: normalise in fp32, then cast
        nodes.append(helper.make_node("Cast", [normalised], [inp.name], to=TensorProto.FLOAT16,
                                      name="u8_prologue_to_fp16"))
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    del graph.input[:]
    graph.input.append(new_input)
    graph.value_info.append(inp)   # the old input, now an intermediate: keep its type and shape
    return model


def weights_outside(export: dict) -> dict:
    """Move the weights of the graph at ``export["path"]`` into one side file ``<graph>.data``
    (ONNX external data), unless they are in side files already; ``export["files"]`` is updated
    in place (its manifest entry lists the file). Returns `export`."""
    from novic.calib.weights import external_files
    from novic.export.fused import _save

    graph = Path(export["path"])
    if not external_files(graph):
        export["files"] = _save(onnx.load(graph), graph, external_data=True)
    return export


def u8_file(src, mean, std) -> dict:
    """The u8 variant of the encoder graph at `src`, written beside it (``*.u8.onnx``). Where the
    weights of `src` are external data, the variant points into the same files (it is written
    without them); else it is a self-contained copy. Returns ``{"path", "files" (the variant's
    graph and the weight files it reads), "shared" (those of the files that `src` owns),
    "io", "seconds"}`` like the other exporters."""
    from novic.atomic import write_bytes_atomic
    from novic.calib.weights import external_files
    from novic.export.fused import _save

    start = time.perf_counter()
    src = Path(src)
    dst = src.parent / u8_name(src)
    # named through src's directory as given (not resolved): the manifest names files relative to it
    shared = [str(src.parent / f.relative_to(src.parent.resolve())) for f in external_files(src)]
    if shared:   # the initializers keep their external_data entries: the bytes stay in src's files
        model = add_u8_prologue(onnx.load(src, load_external_data=False), mean, std)
        for node in model.graph.node:   # torch.onnx's per-node debug notes, most of what is left
            del node.metadata_props[:]
        write_bytes_atomic(dst, model.SerializeToString())
        files = [*shared, str(dst)]
    else:
        model = add_u8_prologue(onnx.load(src), mean, std)
        external = sum(len(t.raw_data) for t in model.graph.initializer) > (1 << 30)
        files = _save(model, dst, external)
    return {"path": str(dst), "files": files, "shared": shared, "io": io_signature(model),
            "seconds": round(time.perf_counter() - start, 2)}


def gate_photos(size) -> list:
    """Real photos for the gate (scikit-image ships them) as RGB PIL images; where scikit-image is
    missing, seeded noise images of odd sizes stand in (the line says so)."""
    from PIL import Image

    try:
        from skimage import data as skdata
        return [(name, Image.fromarray(getattr(skdata, name)()).convert("RGB")) for name in GATE_PHOTOS]
    except Exception:  # noqa: BLE001 - optional dev dependency
        rng = np.random.default_rng(0)
        return [(f"noise{i}", Image.fromarray(rng.integers(0, 256, (size[0] + 37 * i, size[1] + 11 * i, 3), np.uint8)))
                for i in range(4)]


def gate_u8(float_path, u8_path, preprocess) -> "GateResult":
    """The u8 graph against the float graph it wraps: the same photos through the host float
    path and through the uint8 path, batch 1 and the whole batch; min cosine >= GATE_COS."""
    from novic.calib.gates import cosine
    from novic.export.fused_gate import GateResult
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.preprocess import Preprocessor

    pre = Preprocessor(preprocess, threads=1)
    photos = gate_photos(pre.config.size)
    u8 = np.stack([pre.pixels(img) for _, img in photos])
    f32 = np.stack([pre.normalize(p) for p in u8])
    plain, wrapped = OrtImageEncoder(float_path, provider="cpu"), OrtImageEncoder(u8_path, provider="cpu")
    batches = [slice(i, i + 1) for i in range(len(u8))] + [slice(0, len(u8))]
    cos = min(float(cosine(wrapped(u8[b]), plain(f32[b])).min()) for b in batches)
    ok = cos >= GATE_COS
    numbers = {"min_cosine": cos, "images": [name for name, _ in photos]}
    return GateResult(ok, numbers, "" if ok else f"cosine {cos:.6f} < {GATE_COS}")


def export_u8(encoders, preprocess, say=print) -> tuple[list[tuple[dict, str, str]], dict]:
    """u8 variants of `encoders` ([(export, precision, variant)], the float encoder graphs), each
    gated against its float graph; `preprocess`: the embedder's preprocessing (mean, std, size).

    Returns ([(export, precision, variant)] of the variants that passed, ``export["gate"]``
    holding their numbers; {"image encoder <precision> [fused] u8": "pass" | "fail: why" |
    "error: why"} for the manifest). A variant that fails is deleted, with one line via `say`.
    A fused float graph's weights are moved into its side file first (``weights_outside``: its
    export's "files" change, kept even where the twin is not), for the twin to share."""
    from novic.errors import first_line
    from novic.runtime.preprocess import PreprocessConfig

    cfg = preprocess if isinstance(preprocess, PreprocessConfig) else PreprocessConfig.from_dict(preprocess)
    kept, summary = [], {}
    for export, precision, variant in encoders:
        key = f"image encoder {precision}{' fused' if variant == 'fused' else ''} u8"
        made = None
        try:
            if variant != "plain":   # onnxruntime's graph: its weights move out, for the twin to share
                weights_outside(export)
            made = u8_file(export["path"], cfg.mean, cfg.std)
            gate = gate_u8(export["path"], made["path"], cfg)
        except Exception as exc:  # noqa: BLE001 - an input the prologue does not fit: no u8 variant
            _remove(made)
            summary[key] = f"error: {first_line(exc)}"
            say(f"{key}: not made ({first_line(exc)})")
            continue
        say(gate.line(key).removeprefix("fused "))
        summary[key] = "pass" if gate.passed else f"fail: {gate.why}"
        if gate.passed:
            kept.append(({**made, "gate": gate.numbers}, precision, variant))
        else:
            _remove(made)
    return kept, summary


def _remove(made: dict | None) -> None:
    """Delete a variant that is not kept: its own files, never the weights it shares."""
    made = made or {}
    for f in made.get("files", []):
        if f not in made.get("shared", []):
            Path(f).unlink(missing_ok=True)
