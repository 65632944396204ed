"""novic.runtime.batching.Batcher: single-image requests from many threads, classified in batches."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)
from novic.runtime.batching import Batcher
from novic.runtime.classifier import ClassifierError

skdata = pytest.importorskip("skimage.data")

WAIT_MS = 5000   # long: a batch closes when max_batch requests are in, not by the clock


def images():
    photos = [getattr(skdata, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    return photos + [np.ascontiguousarray(p[::-1]) for p in photos]   # 8 different images


def in_threads(call, args):
    """call(arg) in one thread per arg, all started together -> results (or exceptions) in order."""
    out = [None] * len(args)
    start = threading.Barrier(len(args))

    def run(i):
        start.wait()
        try:
            out[i] = call(args[i])
        except Exception as exc:  # noqa: BLE001 - returned for the test to check
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_requests_are_one_batch_with_the_answers_of_serial_calls(classifier):  # noqa: F811
    pics = images()
    pics[5] = b"not an image"
    serial = [classifier.classify_one(p, topk=3) for p in pics]
    with Batcher(classifier, max_batch=len(pics), max_wait_ms=WAIT_MS) as batcher:
        got = in_threads(lambda p: batcher.classify_one(p, topk=3), pics)
        assert (batcher.batches, batcher.images, batcher.largest_batch) == (1, 8, 8)
    assert [r.labels for r in got] == [r.labels for r in serial]
    assert got[5].error == serial[5].error                     # the bad image fails alone
    assert [r.error is None for r in got] == [i != 5 for i in range(8)]
    assert len({r.labels[0].text for r in got if r.ok}) >= 2    # the answers depend on the image


def test_requests_with_other_options_are_not_mixed(classifier):  # noqa: F811
    pics = images()
    options = [dict(topk=2), dict(topk=4), dict(topk=2, vocab=["cat", "dog", "tabby cat", "rocket"]),
               dict(topk=1, guided=False)] * 2
    with Batcher(classifier, max_batch=len(pics), max_wait_ms=WAIT_MS) as batcher:
        got = in_threads(lambda i: batcher.classify_one(pics[i], **options[i]), list(range(8)))
        assert batcher.batches == 4 and batcher.images == 8       # one classify call per kind
    for i, (result, opts) in enumerate(zip(got, options)):
        assert result.labels == classifier.classify_one(pics[i], **opts).labels, i
        assert len(result.labels) == opts["topk"]
    assert all(label.text in options[2]["vocab"] for label in got[2].labels)


def test_errors_reach_the_callers_and_close_is_final(classifier, monkeypatch):  # noqa: F811
    pics = images()[:2]
    batcher = Batcher(classifier, max_batch=2, max_wait_ms=WAIT_MS)
    with pytest.raises(ClassifierError, match="topk"):          # checked in the caller's thread
        batcher.classify_one(pics[0], topk=0)
    with pytest.raises(ClassifierError, match="restricts guided decoding"):
        batcher.classify_one(pics[0], guided=False, vocab=["cat"])
    with pytest.raises(ClassifierError, match="none of the nouns"):
        batcher.classify_one(pics[0], vocab=["zzqqxxjj"])
    assert batcher.batches == 0                                 # none of them was queued

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(classifier, "classify", broken)
    got = in_threads(batcher.classify_one, pics)
    assert [type(e) for e in got] == [RuntimeError, RuntimeError] and batcher.batches == 1
    monkeypatch.undo()
    batcher.max_wait = 0                                        # a lone request: no need to wait for company
    assert batcher.classify_one(pics[0], topk=1).ok              # the worker survived the error
    batcher.close()
    batcher.close()                                             # idempotent
    with pytest.raises(ClassifierError, match="Batcher was closed"):
        batcher.classify_one(pics[0])
    with pytest.raises(ClassifierError, match="max_batch"):
        Batcher(classifier, max_batch=0)
