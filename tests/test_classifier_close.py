"""Classifier.close() while other threads classify: every caller gets ClassifierError ("this
Classifier was closed"), never the loading pool's "cannot schedule new futures after shutdown"."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from fixtures_runtime import runtime_bundle  # noqa: E402,F401  (fixture)
from novic.runtime.classifier import Classifier, ClassifierError  # noqa: E402


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(n)]


def test_close_between_getting_the_pool_and_using_it(runtime_bundle):
    """The interleaving that lost the race, forced: a classify call has taken the loading pool
    when another thread's close() shuts it down."""
    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu", threads=2)
    pre = clf.preprocessor
    take_pool = pre._executor

    def pool_then_close():
        pool = take_pool()
        clf.close()          # what another thread does at this moment
        return pool          # now shut down: submitting to it raises RuntimeError

    pre._executor = pool_then_close
    with pytest.raises(ClassifierError, match="this Classifier was closed"):
        clf.classify(images(3), batch_size=3)
    assert clf.closed
    with pytest.raises(ClassifierError, match="this Classifier was closed"):
        clf.classify(images(3))


def test_close_while_the_next_batch_is_prefetched(runtime_bundle):
    """close() while the second batch is loading in the prefetch thread: the iterator that was
    handing out the first batch's results ends with ClassifierError."""
    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu", threads=2)
    pre = clf.preprocessor
    take_pool = pre._executor
    calls, first_handed_out = [], threading.Event()

    def close_on_second_batch():
        calls.append(1)
        pool = take_pool()
        if len(calls) == 2:
            # only once the first batch is out: closing while it is still being encoded or
            # decoded (the prefetch runs beside it) would rightly fail that batch too; a timeout
            # fails the test (the AssertionError reaches it through the prefetch's future)
            assert first_handed_out.wait(timeout=60), "the first batch never came out"
            clf.close()
        return pool

    pre._executor = close_on_second_batch
    results = clf.iter_classify(images(4), batch_size=2)
    first = [next(results), next(results)]
    first_handed_out.set()
    assert all(r.ok for r in first)
    with pytest.raises(ClassifierError, match="this Classifier was closed"):
        list(results)


def test_a_closed_preprocessor_makes_no_new_pool(runtime_bundle):
    """Preprocessor.close() is final: loading afterwards raises instead of starting a pool that
    nobody shuts down; the Classifier reports it as closed."""
    from novic.runtime.preprocess import PreprocessorClosed

    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu", threads=2)
    pre = clf.preprocessor
    assert all(e is None for e in pre.load_batch(images(2))[1])
    pre.close()
    for batch in (images(2), images(1)):
        with pytest.raises(PreprocessorClosed, match="this Preprocessor was closed"):
            pre.load_batch(batch)
    assert pre._pool is None
    with pytest.raises(ClassifierError, match="this Classifier was closed"):
        clf.classify(images(2))
    clf.close()
