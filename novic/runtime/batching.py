"""Batch single-image requests from many threads into one encoder + decoder call (GPU services).

A service usually handles one image per request, from many threads at once. `Classifier` is
thread-safe, but each `classify_one` call encodes and decodes its own image while the others wait
for the encoder and decoder locks. On a GPU a batch of 32 costs little more than a batch of 1
(GPU run 2 in docs/benchmarks.md, ort-cuda fp16: 50 img/s at batch 1, 597 img/s at batch 32), so
`Batcher` classifies together the requests that arrived within `max_wait_ms` of the first one
still waiting (up to `max_batch`). On a CPU batching buys little: the cost is per image there.

    clf = Classifier.load("bundle", backend="ort-cuda")
    with Batcher(clf, max_batch=32, max_wait_ms=2) as batcher:   # close it before the classifier
        result = batcher.classify_one(image_bytes, topk=5)       # from any number of threads
        coarse = batcher.classify_one(image_bytes, granularity="coarse")   # in the same batch

Each caller loads and preprocesses its own image in its own thread (decoding JPEGs in parallel,
while the worker runs the previous batch); the worker thread only encodes and decodes. Arguments
are checked in the caller's thread, so a bad one raises there; a bad image gives its own
`Result.error` at once.

Requests share a batch when they decode alike (vocabulary, beam width, temperature, alpha): `topk`
and `granularity` are each request's own, applied to its beam list after the shared decoder call
(novic.runtime.request_options), so a service can mix levels (fine, basic, coarse) in one batch.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from novic.errors import first_line
from novic.runtime.classifier import Classifier, ClassifierError, Result, _positive_int
from novic.runtime.images import describe
from novic.runtime.request_options import RequestOptions, check_request, classify_together, decode_groups

MAX_WAIT_MS = 60_000
_STOP = object()


@dataclass
class _Request:
    options: RequestOptions
    pixels: np.ndarray     # preprocessed [3, H, W]
    name: str
    queued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class Batcher:
    """Serves `classify_one` calls from many threads with one worker thread that encodes and
    decodes whatever arrived within `max_wait_ms` of the first waiting request (`max_batch` at
    most). Close it (or use `with`) when done: the worker holds the classifier."""

    def __init__(self, classifier: Classifier, *, max_batch: int = 32, max_wait_ms: float = 2.0):
        max_batch = _positive_int(max_batch, "max_batch")
        if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms)
                and 0 <= max_wait_ms <= MAX_WAIT_MS):
            raise ClassifierError(f"max_wait_ms must be a number in [0, {MAX_WAIT_MS}], got {max_wait_ms!r}")
        self.classifier = classifier
        self.max_batch, self._max_wait = max_batch, max_wait_ms / 1e3
        self.batches = self.images = self.largest_batch = 0   # for monitoring (and the tests)
        self._queue: queue.Queue = queue.Queue()
        self._closed: str | None = None   # why no request is taken any more
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._serve, name="novic-batcher", daemon=True)
        self._worker.start()

    def classify_one(self, image: Any, *, topk: int = 5, guided: bool = True, vocab: Any = None,
                     beam_width: int = 10, temperature: float = 1.0, alpha: float = 0.0,
                     granularity: Any = None) -> Result:
        """Like `Classifier.classify_one` (`granularity` included); blocks until the batch holding
        this image is done."""
        clf = self.classifier
        # The classifier's own checks, here: their errors (and the vocabulary's) belong to this caller.
        options = check_request(clf, topk, guided, vocab, beam_width, temperature, alpha, granularity)
        pixels, (error,) = clf._load_batch([image])   # in this thread, by Pillow: decoding in parallel
        if error is not None:
            return Result(describe(image), [], str(error))
        request = _Request(options, pixels[0], describe(image))
        with self._lock:
            if self._closed:
                raise ClassifierError(f"this Batcher {self._closed}; make a new one")
            self._queue.put(request)
        return request.future.result()

    def close(self) -> None:
        """Answer the requests already queued, then stop the worker (the classifier stays open)."""
        with self._lock:
            if not self._closed:
                self._closed = "was closed"
                self._queue.put(_STOP)
        self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the worker ---------------------------------------------------------------------------
    def _serve(self) -> None:
        held: list[_Request] = []
        try:
            while self._serve_batch(held):
                held.clear()
        except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting
            why = f"stopped on an error ({type(exc).__name__}: {first_line(exc)})"
            for request in held:
                if not request.future.done():
                    request.future.set_exception(ClassifierError(f"Batcher {why}"))
            with self._lock:
                self._closed = self._closed or why
        finally:   # nothing is queued after this: classify_one refuses once _closed is set
            with self._lock:
                self._closed = self._closed or "was closed"
                while not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is not _STOP:
                        item.future.set_exception(ClassifierError(f"this Batcher {self._closed}"))

    def _serve_batch(self, held: list) -> bool:
        """Wait for a request, gather its batch into `held`, classify it; False after close()."""
        first = self._queue.get()
        if first is _STOP:
            return False
        held.append(first)
        deadline, more = first.queued + self._max_wait, True
        while len(held) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:   # answer what came before it, then stop
                more = False
                break
            held.append(item)
        for rows in decode_groups([request.options for request in held]):
            self._run([held[i] for i in rows])
        return more

    def _run(self, group: list[_Request]) -> None:
        self.batches, self.images = self.batches + 1, self.images + len(group)
        self.largest_batch = max(self.largest_batch, len(group))
        try:
            results = classify_together(self.classifier, np.stack([r.pixels for r in group]),
                                        [r.name for r in group], [r.options for r in group])
        except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
            for request in group:
                request.future.set_exception(exc)
            return
        for request, result in zip(group, results):
            request.future.set_result(result)
