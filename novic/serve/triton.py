"""The Classifier behind Triton Inference Server, through PyTriton (`pip install 'novic[triton]'`).

    from novic.serve.triton import serve
    serve("bundle/", http_port=8000, grpc_port=8001)        # blocks until Ctrl-C

PyTriton starts the `tritonserver` binary shipped in its wheel and binds a Python function as a
Triton model: Triton receives KServe v2 requests over HTTP/gRPC, queues them, merges them into
dynamic batches (up to `max_batch` images, waiting at most `max_wait_ms` for more) and hands each
batch to this process, which classifies it with one `Classifier` (novic.serve.triton_requests
has the model's inputs and outputs). Clients use `tritonclient` (or curl) like any Triton model;
Triton's metrics are on `metrics_port`.

`start(...)` is the same as a context manager that returns once the model is ready (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from novic.serve.triton_env import (TritonSetupError, check_port_free, pytriton_stub_environment, require_pytriton,
                                   stub_env_for)
from novic.serve.triton_requests import (INPUT_IMAGE, INPUT_TOPK, OUTPUT_ERROR, OUTPUT_LABELS, OUTPUT_PROBS,
                                         classify_requests)

log = logging.getLogger("novic")

__all__ = ["serve", "start", "TritonServer"]


@dataclass
class TritonServer:
    """A running PyTriton server: the model name, addresses and the Classifier behind it."""

    triton: object            # pytriton.triton.Triton
    classifier: object        # novic.Classifier
    model_name: str
    http_url: str
    grpc_url: str
    metrics_url: str

    def describe(self) -> str:
        return (f"Triton model {self.model_name!r} on http://{self.http_url} and grpc {self.grpc_url} "
                f"(metrics http://{self.metrics_url}/metrics); {self.classifier.describe()}")


@contextlib.contextmanager
def start(bundle, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, max_batch: int = 32, max_wait_ms: float = 2, backend: str = "auto",
          precision: str | None = None, model_name: str = "novic", topk: int = 5, threads: int | None = None,
          stub_env=None, exit_timeout_s: int = 5, log_file=None):
    """Load the Classifier, start Triton with it bound as `model_name`, yield a `TritonServer`
    once the model is ready; stop Triton and close the Classifier on exit. Triton's log goes to
    `log_file` if given, else to stdout."""
    require_pytriton()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from novic.runtime.classifier import Classifier

    stub = stub_env_for(stub_env)       # before loading anything: a setup error is one line
    for what, port in (("HTTP", http_port), ("gRPC", grpc_port), ("metrics", metrics_port)):
        check_port_free(host, port, what)   # PyTriton would wait a minute, then say "timed out"
    clf = Classifier.load(bundle, backend=backend, precision=precision, threads=threads)
    beam_width = int(clf.bundle.search_defaults.get("beam_width", 10))
    clf.check_options(topk=topk, beam_width=beam_width)

    def infer(requests):
        return classify_requests(clf, requests, topk=topk, beam_width=beam_width, batch_size=max_batch)

    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=exit_timeout_s,
                          log_file=None if log_file is None else Path(log_file))
    triton = None
    try:
        triton = Triton(config=config)
        with pytriton_stub_environment(stub):
            triton.bind(
                model_name=model_name,
                infer_func=infer,
                inputs=[Tensor(name=INPUT_IMAGE, dtype=bytes, shape=(1,)),
                        Tensor(name=INPUT_TOPK, dtype=np.int32, shape=(1,), optional=True)],
                outputs=[Tensor(name=OUTPUT_LABELS, dtype=bytes, shape=(-1,)),
                         Tensor(name=OUTPUT_PROBS, dtype=np.float32, shape=(-1,)),
                         Tensor(name=OUTPUT_ERROR, dtype=bytes, shape=(1,))],
                config=ModelConfig(max_batch_size=max_batch,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=int(max_wait_ms * 1000))),
                strict=True,
            )
            triton.run()
    except BaseException as exc:
        if triton is not None:
            triton.stop()
        clf.close()
        if isinstance(exc, TimeoutError):
            where = f"its log: {log_file}" if log_file else "Triton's log above"
            raise TritonSetupError(f"Triton did not become ready on {host} (HTTP {http_port}, gRPC {grpc_port}); "
                                   f"see {where}") from None
        raise
    try:
        yield TritonServer(triton, clf, model_name, f"{host}:{http_port}", f"{host}:{grpc_port}",
                           f"{host}:{metrics_port}")
    finally:
        triton.stop()
        clf.close()


def serve(bundle, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001, max_batch: int = 32,
          max_wait_ms: float = 2, backend: str = "auto", precision: str | None = None, metrics_port: int = 8002,
          model_name: str = "novic", topk: int = 5, threads: int | None = None, stub_env=None,
          log_file=None, quiet: bool = False) -> None:
    """Serve `bundle` through Triton until interrupted (Ctrl-C / SIGINT / SIGTERM)."""
    with start(bundle, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
               max_batch=max_batch, max_wait_ms=max_wait_ms, backend=backend, precision=precision,
               model_name=model_name, topk=topk, threads=threads, stub_env=stub_env,
               log_file=log_file) as server:
        if not quiet:
            import sys

            print(f"novic: {server.describe()}; Ctrl-C to stop", file=sys.stderr)
        # SIGTERM (a service manager's stop) ends the loop like Ctrl-C, so that Triton is stopped too
        previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
        try:
            while server.triton.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
