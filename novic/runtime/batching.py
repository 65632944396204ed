"""Batch single-image requests from many threads into one classify call (for services on a GPU).

A service usually handles one image per request, from many threads at once. `Classifier.classify`
is thread-safe, but each call encodes and decodes its own images, one batch per call, one call
after another. On a GPU a batch of 32 costs little more than a batch of 1 (GPU run 2 in
docs/benchmarks.md: 50 img/s at batch 1, 389 img/s at batch 32), so `Batcher` collects the
requests that arrive within `max_wait_ms` of the first one (up to `max_batch`) and classifies them
together. On a CPU batching buys little: the cost is per image there.

    batcher = Batcher(Classifier.load("bundle", backend="ort-cuda"), max_batch=32, max_wait_ms=2)
    result = batcher.classify_one(image_bytes, topk=5)     # from any number of threads
    batcher.close()

Requests are batched only with requests that use the same options (topk, vocabulary, beam width,
...). Arguments are checked in the caller's thread, so a bad one raises there; a bad image gives
its own `Result.error` and never fails the others of its batch.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from novic.runtime.classifier import Classifier, ClassifierError, Result

_STOP = object()


class Batcher:
    """Serves `classify_one` calls from many threads with one worker thread that classifies
    whatever arrived within `max_wait_ms` of the first waiting request, `max_batch` at most."""

    def __init__(self, classifier: Classifier, *, max_batch: int = 32, max_wait_ms: float = 2.0):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ClassifierError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not (isinstance(max_wait_ms, (int, float)) and max_wait_ms >= 0):
            raise ClassifierError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.classifier = classifier
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1e3
        self.batches = self.images = self.largest_batch = 0   # for monitoring (and the tests)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._serve, name="novic-batcher", daemon=True)
        self._worker.start()

    def classify_one(self, image: Any, *, topk: int = 5, guided: bool = True, vocab: Any = None,
                     beam_width: int = 10, temperature: float = 1.0, alpha: float = 0.0) -> Result:
        """Like `Classifier.classify_one`; blocks until the batch holding this image is done."""
        options = dict(topk=topk, guided=guided, beam_width=beam_width, temperature=temperature, alpha=alpha)
        if guided:   # build (or fetch) the vocabulary here: its errors belong to this caller
            options["vocab"] = self.classifier.vocabulary(vocab)
        elif vocab is not None:
            options["vocab"] = vocab
        self.classifier.iter_classify([], **options)   # checks every argument, classifies nothing
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise ClassifierError("this Batcher was closed; make a new one")
            self._queue.put((_key(options), options, image, future))
        return future.result()

    def close(self) -> None:
        """Finish the requests already queued, then stop the worker (the classifier stays open)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the worker ---------------------------------------------------------------------------
    def _serve(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                return
            waiting, deadline = [first], time.monotonic() + self.max_wait
            while len(waiting) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:   # serve what came before it, then stop
                    stop = True
                    break
                waiting.append(item)
            for group in _by_options(waiting):
                self._run(group)

    def _run(self, group: list) -> None:
        options = group[0][1]
        self.batches, self.images = self.batches + 1, self.images + len(group)
        self.largest_batch = max(self.largest_batch, len(group))
        try:
            results = self.classifier.classify([image for _, _, image, _ in group], batch_size=len(group), **options)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error
            for *_, future in group:
                future.set_exception(exc)
            return
        for (*_, future), result in zip(group, results):
            future.set_result(result)


def _key(options: dict) -> tuple:
    # A Vocabulary object is cached by the classifier, so its identity names it.
    return tuple((name, id(value) if name == "vocab" else value) for name, value in sorted(options.items()))


def _by_options(items: list) -> list[list]:
    """Items grouped by their options' key, groups in order of their first item."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(item[0], []).append(item)
    return list(groups.values())
