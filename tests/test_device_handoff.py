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
    assert handed == [3, 2]                            # every batch went through the device
    assert copied == [1, 1]   # and came back only once decoded, for the embedding check
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


@pytest.mark.parametrize("value", [np.nan, 0.0])
@pytest.mark.parametrize("small_vocab", [False, True])
def test_bad_embedding_is_the_same_error_on_both_paths(device_classifier, classifier, monkeypatch, value,
                                                       small_vocab):
    """NaN or zero in the second image's embedding: that image errs with the same line on the
    device path as on the host path, also with a vocabulary smaller than the beam (every beam then
    ends on a dead candidate and the search hands back no hypotheses), and the others keep labels."""
    import onnxruntime

    from novic.runtime.backends.ort import DeviceEmbeddings

    real_device, real_host = device_classifier.encoder.embed_on_device, classifier.encoder

    def on_device(pixels):
        values = real_device(pixels).numpy()
        values[1] = value
        return DeviceEmbeddings(onnxruntime.OrtValue.ortvalue_from_numpy(values))

    def on_host(pixels):
        values = real_host(pixels).copy()
        values[1] = value
        return values

    monkeypatch.setattr(device_classifier.encoder, "embed_on_device", on_device)
    monkeypatch.setattr(classifier, "encoder", on_host)
    options = {"vocab": classifier.vocabulary().nouns[:2], "beam_width": 10} if small_vocab else {}
    images = photos(3)
    got = device_classifier.classify(images, batch_size=3, **options)
    want = classifier.classify(images, batch_size=3, **options)
    assert [(r.error, r.labels) for r in got] == [(r.error, r.labels) for r in want]
    assert [r.ok for r in got] == [True, False, True] and got[1].labels == []
    assert got[1].error.endswith("the image encoder returned a non-finite or zero embedding; try precision='fp32'")
    assert got[0].labels and got[2].labels
