"""`novic-import`: Import a released NOVIC checkpoint (.train or release .zip).

    novic-import vitb16_ft2_ta4_ovod_20240610_105233.zip --out ta4.safetensors
    novic-import ovod_chunk0433_20240610_105233.train --out ta4.safetensors --tokenizer spiece.model
    novic-import models            # the released models and what the cache holds
    novic-import fetch ta4         # download + import + export into the cache (what novic-run does)

The original file is read with torch.load(weights_only=True): a file that would need arbitrary
unpickling is refused. Imports of torch/open_clip are lazy so that --help and `models` stay fast.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from novic.cli._common import err, fail, run_app

app = typer.Typer(help="Import a released NOVIC checkpoint (.train or release .zip).", add_completion=False,
                  no_args_is_help=True)
models_app = typer.Typer(help="List the released NOVIC models and what the cache holds.", add_completion=False)
fetch_app = typer.Typer(help="Download, import and export a released model into the cache.", add_completion=False)


@app.command()
def main_command(
    file: Path = typer.Argument(..., help="Original checkpoint: a .train file or a release .zip."),
    out_text: str = typer.Option(..., "--out", "-o", metavar="<path>",
                                 help="Output novic checkpoint file (.safetensors)."),
    embedder: Optional[str] = typer.Option(None, "--embedder",
                                           help="CLIP model instead of the one cfg_flat names, in the original's "
                                                "form (e.g. openclip:timm/ViT-B-16-SigLIP)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="Local tokenizer file instead of the CLIP model's own: "
                                                  "sentencepiece .model (SigLIP) or CLIP BPE merges .txt.gz."),
    heads: Optional[int] = typer.Option(None, "--heads", min=1, help="Attention heads (default: from cfg_flat, else 8)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
):
    """Convert an original NOVIC checkpoint into novic's checkpoint format.

    Other commands: 'novic-import models' lists the released models and what the cache holds;
    'novic-import fetch [ID]' downloads, imports and exports a released model into the cache.
    """
    out = Path(out_text)
    # Path() drops a trailing slash: look at the text, so that 'outdir/' is not written as a file 'outdir'
    if out_text.endswith(("/", os.sep)) or out.is_dir():
        fail(f"--out {out_text} names a directory: give the checkpoint file to write, e.g. "
             f"--out {out / (file.stem + '.safetensors')}", code=2)
    if out.exists() and not force:
        fail(f"{out} exists; pass --force to overwrite it", code=2)
    if out.suffix != ".safetensors":
        err.print(f"[yellow]note:[/] {out} is written in safetensors format", highlight=False)
    from novic.model.importer import CheckpointImportError, import_checkpoint, parse_embedder_spec, summary

    try:
        spec = parse_embedder_spec(embedder) if embedder else None
    except CheckpointImportError as exc:   # a malformed option value: a usage error
        raise typer.BadParameter(str(exc), param_hint="--embedder") from None
    result = import_checkpoint(file, out, embedder=spec, heads=heads, tokenizer_file=tokenizer)
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    err.print(f"imported {summary(result)}", highlight=False, soft_wrap=True)
    err.print(f"wrote {out}; next: novic-export onnx --checkpoint {shlex.quote(str(out))} --out BUNDLE_DIR",
              markup=False, highlight=False, soft_wrap=True)


@models_app.command()
def models_command(
    json_out: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
):
    """The released models and what the cache ($NOVIC_CACHE) holds for each."""
    from novic.registry import cache_dir, list_models

    rows = list_models()
    if json_out:
        import json
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("id", "CLIP model (open_clip hub id)", "F", "nouns", "cached"):
        table.add_column(col, no_wrap=col != "cached")
    for r in rows:
        if r["bundle"]:
            cached = "bundle"
        elif r["checkpoint"]:
            cached = "checkpoint"
        elif r["zip"]:
            cached = "zip"
        elif r["partial"]:
            cached = f"partial ({r['partial'] / 2**20:.0f} MiB)"
        else:
            cached = "-"
        table.add_row(r["id"] + (" *" if r["default"] else ""), r["clip"], str(r["embed_dim"]), r["vocab"], cached)
    console = Console()
    console.print(table)
    console.print(f"* default for novic-run without --bundle (NOVIC_MODEL changes it); cache: {cache_dir()} "
                  f"(NOVIC_CACHE changes it)", highlight=False, soft_wrap=True)


@fetch_app.command()
def fetch_command(
    model: Optional[str] = typer.Argument(None, help="Model id (default: NOVIC_MODEL or ta4)."),
    force: bool = typer.Option(False, "--force", help="Re-import and re-export even if cached."),
):
    """Prepare a released model in the cache (download, import, export); print the bundle path."""
    from novic.registry import ensure_bundle

    path = ensure_bundle(model, force=force)
    sys.stdout.write(f"{path}\n")


def main():
    # `models` and `fetch` are separate apps: the import command takes a file as its first argument.
    sub = {"models": models_app, "fetch": fetch_app}.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if sub is not None:
        sys.argv = [f"{sys.argv[0]} {sys.argv[1]}"] + sys.argv[2:]
        run_app(sub, extra="export")
    else:
        run_app(app, extra="export")
