"""Feeding the encoder: `Classifier.iter_classify` loads batch n+1 while batch n is encoded and
decoded (the prefetch thread), for lists of images as for novic-run over folders."""
from __future__ import annotations

import threading

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)


def test_next_batch_loads_while_this_one_runs(classifier, monkeypatch):
    from novic.bench.measure import jpeg_bytes, sample_images

    loads_started = []
    second_load = threading.Event()
    real_load, real_encoder = classifier.preprocessor.load_batch, classifier.encoder

    def load(sources):
        loads_started.append(len(sources))
        if len(loads_started) == 2:
            second_load.set()
        return real_load(sources)

    overlapped = []

    def encoder(pixels):   # the first batch's encoding waits until the second batch is being loaded
        if not overlapped:
            overlapped.append(second_load.wait(timeout=60))
        return real_encoder(pixels)

    monkeypatch.setattr(classifier.preprocessor, "load_batch", load)
    monkeypatch.setattr(classifier, "encoder", encoder)
    images = jpeg_bytes(sample_images(5))
    results = list(classifier.iter_classify(images, batch_size=2))
    assert overlapped == [True]                 # batch 2 started loading before batch 1 was encoded
    assert loads_started == [2, 2, 1] and all(r.ok and r.labels for r in results)
    monkeypatch.undo()
    assert [r.labels for r in classifier.classify(images, batch_size=2)] == [r.labels for r in results]
