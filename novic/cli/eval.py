"""`novic-eval`: Measure a bundle on a labelled image set.

    novic-eval --bundle bundle/ photos/            # photos/CLASS/IMAGE.jpg
    novic-eval --bundle bundle/ labels.csv --granularity basic --out report/

Prints top-1 / top-5 (synonym-aware), the hierarchy-aware correct / close / incorrect split, the
worst classes and the throughput; writes eval.json, eval.md and (with matplotlib) per_class.png to
--out. Scoring rules: novic.evaluation and docs/labels.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from novic.cli._common import (Backend, Precision, choice, err, fail, granularity_level, granularity_option,
                               one_line_errors, parse_vocab, roll_up_option, run_app, vocab_flag)
from novic.errors import cli_voice

TOP_K = 5   # top-1 and top-5 are reported

app = typer.Typer(help="Measure a bundle on a labelled image set.", add_completion=False, no_args_is_help=True)


@app.command()
@cli_voice
def main_command(
    data: Path = typer.Argument(..., help="Folder of class folders (ImageFolder) or a CSV of path,label."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", envvar="NOVIC_BUNDLE",
                                          help="Bundle directory (written by novic-export onnx)."),
    backend: Backend = typer.Option("auto", help="auto, ort-cpu, ort-cuda or trt."),
    precision: Optional[Precision] = typer.Option(None, case_sensitive=False,
                                                  help="Graph precision for ORT backends: fp32, fp16, int8, fp8."),
    granularity: str = granularity_option("Score at this level: fine, basic or coarse."),
    roll_up: Optional[Path] = roll_up_option("File of target labels to score at (instead of --granularity)."),
    guided: bool = typer.Option(True, "--guided/--free", help="Restrict labels to a noun vocabulary, or decode freely."),
    vocab: Optional[List[str]] = vocab_flag(),
    beam_width: int = typer.Option(10, "--beam-width", min=1, help="Beam width (top-5 needs at least 5)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder/decoder batch."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for image loading and onnxruntime."),
    out: Path = typer.Option(Path("novic-eval"), "--out", "-o", help="Folder for eval.json, eval.md, per_class.png."),
    model: Optional[str] = typer.Option(None, "--model", "-m", envvar="NOVIC_MODEL",
                                        help="Released model to use without --bundle (see novic-import models)."),
):
    """Top-1/top-5, hierarchy-aware scores, per-class table, confusions and throughput on DATA."""
    level = granularity_level(granularity, roll_up)
    vocab = parse_vocab(vocab, guided)
    with one_line_errors():   # bad DATA, bundle or --out: one line, also when the app is called directly
        _run(data, bundle, choice(backend), choice(precision), level, guided, vocab, beam_width, batch_size, threads, out, model)


def _run(data, bundle, backend, precision, level, guided, vocab, beam_width, batch_size, threads, out, model):
    from novic.atomic import check_writable_dir
    from novic.evaluation import read_dataset

    samples = read_dataset(data)
    check_writable_dir(out)
    if bundle is None:
        from novic.registry import default_bundle
        bundle = default_bundle(model, console=err)

    import logging

    from novic.evaluation import evaluate, write_report
    from novic.runtime.classifier import Classifier, ClassifierError

    logging.getLogger("novic").addHandler(logging.NullHandler())
    with Classifier.load(bundle, backend=backend, precision=precision, threads=threads, verify="cached") as clf:
        try:   # options the bundle cannot use are a usage error, refused before any image is read
            clf.check_options(topk=min(TOP_K, beam_width), guided=guided, vocab=vocab, beam_width=beam_width)
        except ClassifierError as exc:
            fail(str(exc), code=2)
        err.print(f"novic-eval: {len(samples)} image(s) in {len(set(s.label for s in samples))} class(es); "
                  f"{clf.describe()}", highlight=False, soft_wrap=True)
        report = evaluate(clf, samples, granularity=level, guided=guided, vocab=vocab, beam_width=beam_width,
                          batch_size=batch_size, k=TOP_K)
    paths, skipped = write_report(report, out, str(data))
    _print_summary(report)
    if skipped:
        from rich.markup import escape
        err.print(f"note: {escape(skipped)}", highlight=False, soft_wrap=True)
    err.print("novic-eval: wrote " + ", ".join(str(p) for p in paths), highlight=False, soft_wrap=True)
    raise SystemExit(1 if report["scored"] == 0 else 0)


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape

    from novic.cli._common import error_line, printable
    from novic.evaluation import percent

    for e in report["errors"]:
        error_line(e["error"])
    for note in report["notes"]:
        err.print(f"[yellow]note:[/] {escape(printable(note))}", highlight=False, soft_wrap=True)
    k, h, t = report["k"], report["hierarchy"], report["throughput"]
    out = Console()
    out.print(f"images {report['images']} ({report['scored']} scored, {report['failed']} failed)  "
              f"top-1 {percent(report['top1'])}  top-{k} {percent(report[f'top{k}'])}", highlight=False)
    if h is not None:
        out.print(f"top-1 by the hierarchy: correct {percent(h['correct'])}, close {percent(h['close'])}, "
                  f"incorrect {percent(h['incorrect'])}", highlight=False)
    for c in report["confusions"][:5]:
        out.print(f"confused: {printable(c['class'])} -> {printable(c['predicted'])} ({c['count']}x)", highlight=False)
    out.print(f"throughput {t['images_per_second']} images/s", highlight=False)


def main():
    run_app(app)
