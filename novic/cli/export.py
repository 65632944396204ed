"""`novic-export`: Export a checkpoint to an ONNX/TensorRT bundle.

    novic-export onnx --checkpoint CKPT [--clip NAME] [--pretrained TAG|PATH] [--tokenizer FILE] --out DIR [--no-fp16] [--no-fused] [--no-u8] [--topk 10] [--force]
    novic-export trt DIR [--buckets 1,8,32,256]
    novic-export check DIR [--n 200]
    novic-export calib DIR [--images DIR] [--n 64] [--method dynamic|static]
    novic-export triton DIR --out REPO [--target cpu|gpu] [--max-batch 32] [--instances 1]

Heavy libraries (torch, open_clip, onnx, tensorrt) are imported inside the commands, so that
``--help`` works in a runtime-only install.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from enum import Enum

from novic.cli._common import choice, err, run_app
from novic.errors import cli_voice

app = typer.Typer(help="Export a checkpoint to an ONNX/TensorRT bundle.", add_completion=False,
                  no_args_is_help=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command("onnx")
def onnx_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="novic checkpoint (.safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to write."),
    clip: Optional[str] = typer.Option(None, "--clip", help="open_clip model name (default: the checkpoint's)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained",
                                             help="open_clip pretrained tag or weights file (default: the checkpoint's; "
                                                  "offline: the open_clip_model.safetensors of its hub repo)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="Text tokenizer file for the bundle (spiece.model of a SigLIP model) "
                                                  "instead of fetching it from the Hugging Face hub (offline export)."),
    fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Also write fp16 graphs (for GPU backends and TensorRT)."),
    fused: bool = typer.Option(True, "--fused/--no-fused",
                               help="Also write onnxruntime's fused graphs (com.microsoft ops), each gated against fp32."),
    u8: bool = typer.Option(True, "--u8/--no-u8",
                            help="Also write image encoders taking uint8 pixels (normalised in the graph; ort-cuda's), "
                                 "each gated against its float graph."),
    topk: int = typer.Option(10, "--topk", min=1, help="Candidates per row returned by the decoder graphs (>= beam width)."),
    beam_width: int = typer.Option(10, "--beam-width", min=1, help="Default beam width recorded in the bundle."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out (the whole directory, with anything else in it)."),
):
    """Checkpoint + CLIP image tower -> bundle (ONNX graphs, fp16 variants, manifest)."""
    from rich.table import Table

    from novic.export.bundle import export_bundle

    result = export_bundle(checkpoint, out, clip=clip, pretrained=pretrained, tokenizer=tokenizer, fp16=fp16,
                           fused=fused, u8=u8, topk=topk, beam_width=beam_width, overwrite=force, console=err)
    table = Table(title=f"bundle {result['path']}")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in result["artifacts"]:
        table.add_row(name, _size(size))
    err.print(table)
    err.print(f"exported in {result['seconds']:.1f} s", highlight=False)


@app.command("trt")
def trt_command(
    bundle: Path = typer.Argument(..., help="Bundle directory (written by novic-export onnx)."),
    buckets: str = typer.Option("1,8,32,256", "--buckets",
                                help="Batch buckets in images; one optimization profile each."),
    beam_width: Optional[int] = typer.Option(None, "--beam-width", min=1,
                                             help="Beams per image the decoder engines are sized for (default: the bundle's)."),
    precision: str = typer.Option("fp16", "--precision",
                                  help="Which graphs to build from: fp16 (default), fp32, or int8/fp8 (the image encoder "
                                       "from novic-export calib's Q/DQ graph, the decoder from fp16)."),
    workspace: Optional[float] = typer.Option(None, "--workspace", help="Builder workspace limit in GiB."),
    force: bool = typer.Option(False, "--force", help="Rebuild engines that are already up to date."),
    verbose: bool = typer.Option(False, "--verbose", help="TensorRT's verbose log."),
):
    """Build TensorRT engines for this GPU from the bundle's graphs and record them in the manifest
    (an interrupted build resumes: engines already built for the same graphs are kept)."""
    from rich.table import Table

    from novic.export.tensorrt import build_engines
    from novic.runtime.trt_plan import PlanError, normalize_buckets

    from novic.runtime.bundle import PRECISIONS

    precision = precision.lower()
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"{precision!r} is not one of {', '.join(PRECISIONS)}", param_hint="--precision")
    try:
        parsed = normalize_buckets(buckets)
    except PlanError as exc:
        raise typer.BadParameter(str(exc), param_hint="--buckets") from None
    result = build_engines(bundle, buckets=parsed, beam_width=beam_width, precision=precision,
                           workspace_gib=workspace, force=force, console=err, verbose=verbose)
    table = Table(title=f"TensorRT {result['tensorrt_version']} engines for {result['gpu']} "
                        f"(sm_{result['compute_capability'].replace('.', '')})")
    for col in ("engine", "size", "build"):
        table.add_column(col)
    for e in result["engines"]:
        table.add_row(e["file"], _size(e["size"]), f"{e['build_seconds']:.0f} s")
    err.print(table)
    if result["skipped"]:
        err.print(f"up to date, not rebuilt: {', '.join(result['skipped'])}", highlight=False)
    err.print(f"built in {result['seconds']:.0f} s; recorded in {bundle / 'manifest.json'}", highlight=False)


@app.command("check")
def check_command(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    n: int = typer.Option(200, "--n", min=1, help="Random unit embeddings for the decoder comparison."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="The checkpoint the bundle came from (default: as recorded)."),
    beam_width: Optional[int] = typer.Option(None, "--beam-width", min=1, help="Beam width to compare (default: the bundle's)."),
    images: int = typer.Option(2, "--images", min=0, help="Random-noise images besides the sample photos."),
    reference: bool = typer.Option(False, "--reference",
                                   help="Compare with the full-recompute reference decoders (slow) instead of "
                                        "the PyTorch decoder with KV cache."),
):
    """Compare the bundle's graphs with the PyTorch oracle: max errors, cosine, token agreement."""
    from novic.export.bundle import check_bundle

    result = check_bundle(bundle, n=n, checkpoint=checkpoint, beam_width=beam_width, n_images=images,
                          reference=reference, console=err)
    if not result["ok"]:
        err.print("[bold red]check failed:[/] an fp32 graph disagrees with the PyTorch oracle; "
                  "re-export with novic-export onnx", highlight=False)
        raise typer.Exit(1)
    err.print("check passed", highlight=False)


