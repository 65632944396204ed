"""The encoder's embeddings feed the prefill without a host round trip (ort-cuda's path: an OrtValue
bound in place), run here against host memory: same labels as the host path, the embeddings are
never copied out, and a non-finite embedding still gets its one-line error."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)


@pytest.fixture()
def device_classifier(runtime_bundle):
    """A Classifier whose encoder leaves embeddings in OrtValues and whose decoder binds them."""
    from novic.runtime.backends.ort import OrtDecoderSession, OrtImageEncoder
    from novic.runtime.classifier import Classifier

    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu", threads=2)
    b = clf.bundle
    clf.encoder = OrtImageEncoder(b.artifact_path("image_encoder", "fp32"), threads=2, device_output=True)
    clf.decoder = OrtDecoderSession(b.artifact_path("decoder_prefill", "fp32"), b.artifact_path("decoder_step", "fp32"),
                                    b.decoder_config, threads=2, iobinding=True)
    yield clf
    clf.close()


def photos(n):
    from novic.bench.measure import sample_images
    return sample_images(n)


def test_handoff_gives_the_host_paths_labels_without_copying_out(device_classifier, classifier, monkeypatch):
    from novic.runtime.backends.ort import DeviceEmbeddings

    copied = []
    monkeypatch.setattr(DeviceEmbeddings, "numpy", lambda self: copied.append(1) or self.value.numpy())
    handed = []
    real = device_classifier.encoder.embed_on_device
    monkeypatch.setattr(device_classifier.encoder, "embed_on_device", lambda p: handed.append(len(p)) or real(p))
    images = photos(5)
    got = device_classifier.classify(images, batch_size=3)
    want = classifier.classify(images, batch_size=3)
    assert handed == [3, 2] and copied == []          # every batch went through the device, none came back
    assert [(r.error, r.labels) for r in got] == [(r.error, r.labels) for r in want]
    assert all(r.ok and r.labels for r in got)


def test_encoder_keeps_embeddings_only_where_it_may(device_classifier, runtime_bundle):
    import onnxruntime

    from novic.runtime.backends.ort import _EncoderGraphs, make_session

    enc = device_classifier.encoder
    pixels = device_classifier.preprocessor.batch(photos(2))
    on_device = enc.embed_on_device(pixels)
    assert on_device.shape == (2, enc.embed_dim) and len(on_device) == 2
    assert np.allclose(on_device.numpy(), enc(pixels), atol=1e-6)
    # a batch replayed as a CUDA graph writes a shared buffer: its embeddings come through the host
    enc._graphs = _EncoderGraphs(make_session(enc._session._model_path), onnxruntime, device="cpu")
    assert enc.embed_on_device(pixels) is None
    enc._graphs = None
    enc.device_output = False
    assert enc.embed_on_device(pixels) is None
    # so does a decoder replaying its prefill as a CUDA graph, or without IOBinding
    dec = device_classifier.decoder
    assert dec.reads_device_embeddings
    dec.iobinding = False
    assert not dec.reads_device_embeddings


def test_non_finite_embedding_on_the_device_is_one_line_error(device_classifier, monkeypatch):
    import onnxruntime

    from novic.runtime.backends.ort import DeviceEmbeddings

    real = device_classifier.encoder.embed_on_device

    def broken(pixels):   # an fp16 overflow in the encoder: the second image's embedding is NaN
        values = real(pixels).numpy()
        values[1] = np.nan
        return DeviceEmbeddings(onnxruntime.OrtValue.ortvalue_from_numpy(values))

    monkeypatch.setattr(device_classifier.encoder, "embed_on_device", broken)
    results = device_classifier.classify(photos(3), batch_size=3)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].labels == [] and results[1].error.endswith(
        "the image encoder returned a non-finite or zero embedding; try precision='fp32'")
    assert results[0].labels and results[2].labels
