"""open_clip image tower -> ``image_encoder.onnx``: pixels f32[B,3,H,W] -> embedding f32[B,F].

Only the visual tower is exported; the output is L2-normalised in the graph, so the runtime
hands it to the decoder as it is. Batch is dynamic, the image size is fixed (the tower's own).
Works for open_clip's own VisionTransformer (OpenAI/DFN/DataComp models) and timm towers
(SigLIP). Towers with over 1 GiB of weights (SO400M, ViT-H) are written with their weights in
a side file (ONNX external data, ``<name>.data``), since a protobuf cannot exceed 2 GB.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from novic.atomic import move_written_files
from novic.export.decoder_onnx import CONTROL_FLOW_OPS, OPSET, io_signature

ENCODER_FILE = "image_encoder.onnx"
EXTERNAL_DATA_BYTES = 1 << 30  # well under protobuf's 2 GB hard limit, leaving room for the graph


class ImageEncoderGraph(nn.Module):
    """pixels [B,3,H,W] -> unit embeddings [B,F] (fp32)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixels):
        return F.normalize(self.visual(pixels).float(), dim=-1)


def image_tower(model: nn.Module) -> nn.Module:
    """The visual tower of an open_clip CLIP model (or the tower itself)."""
    return model.visual if hasattr(model, "visual") else model


def tower_image_size(visual: nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", None)
    if size is None:
        raise ValueError("cannot tell the image size of this tower; pass image_size=(H, W)")
    return (size, size) if isinstance(size, int) else tuple(size)


@contextlib.contextmanager
def unfused_attention(visual: nn.Module):
    """Export the plain attention paths (explicit q @ k^T, softmax, @ v): timm's fused
    scaled_dot_product_attention exports with extra shape arithmetic (for a timm ViT: 13 Shape
    ops instead of 1, twice the Reshape/Concat), and nn.MultiheadAttention's inference fast
    path is a fused native op; the plain path is also what the fp32 reference computes."""
    fused = [(m, m.fused_attn) for m in visual.modules() if hasattr(m, "fused_attn")]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        for m, _ in fused:
            m.fused_attn = False
        torch.backends.mha.set_fastpath_enabled(False)
        yield
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_encoder(model: nn.Module, out_dir, *, name: str = ENCODER_FILE,
                   image_size: tuple[int, int] | None = None,
                   external_data: bool | None = None) -> dict:
    """Export the image tower of `model` (an open_clip CLIP model or its `.visual`) in fp32.

    external_data: None = only when the weights exceed 1 GiB. Returns ``{"path", "files"
    (graph plus any external data file), "io" (io_signature), "opset", "seconds"}``.
    """
    visual = image_tower(model).eval()
    size = tuple(image_size) if image_size else tower_image_size(visual)
    weight_bytes = sum(p.numel() * p.element_size() for p in visual.parameters())
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_BYTES
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    graph = ImageEncoderGraph(visual).eval()
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), unfused_attention(visual):
        program = torch.onnx.export(graph, (pixels,), dynamo=True, opset_version=OPSET,
                                    input_names=["pixels"], output_names=["embedding"],
                                    dynamic_shapes={"pixels": {0: torch.export.Dim("B")}},
                                    optimize=True, verbose=False)
    for node in program.model.graph:
        if node.op_type in CONTROL_FLOW_OPS:
            raise RuntimeError(f"{name}: exported graph holds control flow ({node.op_type})")

    # Write into a scratch folder beside the target, then move: no half-written artifacts.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as scratch:
        tmp = Path(scratch) / name
        program.save(tmp, external_data=external_data)
        del program
        onnx.checker.check_model(str(tmp), full_check=not external_data)
        files = move_written_files(scratch, out_dir, last=name)
    path = out_dir / name
    io = io_signature(onnx.load(path, load_external_data=False))
    return {"path": str(path), "files": files, "io": io, "opset": OPSET,
            "seconds": round(time.perf_counter() - start, 2)}

