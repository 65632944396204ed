"""Classifier.load closes what it opened when a later step fails, and close() closes all of it:
no onnxruntime session (GPU memory on ort-cuda) or JPEG decoder outlives a failed load or a
closed Classifier, even while the caller still holds the error and its traceback."""
from __future__ import annotations

import gc
import weakref

import pytest

pytest.importorskip("onnxruntime")

from fixtures_runtime import runtime_bundle  # noqa: E402,F401  (fixture)
from novic.runtime import nvjpeg  # noqa: E402
from novic.runtime.backends import ort  # noqa: E402
from novic.runtime.bundle import Bundle, BundleError  # noqa: E402
from novic.runtime.classifier import Classifier  # noqa: E402


class SpyJpegDecoder:
    """Stands in for nvImageCodec's decoder (made first in load, closed last)."""

    def __init__(self):
        self.closed = 0

    def decode(self, payloads):
        return [None] * len(payloads)   # Pillow decodes them

    def close(self):
        self.closed += 1


@pytest.fixture()
def opened(monkeypatch):
    """Weak references to every onnxruntime session made, and the JPEG decoders handed out."""
    sessions, decoders = [], []
    make = ort.make_session

    def tracked(*args, **kwargs):
        session = make(*args, **kwargs)
        sessions.append(weakref.ref(session))
        return session

    def spy_decoder(choice, device, device_id=0):
        decoders.append(SpyJpegDecoder())
        return decoders[-1]

    monkeypatch.setattr(ort, "make_session", tracked)
    monkeypatch.setattr(nvjpeg, "jpeg_decoder", spy_decoder)
    return sessions, decoders


def live(sessions) -> int:
    gc.collect()
    return sum(ref() is not None for ref in sessions)


def fail(error):
    def raise_it(*args, **kwargs):
        raise error
    return raise_it


@pytest.mark.parametrize("step", ["decoder graphs", "encoder check", "classifier"])
def test_a_failed_load_closes_what_it_had_opened(runtime_bundle, opened, monkeypatch, step):   # noqa: F811
    """The decoder's graphs fail after the encoder's session opened; the encoder check fails
    after both; the Classifier itself fails after everything: the error is the step's own
    (unchanged), and no session or decoder is left open."""
    from novic.runtime import preprocess

    sessions, decoders = opened
    bundle = Bundle.open(runtime_bundle.bundle)
    error = {"decoder graphs": ort.OrtError("decoder_step.onnx: graph I/O does not match; re-export"),
             "encoder check": BundleError(f"{bundle.path}: the graphs come from different models"),
             "classifier": ValueError("bad preprocess config")}[step]
    target = {"decoder graphs": (ort, "OrtDecoderSession"), "encoder check": (Bundle, "check_encoder"),
              "classifier": (preprocess, "Preprocessor")}[step]
    monkeypatch.setattr(*target, fail(error))
    with pytest.raises(type(error)) as raised:
        Classifier.load(bundle, backend="ort-cpu", threads=1, jpeg_decoder="nvimgcodec")
    assert raised.value is error
    assert len(sessions) == (1 if step == "decoder graphs" else 3)   # the encoder (+ prefill, step)
    assert live(sessions) == 0          # while `raised` still holds the traceback and its frames
    assert [d.closed for d in decoders] == [1]


def test_close_closes_the_sessions_and_the_jpeg_decoder(runtime_bundle, opened):   # noqa: F811
    sessions, decoders = opened
    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu", threads=1, jpeg_decoder="nvimgcodec")
    assert clf.preprocessor.jpeg_decoder is decoders[0]
    assert live(sessions) == 3
    encoder, decoder = clf.encoder, clf.decoder
    clf.close()
    clf.close()                         # idempotent
    assert live(sessions) == 0          # even though `encoder` and `decoder` are still referenced here
    assert encoder._session is None and decoder._prefill is None and decoder._step is None
    assert decoders[0].closed == 1


def test_an_unfinished_iteration_leaves_no_loader_thread(runtime_bundle):   # noqa: F811
    """iter_classify prefetches the next batch while the current one is decoded; an iteration
    that is never finished (the caller breaks out and keeps the iterator, or closes the
    Classifier) leaves no idle loader thread behind once that batch is loaded."""
    import threading

    import numpy as np

    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu", threads=1)
    pictures = [np.random.default_rng(i).integers(0, 256, (40, 60, 3), dtype=np.uint8) for i in range(4)]
    results = clf.iter_classify(pictures, batch_size=2)
    assert next(results).ok                  # the second batch is being prefetched now
    for thread in threading.enumerate():
        if thread.name.startswith("novic-prefetch"):
            thread.join(timeout=10)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("novic-prefetch")]
    clf.close()
    with pytest.raises(Exception, match="this Classifier was closed"):
        list(results)
