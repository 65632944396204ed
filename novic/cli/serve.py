"""`novic-serve BUNDLE`: serve a bundle over HTTP on Ray Serve (default) or Triton.

    novic-serve bundle/ --replicas 2 --port 8000                 # a local Ray cluster
    novic-serve bundle/ --address auto --gpus-per-replica 1      # join `ray start`'s cluster
    novic-serve bundle/ --engine triton --port 8000              # NVIDIA Triton (PyTriton)
    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/classify?topk=3'

The Ray engine's HTTP contract is in novic.serve.ray_serve; the engines are imported only when
chosen, each naming its extra when missing (`pip install 'novic[ray]'`).
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


def _vocabularies(pairs: List[str]) -> dict:
    named = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            fail(f"--vocab {pair!r}: give NAME=FILE (a text file with one noun per line)", code=2)
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
    # Ray Serve only
    replicas: int = typer.Option(1, min=1, help="[ray] Classifier replicas (one Classifier each)."),
    gpus_per_replica: float = typer.Option(0, "--gpus-per-replica", min=0, help="[ray] GPUs per replica (0 on CPU)."),
    cpus_per_replica: float = typer.Option(1, "--cpus-per-replica", min=0.01, help="[ray] CPUs per replica."),
    autoscaling: Optional[str] = typer.Option(None, help="[ray] Serve's autoscaling_config as JSON, e.g. "
                                              "'{\"min_replicas\": 1, \"max_replicas\": 4}' (replaces --replicas)."),
    address: Optional[str] = typer.Option(None, help="[ray] Ray cluster to join ('auto': the one `ray start` "
                                          "made here); default: start a local one."),
    vocab: List[str] = typer.Option([], "--vocab", help="[ray] NAME=FILE: a server-side vocabulary that "
                                    "requests pick with vocab=NAME (repeatable)."),
    threads: Optional[int] = typer.Option(None, min=1, help="onnxruntime threads per replica (Triton: per server)."),
    fast_decode: bool = typer.Option(False, "--fast-decode", help="[ray] Decode JPEGs at a reduced scale."),
    max_bytes: int = typer.Option(64 << 20, "--max-bytes", min=1, help="[ray] Largest request body (else 413)."),
    request_timeout: float = typer.Option(60.0, "--request-timeout", min=0.001,
                                          help="[ray] Seconds a request may wait for a replica (else 503)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", min=1, max=65535, help="[triton] gRPC port."),
    metrics_port: int = typer.Option(8002, "--metrics-port", min=1, max=65535, help="[triton] Metrics port."),
    topk: int = typer.Option(5, min=1, help="[triton] Labels per image unless a request sends topk."),
    stub_env: Optional[Path] = typer.Option(None, "--stub-env", help="[triton] numpy-1 venv for Triton's Python "
                                            "stub (scripts/triton-stub-venv.sh; default $NOVIC_TRITON_STUB_ENV)."),
):
    """Serve BUNDLE: POST image bytes to /classify, answers as novic-run --json writes them."""
    backend, precision = choice(backend), choice(precision)
    if choice(engine) == "triton":
        from novic.serve.triton import serve as triton_serve

        triton_serve(str(bundle), host=host, http_port=port, grpc_port=grpc_port, max_batch=max_batch,
                     max_wait_ms=max_wait_ms, backend=backend, precision=precision, metrics_port=metrics_port,
                     topk=topk, threads=threads, stub_env=stub_env)
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

    serve(bundle, address=address, host=host, port=port, replicas=replicas, gpus_per_replica=gpus_per_replica,
          cpus_per_replica=cpus_per_replica, autoscaling=scaling, backend=backend, precision=precision,
          threads=threads, fast_decode=fast_decode, max_batch=max_batch, batch_wait_s=max_wait_ms / 1e3,
          max_bytes=max_bytes, request_timeout_s=request_timeout, vocabularies=_vocabularies(vocab))


def main():
    run_app(app)