@app.command("calib")
@cli_voice
def calib_command(
    bundle: Path = typer.Argument(..., help="Bundle directory (written by novic-export onnx)."),
    images: Optional[Path] = typer.Option(None, "--images",
                                          help="Folder of calibration images from your domain (default: built-in sample photos)."),
    n: int = typer.Option(64, "--n", min=1, help="Calibration images."),
    heldout: int = typer.Option(40, "--heldout", min=1, help="Held-out images for the accuracy gates."),
    method: str = typer.Option("dynamic", "--method",
                               help="dynamic (int8, fastest on the CPU, onnxruntime only), static (int8 Q/DQ, symmetric, "
                                    "calibrated: CPU and TensorRT), modelopt-int8 or modelopt-fp8 (NVIDIA ModelOpt "
                                    "Q/DQ for TensorRT; needs --modelopt-python)."),
    modelopt_python: Optional[str] = typer.Option(None, "--modelopt-python", envvar="NOVIC_MODELOPT_PYTHON",
                                                  help="Python of a venv with nvidia-modelopt[onnx] "
                                                       "(bash scripts/modelopt-venv.sh DIR)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image draw."),
    min_cosine: float = typer.Option(0.99, "--min-cosine", min=-1.0, max=1.0,
                                     help="Gate: mean embedding cosine vs fp32."),
    min_agreement: float = typer.Option(0.97, "--min-agreement", min=0.0, max=1.0,
                                        help="Gate: top-1 label agreement vs fp32 (0 turns it off)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Quantise and gate, but do not write into the bundle."),
):
    """Quantise the image encoder (INT8, or FP8 for TensorRT), check it against fp32 on held-out
    images (embedding cosine, top-1 labels) and add it to the bundle only if it passes
    (use it with novic-run --precision int8|fp8, or novic-export trt --precision int8|fp8)."""
    from novic.calib.run import METHODS, calibrate_bundle

    if method not in METHODS:
        raise typer.BadParameter(f"{method!r} is not one of {', '.join(METHODS)}", param_hint="--method")
    result = calibrate_bundle(bundle, images=images, n=n, n_heldout=heldout, method=method, seed=seed,
                              min_mean_cosine=min_cosine, min_agreement=min_agreement, console=err,
                              dry_run=dry_run, modelopt=modelopt_python)
    prec = result["precision"]
    if not result["gates"]["passed"]:
        err.print(f"[bold red]gate failed, {prec} encoder not written:[/] {'; '.join(result['gates']['reasons'])}",
                  highlight=False)
        raise typer.Exit(1)
    err.print(f"{prec} encoder {'written to ' + result['path'] if result['written'] else 'passed (dry run, not written)'}"
              f" in {result['seconds']:.1f} s", highlight=False)


