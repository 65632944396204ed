"""`novic-bench`: benchmark a bundle, or compare against the original-style PyTorch pipeline."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from novic.atomic import check_writable_file, write_json_atomic
from novic.bench.timing import spread_warning
from novic.cli._common import Backend, Precision, choice, err, run_app

app = typer.Typer(help="Benchmark a bundle against the original-style PyTorch pipeline.",
                  add_completion=False, no_args_is_help=True)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise typer.BadParameter(f"expected comma-separated positive integers, got {text!r}")
    return values


def _check_writable(path: Optional[Path]) -> None:
    """Fail now (an OSError: one line through run_app), before minutes of measuring."""
    if path is not None:
        check_writable_file(path)


@app.command("run")
def run_command(bundle: Path = typer.Argument(..., help="Bundle directory."),
                backend: Backend = typer.Option("auto", help="auto, ort-cpu, ort-cuda or trt."),
                precision: Optional[Precision] = typer.Option(None, case_sensitive=False,
                                                        help="Graph precision (ORT): fp32, fp16, int8, fp8."),
                batches: str = typer.Option("1,8,32,256", help="Batch sizes for throughput."),
                reps: int = typer.Option(10, min=1, help="Timed repetitions per measurement (after warm-up)."),
                threads: Optional[int] = typer.Option(None, min=1, help="onnxruntime intra-op threads."),
                json_out: Optional[Path] = typer.Option(None, "--json", help="Write all numbers here.")):
    """Time one bundle on one backend: latency, throughput, encoder, decoder, step time, memory."""
    from novic.bench.measure import run

    _check_writable(json_out)   # before minutes of measuring, not after
    result = run(str(bundle), backend=choice(backend), precision=choice(precision), batches=_ints(batches), reps=reps,
                 threads=threads)
    typer.echo(f"backend {result['backend']} ({result['precision']}): {result['reason']}")
    typer.echo(f"end-to-end 1 image: p50 {result['single']['p50_ms']:.1f} ms, p90 {result['single']['p90_ms']:.1f} ms")
    for key in ("single", "encoder", "decoder"):
        line = spread_warning(key, result[key])
        if line:
            err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    for b, m in result["throughput"].items():
        typer.echo(f"batch {b}: {m['img_per_s']:.1f} img/s")
    typer.echo(f"encoder: {result['encoder']['p50_ms']:.1f} ms; decoder (beam, guided): "
               f"{result['decoder']['p50_ms']:.1f} ms")
    steps = result["step_ms_by_position"]
    typer.echo("step ms by position: " + " ".join(f"{s:.2f}" for s in steps))
    typer.echo(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    if json_out is not None:
        write_json_atomic(json_out, result)


@app.command("compare")
def compare_command(config: str = typer.Option("paper", help="paper, large or tiny (random weights); paper "
                                               "and large build real-size models first (minutes, GBs)."),
                    backend: Backend = typer.Option("ort-cpu", help="Our backend."),
                    device: str = typer.Option("cpu", help="Device of the PyTorch baseline (cpu, cuda)."),
                    precision: Optional[Precision] = typer.Option(None, case_sensitive=False,
                                                            help="Graph precision (ORT): fp32, fp16, int8, fp8."),
                    batches: str = typer.Option("1,8", help="Batch sizes for throughput."),
                    reps: int = typer.Option(10, min=1, help="Timed repetitions per measurement."),
                    workdir: Path = typer.Option(Path.home() / ".cache" / "novic" / "bench",
                                                 help="Where the random-weight models and bundles live."),
                    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all numbers here.")):
    """Ours vs the original-style pipeline on the same weights, in the same run: prints ratios."""
    from rich.console import Console

    from novic.bench.compare import compare
    from novic.bench.setup import CONFIGS

    if config not in CONFIGS:
        raise typer.BadParameter(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):   # checked now, not after minutes of building
        raise typer.BadParameter(f"{device!r} is not cpu, cuda or cuda:N", param_hint="--device")
    _check_writable(json_out)
    result = compare(config, str(workdir), backend=choice(backend), device=device, precision=choice(precision),
                     batches=_ints(batches), reps=reps, console=Console(stderr=True))
    typer.echo(f"config {config}: {result['note']}")
    typer.echo(result["markdown"])
    for line in result["warnings"]:
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if json_out is not None:
        write_json_atomic(json_out, result)


def main():
    run_app(app, extra="export")
