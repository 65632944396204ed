"""novic.runtime.batching.Batcher: single-image requests from many threads, classified in batches."""
from __future__ import annotations

import threading
import time

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


def start_threads(call, args) -> tuple[list, list]:
    """call(arg) in one daemon thread per arg, started together -> (threads, results): a result
    (or the exception raised) lands at its arg's index."""
    out = [None] * len(args)
    start = threading.Barrier(len(args))

    def run(i):
        start.wait()
        try:
            out[i] = call(args[i])
        except Exception as exc:  # noqa: BLE001 - returned for the test to check
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(args))]
    for t in threads:
        t.start()
    return threads, out


def in_threads(call, args) -> list:
    threads, out = start_threads(call, args)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a caller is still waiting"
    return out


def same_labels(got, want):
    assert [[l.text for l in r.labels] for r in got] == [[l.text for l in r.labels] for r in want]
    np.testing.assert_allclose([l.logprob for r in got for l in r.labels],
                               [l.logprob for r in want for l in r.labels], atol=1e-4)


def test_concurrent_requests_are_one_batch_with_the_answers_of_serial_calls(classifier):  # noqa: F811
    pics = images()
    pics[5] = b"not an image"
    serial = [classifier.classify_one(p, topk=3) for p in pics]
    with Batcher(classifier, max_batch=7, max_wait_ms=WAIT_MS) as batcher:
        got = in_threads(lambda p: batcher.classify_one(p, topk=3), pics)
        assert (batcher.batches, batcher.images, batcher.largest_batch) == (1, 7, 7)   # the bad one never queued
    same_labels(got, serial)
    assert got[5].error == serial[5].error                      # the bad image fails alone
    assert [r.error is None for r in got] == [i != 5 for i in range(8)]
    assert len({r.labels[0].text for r in got if r.ok}) >= 2    # the answers depend on the image


def test_requests_with_other_options_are_not_mixed(classifier):  # noqa: F811
    pics = images()
    options = [dict(topk=2), dict(topk=4), dict(topk=2, vocab=["cat", "dog", "tabby cat", "rocket"]),
               dict(topk=1, guided=False)] * 2
    with Batcher(classifier, max_batch=len(pics), max_wait_ms=WAIT_MS) as batcher:
        got = in_threads(lambda i: batcher.classify_one(pics[i], **options[i]), list(range(8)))
        # one classify call per vocabulary/decoding: topk=2 and topk=4 share the decoder call
        assert batcher.batches == 3 and batcher.images == 8
    for i, (result, opts) in enumerate(zip(got, options)):
        same_labels([result], [classifier.classify_one(pics[i], **opts)])
        assert len(result.labels) == opts["topk"]
    assert all(label.text in options[2]["vocab"] for label in got[2].labels)


def same_rolled_labels(got, want):
    assert [(l.text, l.fine, l.path) for l in got.labels] == [(l.text, l.fine, l.path) for l in want.labels]
    np.testing.assert_allclose([l.prob for l in got.labels], [l.prob for l in want.labels], rtol=1e-4)


def test_mixed_granularities_share_one_batch(classifier):  # noqa: F811
    if not classifier.bundle.has_hierarchy:
        pytest.skip("the test bundle has no noun hierarchy (wordnet-base not installed)")
    pics = images()
    options = [dict(topk=3), dict(topk=3, granularity="basic"), dict(topk=2, granularity="coarse"),
               dict(topk=5, granularity=["animal", "plant", "artifact"]), dict(topk=10, granularity="coarse"),
               dict(topk=1, granularity="fine"), dict(topk=4, granularity="basic"), dict(topk=3, granularity="coarse")]
    with Batcher(classifier, max_batch=len(pics), max_wait_ms=WAIT_MS) as batcher:
        got = in_threads(lambda i: batcher.classify_one(pics[i], **options[i]), list(range(8)))
        assert (batcher.batches, batcher.images) == (1, 8)           # one decoder call for every level
    for pic, result, opts in zip(pics, got, options):
        want = classifier.classify([pic], **opts)[0]                 # what Classifier.classify answers
        same_rolled_labels(result, want)
        assert result.to_json().keys() == want.to_json().keys()
        rolled = opts.get("granularity", "fine") != "fine"
        assert all((l.fine is not None) == rolled for l in result.labels)
    assert any(l.text != l.fine for r in got for l in r.labels if l.fine)   # something did roll up
    batcher2 = Batcher(classifier, max_batch=2, max_wait_ms=WAIT_MS)
    with pytest.raises(ValueError, match="neither fine, basic, coarse nor a file"):   # in the caller's thread
        batcher2.classify_one(pics[0], granularity="medium")
    assert batcher2.batches == 0
    batcher2.close()


def test_classify_pixels_granularity_equals_classify(classifier):  # noqa: F811
    if not classifier.bundle.has_hierarchy:
        pytest.skip("the test bundle has no noun hierarchy (wordnet-base not installed)")
    pics = images()[:3]
    pixels, errors = classifier.preprocessor.load_batch(pics)
    assert errors == [None] * 3
    for level in ("basic", "coarse"):
        got = classifier.classify_pixels(pixels, ["a", "b", "c"], topk=4, granularity=level)
        for result, want in zip(got, classifier.classify(pics, topk=4, granularity=level)):
            same_rolled_labels(result, want)