# novic.serve.triton_repo's TARGETS / ENCODER_BACKENDS (not imported: --help stays light; a test
# compares them), as typer choices so that a bad value is a usage error (exit 2).
TritonTarget = Enum("TritonTarget", {"cpu": "cpu", "gpu": "gpu"}, type=str)
TritonPrecision = Enum("TritonPrecision", {"fp32": "fp32", "fp16": "fp16"}, type=str)
EncoderBackend = Enum("EncoderBackend", {"onnxruntime": "onnxruntime", "python": "python"}, type=str)


@app.command("triton")
def triton_command(
    bundle: Path = typer.Argument(..., help="Bundle directory (written by novic-export onnx)."),
    out: Path = typer.Option(..., "--out", "-o", help="Triton model repository to write."),
    target: TritonTarget = typer.Option("cpu", "--target", help="cpu (fp32, KIND_CPU) or gpu (fp16 graphs if the bundle has "
                                                         "them, the image encoder on KIND_GPU)."),
    precision: Optional[TritonPrecision] = typer.Option(None, "--precision", case_sensitive=False,
                                                         help="fp32 or fp16 graphs (default: by --target)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Images per dynamic batch (max_batch_size)."),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", min=0, help="How long Triton waits to fill a batch."),
    instances: int = typer.Option(1, "--instances", min=1, help="Model instances (instance_group count)."),
    topk: int = typer.Option(5, "--topk", min=1, help="Labels per image when a request does not say."),
    encoder_backend: EncoderBackend = typer.Option("onnxruntime", "--encoder-backend",
                                        help="onnxruntime (Triton's backend) or python (novic's onnxruntime wrapper in "
                                             "the Python backend, for servers without the onnxruntime backend)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing repository at --out."),
):
    """Bundle -> Triton Inference Server model repository (docs/triton.md)."""
    from novic.serve.triton_repo import export_triton_repo

    result = export_triton_repo(bundle, out, target=choice(target), precision=choice(precision), max_batch=max_batch,
                                max_wait_ms=max_wait_ms, instances=instances, topk=topk,
                                encoder_backend=choice(encoder_backend), force=force)
    plan = result["plan"]
    for name, size in result["files"]:
        err.print(f"  {name}  {_size(size)}", highlight=False)
    err.print(f"Triton repository {result['path']}: image encoder {plan.encoder_precision} ({plan.encoder_backend} "
              f"backend), decoder {plan.decoder_precision}; run it with "
              f"tritonserver --model-repository {result['path']}", highlight=False)


def main():
    err.soft_wrap = True  # an error stays one line however long it is (the terminal wraps it)
    run_app(app, extra="export")
