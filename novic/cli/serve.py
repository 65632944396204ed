"""`novic-serve BUNDLE`: serve a bundle over HTTP on Ray Serve (default) or Triton.

    novic-serve bundle/ --replicas 2 --port 8000                 # a local Ray cluster
    novic-serve bundle/ --address auto --gpus-per-replica 1      # join `ray start`'s cluster
    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/classify?topk=3'
    novic-serve bundle/ --engine triton --port 8000              # NVIDIA Triton (PyTriton)

The engines answer different endpoints. Ray: POST image bytes (or JSON) to /classify, answered
with the record novic-run --json writes (contract in novic.serve.ray_serve). Triton: the KServe v2
protocol at /v2/models/novic/infer (contract in novic.serve.triton). Options marked [ray] or
[triton] belong to one engine; setting one for the other engine is a usage error (exit 2). The
engines are imported only when chosen, each naming its extra when missing (`pip install 'novic[ray]'`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from enum import Enum

from novic.cli._common import Backend, Precision, choice, fail, run_app

app = typer.Typer(help="Serve a bundle over HTTP (Ray Serve or Triton).", add_completion=False,
                  no_args_is_help=True)

Engine = Enum("Engine", {"ray": "ray", "triton": "triton"}, type=str)


def _named_files(flag: str, pairs: List[str], what: str) -> dict:
    """NAME=FILE values of a repeatable option -> {name: absolute path}."""
    named = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            fail(f"{flag} {pair!r}: give NAME=FILE (a text file with one {what} per line)", code=2)
        named[name] = str(Path(path).resolve())
    return named


@app.command()
def main_command(
    bundle: Path = typer.Argument(..., help="Bundle directory (written by novic-export onnx)."),
    engine: Engine = typer.Option("ray", help="ray (Ray Serve) or triton (NVIDIA Triton through PyTriton)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="HTTP port."),
    backend: Backend = typer.Option("auto", help="auto, ort-cpu, ort-cuda or trt."),
    precision: Optional[Precision] = typer.Option(None, case_sensitive=False,
                                                  help="Graph precision for ORT backends (fp32, fp16, int8, fp8)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most requests classified in one batch."),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", min=0, help="How long a batch waits to fill."),
    # Ray Serve only (None: not given; the engine's own default applies)
    replicas: Optional[int] = typer.Option(None, min=1, help="[ray] Classifier replicas (one Classifier each); "
                                           "default 1."),
    gpus_per_replica: Optional[float] = typer.Option(None, "--gpus-per-replica", min=0,
                                                     help="[ray] GPUs per replica; default 0 (CPU)."),
    cpus_per_replica: Optional[float] = typer.Option(None, "--cpus-per-replica", min=0.01,
                                                     help="[ray] CPUs per replica; default 1."),
    autoscaling: Optional[str] = typer.Option(None, help="[ray] Serve's autoscaling_config as JSON, e.g. "
                                              "'{\"min_replicas\": 1, \"max_replicas\": 4}' (replaces --replicas)."),
    address: Optional[str] = typer.Option(None, help="[ray] Ray cluster to join ('auto': the one `ray start` "
                                          "made here); default: start a local one."),
    vocab: List[str] = typer.Option([], "--vocab", help="[ray] NAME=FILE: a server-side vocabulary that "
                                    "requests pick with vocab=NAME (repeatable)."),
    roll_up: List[str] = typer.Option([], "--roll-up", help="[ray] NAME=FILE: a server-side roll-up list (one "
                                      "target label per line) that requests pick with granularity=NAME "
                                      "(repeatable; fine, basic and coarse need none)."),
    threads: Optional[int] = typer.Option(None, min=1, help="onnxruntime threads per replica (Triton: per server)."),
    fast_decode: Optional[bool] = typer.Option(None, "--fast-decode", help="[ray] Decode JPEGs at a reduced scale.",
                                               show_default=False),
    max_bytes: Optional[int] = typer.Option(None, "--max-bytes", min=1,
                                            help="[ray] Largest request body (else 413); default 64 MiB."),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", min=0.001,
                                                    help="[ray] Seconds a request may wait for a replica "
                                                    "(else 503); default 60."),
    # Triton only
    grpc_port: Optional[int] = typer.Option(None, "--grpc-port", min=1, max=65535, help="[triton] gRPC port; "
                                            "default 8001."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=1, max=65535,
                                               help="[triton] Metrics port; default 8002."),
    topk: Optional[int] = typer.Option(None, min=1, help="[triton] Labels per image unless a request sends "
                                       "topk; default 5."),
    stub_env: Optional[Path] = typer.Option(None, "--stub-env", help="[triton] numpy-1 venv for Triton's Python "
                                            "stub (scripts/triton-stub-venv.sh; default $NOVIC_TRITON_STUB_ENV)."),
):
    """Serve BUNDLE over HTTP. Ray (default): POST image bytes to /classify, answered as novic-run
    --json writes them. Triton: the KServe v2 protocol at /v2/models/novic/infer."""
    backend, precision = choice(backend), choice(precision)
    ray_only = {"--replicas": replicas, "--gpus-per-replica": gpus_per_replica,
                "--cpus-per-replica": cpus_per_replica, "--autoscaling": autoscaling, "--address": address,
                "--vocab": vocab or None, "--roll-up": roll_up or None, "--fast-decode": fast_decode,
                "--max-bytes": max_bytes, "--request-timeout": request_timeout}
    triton_only = {"--grpc-port": grpc_port, "--metrics-port": metrics_port, "--topk": topk, "--stub-env": stub_env}
    engine = choice(engine)
    other, kind, foreign = ("triton", "a Triton", triton_only) if engine == "ray" else \
        ("ray", "a Ray Serve", ray_only)
    for flag, value in foreign.items():
        if value is not None:
            fail(f"{flag} is {kind} option; drop it or use --engine {other}", code=2)
    if engine == "triton":
        from novic.serve.triton import serve as triton_serve

        given = {name: value for name, value in dict(grpc_port=grpc_port, metrics_port=metrics_port,
                                                     topk=topk).items() if value is not None}
        triton_serve(str(bundle), host=host, http_port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     backend=backend, precision=precision, threads=threads, stub_env=stub_env, **given)
        return
    scaling = None
    if autoscaling is not None:
        try:
            scaling = json.loads(autoscaling)
        except ValueError as exc:
            fail(f"--autoscaling: not JSON ({exc}); e.g. '{{\"min_replicas\": 1, \"max_replicas\": 4}}'", code=2)
        if not isinstance(scaling, dict):
            fail("--autoscaling: give a JSON object such as '{\"min_replicas\": 1, \"max_replicas\": 4}'", code=2)
    from novic.serve.ray_serve import serve

    given = {name: value for name, value in dict(
        replicas=replicas, gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
        fast_decode=fast_decode, max_bytes=max_bytes, request_timeout_s=request_timeout).items()
        if value is not None}
    serve(bundle, address=address, host=host, port=port, autoscaling=scaling, backend=backend,
          precision=precision, threads=threads, max_batch=max_batch, batch_wait_s=max_wait_ms / 1e3,
          vocabularies=_named_files("--vocab", vocab, "noun"),
          rollups=_named_files("--roll-up", roll_up, "target label"), **given)


def main():
    run_app(app)