def test_granularity_on_a_bundle_without_hierarchy_is_one_line(runtime_bundle, tmp_path):  # noqa: F811
    import json
    import shutil

    from novic.errors import NovicError
    from novic.runtime.classifier import Classifier

    old = tmp_path / "old"   # a bundle exported before the hierarchy (or without WordNet)
    shutil.copytree(runtime_bundle.bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("hierarchy", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "hierarchy.json").unlink(missing_ok=True)
    pic = images()[0]
    with Classifier.load(old, backend="ort-cpu", threads=1) as clf, Batcher(clf, max_wait_ms=0) as batcher:
        with pytest.raises(NovicError, match="no noun hierarchy.*re-export") as info:
            batcher.classify_one(pic, granularity="basic")
        assert "\n" not in str(info.value) and batcher.batches == 0
        assert batcher.classify_one(pic, topk=2).ok                  # fine labels as before


def test_close_answers_the_requests_already_waiting(classifier):  # noqa: F811
    pics = images()[:3]
    batcher = Batcher(classifier, max_batch=8, max_wait_ms=WAIT_MS)
    queued, put = [], batcher._queue.put
    batcher._queue.put = lambda item: (queued.append(item), put(item))[1]
    threads, out = start_threads(batcher.classify_one, pics)
    deadline = time.monotonic() + 30
    while len(queued) < 3 and time.monotonic() < deadline:    # all in; the worker waits for more
        time.sleep(0.01)
    assert len(queued) == 3
    t0 = time.monotonic()
    batcher.close()                                             # does not wait for max_wait
    for t in threads:
        t.join(60)
    assert time.monotonic() - t0 < WAIT_MS / 1e3 / 2
    assert [r.ok for r in out] == [True] * 3 and batcher.batches == 1
    batcher.close()                                             # idempotent
    with pytest.raises(ClassifierError, match="Batcher was closed"):
        batcher.classify_one(pics[0])


def test_errors_reach_the_callers(classifier, monkeypatch):  # noqa: F811
    pics = images()[:2]
    with pytest.raises(ClassifierError, match="max_batch"):
        Batcher(classifier, max_batch=0)
    with pytest.raises(ClassifierError, match="max_wait_ms"):
        Batcher(classifier, max_wait_ms=float("inf"))
    batcher = Batcher(classifier, max_batch=2, max_wait_ms=WAIT_MS)
    with pytest.raises(ClassifierError, match="topk"):          # checked in the caller's thread
        batcher.classify_one(pics[0], topk=0)
    with pytest.raises(ClassifierError, match="restricts guided decoding"):
        batcher.classify_one(pics[0], guided=False, vocab=["cat"])
    with pytest.raises(ClassifierError, match="none of the nouns"):
        batcher.classify_one(pics[0], vocab=["zzqqxxjj"])
    assert batcher.batches == 0                                 # none of them was queued

    classify_pixels = classifier.classify_pixels

    def broken(pixels, names, **options):
        if len(pixels):
            raise RuntimeError("device lost")
        return classify_pixels(pixels, names, **options)

    monkeypatch.setattr(classifier, "classify_pixels", broken)
    assert [type(e) for e in in_threads(batcher.classify_one, pics)] == [RuntimeError, RuntimeError]
    monkeypatch.undo()
    assert all(r.ok for r in in_threads(batcher.classify_one, pics))   # the worker survived the error
    batcher.close()


def test_a_dead_worker_fails_its_callers_instead_of_hanging(classifier, monkeypatch):  # noqa: F811
    pics = images()[:2]
    batcher = Batcher(classifier, max_batch=2, max_wait_ms=WAIT_MS)

    class Fatal(BaseException):
        pass

    def fatal(*args, **kwargs):
        raise Fatal("worker bug")

    monkeypatch.setattr(batcher, "_run", fatal)
    got = in_threads(batcher.classify_one, pics)
    assert [type(e) for e in got] == [ClassifierError] * 2 and "stopped on an error" in str(got[0])
    with pytest.raises(ClassifierError, match="stopped on an error"):
        batcher.classify_one(pics[0])
    batcher.close()


def test_classifier_close_waits_for_a_running_batch(runtime_bundle):  # noqa: F811
    """A Batcher's worker may be decoding when the service shuts down: the backend's buffers must
    not be released under it, so Classifier.close waits for the encoder and decoder locks."""
    from novic.runtime.classifier import Classifier

    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu")
    closed = threading.Event()
    with clf._decode_lock:                                      # a batch is decoding
        threading.Thread(target=lambda: (clf.close(), closed.set()), daemon=True).start()
        assert not closed.wait(0.5) and not clf.closed
    assert closed.wait(30) and clf.closed


def test_a_classifier_closed_while_a_caller_loads_is_one_line(classifier, monkeypatch):  # noqa: F811
    """close() shuts the loading pool down under a caller already past the option checks: that
    caller gets the closed error, not the pool's RuntimeError."""
    monkeypatch.setattr(classifier, "_closing", False)   # restored to this after the test

    def shut(sources):
        classifier._closing = True   # what close() sets first, before stopping the pool
        raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(classifier.preprocessor, "load_batch", shut)
    with Batcher(classifier, max_batch=2, max_wait_ms=WAIT_MS) as batcher:
        with pytest.raises(ClassifierError, match="this Classifier was closed"):
            batcher.classify_one(images()[0])
