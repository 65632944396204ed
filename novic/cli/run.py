"""`novic-run`: Classify images with a bundle.

    novic-run --bundle bundle/ photo.jpg photos/ 'shots/**/*.png'
    novic-run --bundle bundle/ --json --topk 3 photos/ > labels.jsonl
    cat photo.jpg | novic-run --bundle bundle/ -

Inputs: files (any extension), directories (their image files; --recursive descends), glob
patterns (quoted, `**` allowed), and '-' for one image on stdin. Output: a table (default) or JSON
lines (--json: {"source", "labels": [{"text", "logprob", "prob"}], "error"}; with --granularity or
--roll-up each label also has "fine" and "path", docs/labels.md). Bad inputs get one error line each
on stderr and do not stop the others; the exit code is 1 if any input failed, 2 for a usage error
(a bad option value or combination, refused before any image is read).
Imports are lazy so that `--help` and startup stay fast.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # startup = from here (module import) to a loaded classifier

import sys
from pathlib import Path
from typing import List, Optional

import typer

from rich.markup import escape

from novic.cli._common import (Backend, Precision, choice, err, error_line, fail, granularity_level,
                               granularity_option, max_pixels_option, parse_vocab, printable, roll_up_option, run_app, vocab_flag)
from novic.errors import cli_voice
from novic.inputs import expand_inputs

DEFAULT_TOPK = 5

app = typer.Typer(help="Classify images with a bundle.", add_completion=False, no_args_is_help=False)


@app.command()
@cli_voice
def main_command(
    images: Optional[List[str]] = typer.Argument(None, help="Image files, directories, glob patterns, or - for stdin."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", envvar="NOVIC_BUNDLE",
                                          help="Bundle directory (written by novic-export onnx)."),
    backend: Backend = typer.Option("auto", help="auto, ort-cpu, ort-cuda or trt."),
    precision: Optional[Precision] = typer.Option(None, case_sensitive=False,
                                                  help="Graph precision for ORT backends: fp32, fp16, int8, fp8 "
                                                       "(int8/fp8: the calibrated encoder, novic-export calib)."),
    topk: Optional[int] = typer.Option(None, "--topk", "-k", min=1, show_default=False,
                                       help=f"Labels per image (default {DEFAULT_TOPK}, or --beam-width if smaller)."),
    guided: bool = typer.Option(True, "--guided/--free", help="Restrict labels to a noun vocabulary, or decode freely."),
    vocab: Optional[List[str]] = vocab_flag(),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder/decoder batch."),
    beam_width: int = typer.Option(10, "--beam-width", min=1, help="Beam width (1 = greedy)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature."),
    alpha: float = typer.Option(0.0, help="Length normalisation exponent: beams compete by score * n**-alpha "
                                "at every step, as in the original release (labels keep the raw log-prob)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for image loading and onnxruntime."),
    verify: str = typer.Option("cached", help="Artifact hash check: full (sha256 every start), cached "
                               "(sha256 once, then remembered while size, mtime, ctime and inode stay: not proof "
                               "against disk bit rot, use full for that), size (sizes only)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into subdirectories."),
    max_pixels: Optional[int] = max_pixels_option(),
    fast_decode: bool = typer.Option(False, "--fast-decode", help="Decode JPEGs at a reduced scale (libjpeg DCT "
                                     "scaling, >= 2x the model's input size): several times faster for camera "
                                     "photos; pixels differ slightly from open_clip's."),
    granularity: str = granularity_option(),
    roll_up: Optional[Path] = roll_up_option(),
    json_lines: bool = typer.Option(False, "--json", help="Write JSON lines to stdout instead of a table."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Progress bar (default: on for more than one batch on a terminal)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the backend/startup line."),
    model: Optional[str] = typer.Option(None, "--model", "-m", envvar="NOVIC_MODEL",
                                        help="Released model to use without --bundle (downloaded and exported "
                                             "once into the cache; novic-import models lists them). Default: ta4."),
):
    """Classify images with a bundle: fine-grained noun labels with probabilities."""
    if not images:
        fail("no images given: pass image files, directories or glob patterns (or - for stdin)", code=2)
    if topk is None:   # beam search keeps beam-width hypotheses: --beam-width 1 alone is greedy, one label
        topk = min(DEFAULT_TOPK, beam_width)
        if topk < DEFAULT_TOPK and not quiet:
            err.print(f"[yellow]note:[/] --beam-width {beam_width} gives at most {beam_width} label(s) per image",
                      highlight=False)
    elif topk > beam_width:
        fail(f"--topk {topk} exceeds --beam-width {beam_width}: beam search keeps --beam-width hypotheses; "
             f"raise --beam-width to at least {topk}", code=2)
    vocab = parse_vocab(vocab, guided)

    level = granularity_level(granularity, roll_up)

    modes = {"full": True, "cached": "cached", "size": False}
    if verify not in modes:
        fail(f"--verify {verify!r}: use full, cached or size", code=2)
    inputs, problems = expand_inputs(images, recursive)
    for line in problems:
        error_line(line)
    if not inputs:
        raise SystemExit(1)

    if bundle is None:  # the default released model, prepared once in the cache (novic.registry)
        from novic.registry import default_bundle
        bundle = default_bundle(model, console=err)

    import logging
    import warnings

    from PIL import Image

    from novic.errors import NovicError
    from novic.runtime.classifier import Classifier, ClassifierError
    from novic.runtime.hierarchy import rollup_for

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the hard limit still errors
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    logging.getLogger("novic").addHandler(logging.NullHandler())   # its lines are printed below, once
    clf = Classifier.load(bundle, backend=choice(backend), precision=choice(precision),
                          threads=threads, verify=modes[verify], fast_decode=fast_decode)
    try:   # what needs the bundle (the decoder's top-k, the vocabulary), before any image is read
        vocabulary = clf.check_options(topk=topk, guided=guided, vocab=vocab, beam_width=beam_width,
                                       temperature=temperature, alpha=alpha)[4]   # built once, used below
        rollup = rollup_for(clf.bundle, level)
    except (ClassifierError, NovicError) as exc:
        fail(str(exc), code=2)
    startup = time.perf_counter() - _T0
    if not quiet:
        err.print(f"novic-run: {escape(printable(clf.describe()))} (startup {startup:.2f} s)", highlight=False,
                  soft_wrap=True)
    summary = vocabulary.skipped_summary() if vocabulary is not None else None
    for line in (summary, rollup.unknown_summary() if rollup is not None else None):
        if line:
            err.print(f"[yellow]warning:[/] {escape(printable(line))}", highlight=False, soft_wrap=True)

    results_iter = clf.iter_classify(inputs, topk=topk, guided=guided, vocab=vocabulary, beam_width=beam_width,
                                     temperature=temperature, alpha=alpha, batch_size=batch_size,
                                     granularity=level)
    show_bar = progress if progress is not None else (len(inputs) > batch_size and err.is_terminal)
    failed, rows = 0, []
    t_run = time.perf_counter()
    with _progress(show_bar, len(inputs)) as advance:
        for result in results_iter:
            if result.error is not None:
                failed += 1
                error_line(result.error)
            if json_lines:
                _write_json(result)
            elif result.error is None:
                rows.append(result)
            advance()
    elapsed = time.perf_counter() - t_run
    if not json_lines:
        _print_table(rows, topk)
    if not quiet:
        rate = len(inputs) / elapsed if elapsed > 0 else float("inf")
        err.print(f"novic-run: {len(inputs)} image(s), {failed} failed, {elapsed:.2f} s ({rate:.1f} img/s)",
                  highlight=False)
    clf.close()
    raise SystemExit(1 if failed or problems else 0)


def _write_json(result) -> None:
    import json

    sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _print_table(rows, topk: int) -> None:
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text   # plain text: no markup in file names or labels

    table = Table(show_lines=topk > 1)
    table.add_column("image", overflow="fold")
    table.add_column("label")
    table.add_column("prob", justify="right")
    for r in rows:
        table.add_row(Text(printable(r.source)), Text("\n".join(printable(_shown(l)) for l in r.labels)),
                      "\n".join(_prob(l.prob) for l in r.labels))
    Console().print(table)


def _shown(label) -> str:
    """A label for the table: a rolled-up one shows the fine label it came from."""
    return label.text if label.fine is None or label.fine == label.text else f"{label.text} ({label.fine})"


def _prob(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


class _progress:
    """A rich progress bar on stderr (rate and ETA), or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("classifying"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=err, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("classifying", total=self.total, rate="")
        start, done = time.perf_counter(), [0]

        def advance():
            done[0] += 1
            elapsed = time.perf_counter() - start
            self.bar.update(task, advance=1, rate=f"{done[0] / elapsed:.1f} img/s" if elapsed > 0 else "")

        return advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def main():
    run_app(app)
