"""`novic-label INPUT... --out OUT`: label an image collection on Ray Data, resumably.

    novic-label photos/ 'shots/**/*.jpg' list.txt --bundle bundle/ --out labels/
    novic-label photos/ --bundle bundle/ --out labels/ --format parquet --concurrency 4 --gpus-per-worker 1

A command of its own rather than `novic-run --ray`: novic-run streams results to stdout in input
order and fails fast; a labelling job writes a directory that a rerun resumes, in completion order,
and takes cluster options (actors, GPUs per actor, a cluster address) that mean nothing to
novic-run. See novic.serve.ray_label for the pipeline and the output.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from enum import Enum

from novic.cli._common import (Backend, Precision, choice, err, error_line, fail, granularity_level,
                               granularity_option, max_pixels_option, parse_vocab, roll_up_option, run_app,
                               vocab_flag)
from novic.errors import cli_voice

OutputFormat = Enum("OutputFormat", {"jsonl": "jsonl", "parquet": "parquet"}, type=str)

app = typer.Typer(help="Label an image collection on Ray Data (resumable).", add_completion=False,
                  no_args_is_help=True)


@app.command()
@cli_voice
def main_command(
    inputs: List[str] = typer.Argument(..., help="Directories (whole tree), glob patterns, list files "
                                       "(*.txt/*.lst, one path or URI per line)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory of parts; a rerun skips what it holds."),
    bundle: Path = typer.Option(..., "--bundle", "-b", envvar="NOVIC_BUNDLE", help="Bundle directory."),
    fmt: OutputFormat = typer.Option("jsonl", "--format", help="jsonl or parquet."),
    concurrency: int = typer.Option(1, min=1, help="Classifier actors (one Classifier each)."),
    gpus_per_worker: float = typer.Option(0, "--gpus-per-worker", min=0, help="GPUs per actor (0 on CPU)."),
    cpus_per_worker: float = typer.Option(1, "--cpus-per-worker", min=0.01, help="CPUs per actor."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per decode task and classifier call."),
    backend: Backend = typer.Option("auto", help="auto, ort-cpu, ort-cuda or trt."),
    precision: Optional[Precision] = typer.Option(None, case_sensitive=False,
                                                  help="Graph precision for ORT backends."),
    topk: int = typer.Option(5, "--topk", "-k", min=1, help="Labels per image."),
    guided: bool = typer.Option(True, "--guided/--free", help="Restrict labels to a noun vocabulary, or decode freely."),
    vocab: Optional[List[str]] = vocab_flag(),
    beam_width: int = typer.Option(10, "--beam-width", min=1, help="Beam width (1 = greedy)."),
    granularity: str = granularity_option(),
    roll_up: Optional[Path] = roll_up_option(),
    fast_decode: bool = typer.Option(False, "--fast-decode", help="Decode JPEGs at a reduced scale."),
    max_pixels: Optional[int] = max_pixels_option(),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join ('auto': the one `ray start` made "
                                          "here); default: start a local one."),
):
    """Label every image under INPUT... into OUT (path, labels, probs, logprobs, error per row)."""
    from novic.serve.ray_label import OptionsError, label, summary_line

    level = granularity_level(granularity, roll_up)
    vocab = parse_vocab(vocab, guided)
    try:
        summary = label(inputs, out, bundle=bundle, fmt=choice(fmt), concurrency=concurrency,
                        gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
                        backend=choice(backend), precision=choice(precision), topk=topk, guided=guided, vocab=vocab,
                        beam_width=beam_width, fast_decode=fast_decode, max_pixels=max_pixels, granularity=level,
                        address=address)
    except OptionsError as exc:
        fail(str(exc), code=2)
    for line in summary.problems:
        error_line(line)
    if summary.inputs == 0:
        fail("no images found in the inputs", code=1)
    err.print(summary_line(summary, str(out)), highlight=False, soft_wrap=True)
    raise SystemExit(1 if summary.problems else 0)


def main():
    run_app(app)
