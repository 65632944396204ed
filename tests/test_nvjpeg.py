"""JPEG batches through nvImageCodec (novic.runtime.nvjpeg): the real library where it decodes
(its CPU backend here, nvJPEG on a GPU), and the routing and fallbacks with a stand-in."""
from __future__ import annotations

import io
import types

import numpy as np
import pytest
from PIL import Image

from fixtures_runtime import runtime_bundle  # noqa: F401  (fixture)
from novic.runtime import nvjpeg
from novic.runtime.preprocess import PreprocessConfig, Preprocessor

CONFIG = PreprocessConfig(size=(64, 64))


def photos():
    from novic.bench.measure import sample_images

    return [image.resize((160 + 40 * i, 120 + 10 * i)) for i, image in enumerate(sample_images(4))]


def jpeg(image, quality=90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_real_nvimgcodec_pixels_match_pillow(tmp_path):
    pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec not installed: pip install 'novic[nvjpeg]'")
    try:
        decoder = nvjpeg.NvImageCodecDecoder("cpu")   # nvJPEG needs a GPU; its CPU backend decodes here
        probe = decoder.decode([jpeg(photos()[0])])
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"nvImageCodec cannot decode on this machine: {exc}")
    if probe[0] is None:
        pytest.skip("nvImageCodec has no JPEG decoder on this machine (no nvJPEG, no CPU codec)")
    images = photos()
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg(images[1], quality=75))
    sources = [jpeg(im) for im in images] + [path]
    want, _ = Preprocessor(CONFIG, threads=2).load_batch(sources)
    got, errors = Preprocessor(CONFIG, threads=2, jpeg_decoder=decoder).load_batch(sources)
    assert errors == [None] * len(sources)
    diff = np.abs(got - want)   # normalised pixels: one 8-bit level is ~0.015
    assert diff.mean() < 0.03 and np.percentile(diff, 99) < 0.15, (diff.mean(), diff.max())


class FakeNvImageCodec(types.SimpleNamespace):
    """Stands in for `nvidia.nvimgcodec`: decodes with Pillow, records each batch, and returns None
    for JPEGs it "cannot" decode (the real one does so for streams it cannot parse)."""

    def __init__(self):
        fake = self

        class Decoder:
            def __init__(self, **kwargs):
                fake.decoder_kwargs = kwargs

            def decode(self, payloads, params=None):
                fake.batches.append(len(payloads))
                out = []
                for data in payloads:
                    try:
                        out.append(Image.open(io.BytesIO(data)).convert("RGB") if b"NOPE" not in data else None)
                    except OSError:
                        out.append(None)
                return [types.SimpleNamespace(cpu=lambda im=im: np.asarray(im)) if im is not None else None
                        for im in out]

        super().__init__(Decoder=Decoder, Backend=lambda kind: ("backend", kind), CPU_ONLY="cpu-only",
                         NVIMGCODEC_DEVICE_CPU_ONLY=-99999, ColorSpec=types.SimpleNamespace(SRGB="srgb"),
                         DecodeParams=lambda **kw: kw, batches=[], decoder_kwargs=None)


@pytest.fixture()
def fake(monkeypatch):
    module = FakeNvImageCodec()
    monkeypatch.setattr(nvjpeg, "import_nvimgcodec", lambda: module)
    return module


def test_jpegs_go_to_nvimgcodec_in_one_batch_the_rest_to_pillow(fake, tmp_path):
    images = photos()
    jpg_file, png_file = tmp_path / "a.jpg", tmp_path / "b.png"
    jpg_file.write_bytes(jpeg(images[0]))
    png_file.write_bytes(png(images[1]))
    cannot = jpeg(images[2]) + b"NOPE"          # a JPEG nvImageCodec gives up on: Pillow decodes it
    broken = b"\xff\xd8\xff" + b"\x00" * 50     # JPEG magic, no image: Pillow's clear error
    sources = [jpg_file, png_file, jpeg(images[3]), images[1], cannot, broken, tmp_path / "missing.jpg"]
    decoder = nvjpeg.jpeg_decoder("nvimgcodec", device="cuda")
    got, errors = Preprocessor(CONFIG, threads=2, jpeg_decoder=decoder).load_batch(sources)
    want, want_errors = Preprocessor(CONFIG, threads=2).load_batch(sources)
    assert fake.batches == [3]                  # one call: the JPEG file, the JPEG bytes, the one it gives up on
                                                # (no header: Pillow's path, straight away)
    assert fake.decoder_kwargs == {"device_id": 0}
    assert np.array_equal(got, want)            # the stand-in decodes as Pillow does
    assert [e is None for e in errors] == [True, True, True, True, True, False, False]
    assert [str(e) for e in errors] == [str(e) for e in want_errors]


def test_pillows_limits_hold_on_the_nvimgcodec_path(fake, tmp_path, monkeypatch):
    """Above MAX_IMAGE_PIXELS (novic-run --max-pixels), a file far larger than its pixels, and
    every JPEG with fast_decode: Pillow decodes them (its bomb error line, its reduced scale),
    nvImageCodec never sees them."""
    images = photos()
    small, big = jpeg(images[0]), jpeg(images[3])          # 160x120, 280x150
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(small + b"\0" * (nvjpeg.METADATA_BYTES + 3 * 160 * 120 + 1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 280 * 150 // 2 - 1)   # big is over twice the limit
    sources = [small, big, padded, small]
    decoder = nvjpeg.jpeg_decoder("nvimgcodec", device="cuda")
    got, errors = Preprocessor(CONFIG, threads=2, jpeg_decoder=decoder).load_batch(sources)
    want, want_errors = Preprocessor(CONFIG, threads=2).load_batch(sources)
    assert fake.batches == [2]                  # only the small JPEGs
    assert [e is None for e in errors] == [True, False, True, True]
    assert "image too large" in str(errors[1]) and str(errors[1]) == str(want_errors[1])
    assert np.array_equal(got, want)
    fake.batches.clear()
    fast = Preprocessor(CONFIG, threads=2, fast_decode=True, jpeg_decoder=decoder)
    pair = [small, small]
    assert np.array_equal(fast.load_batch(pair)[0], Preprocessor(CONFIG, fast_decode=True).load_batch(pair)[0])
    assert fake.batches == []


def test_a_single_jpeg_is_decoded_by_pillow_in_the_callers_thread(fake):
    """The batch decoder is shared (one lock): one image per call (Batcher's callers) would only
    queue on it, so it takes batches of two JPEGs or more."""
    images = photos()
    decoder = nvjpeg.jpeg_decoder("nvimgcodec", device="cuda")
    pre = Preprocessor(CONFIG, threads=2, jpeg_decoder=decoder)
    pre.load_batch([jpeg(images[0])])
    pre.load_batch([jpeg(images[0]), png(images[1])])
    assert fake.batches == []
    pre.load_batch([jpeg(images[0]), jpeg(images[1])])
    assert fake.batches == [2]


def test_choosing_a_decoder(fake, monkeypatch):
    assert nvjpeg.jpeg_decoder("pillow", device="cuda") is None
    assert nvjpeg.jpeg_decoder("auto", device="cpu") is None      # the CPU backend keeps Pillow
    assert isinstance(nvjpeg.jpeg_decoder("auto", device="cuda"), nvjpeg.NvImageCodecDecoder)
    assert nvjpeg.jpeg_decoder("nvimgcodec", device="cpu").device == "cpu"
    assert fake.decoder_kwargs["device_id"] == fake.NVIMGCODEC_DEVICE_CPU_ONLY
    with pytest.raises(nvjpeg.JpegDecoderError, match="is not one of pillow, nvimgcodec, auto"):
        nvjpeg.jpeg_decoder("turbo")

    def missing():
        raise ImportError("No module named 'nvidia.nvimgcodec'")
    monkeypatch.setattr(nvjpeg, "import_nvimgcodec", missing)
    assert nvjpeg.jpeg_decoder("auto", device="cuda") is None     # not installed: Pillow, silently
    with pytest.raises(nvjpeg.JpegDecoderError, match=r"pip install 'novic\[nvjpeg\]'"):
        nvjpeg.jpeg_decoder("nvimgcodec", device="cuda")


def test_classifier_rejects_an_unknown_decoder(runtime_bundle):
    from novic.runtime.classifier import Classifier, ClassifierError

    with pytest.raises(ClassifierError, match="jpeg decoder 'turbo' is not one of"):
        Classifier.load(runtime_bundle.bundle, backend="ort-cpu", jpeg_decoder="turbo")
    with Classifier.load(runtime_bundle.bundle, backend="ort-cpu") as clf:
        assert clf.preprocessor.jpeg_decoder is None               # auto on the CPU: Pillow


@pytest.fixture()
def no_gpu(fake, monkeypatch):
    """The stand-in as nvImageCodec behaves without a GPU: installed, its CPU decoder opens, its
    GPU decoder does not (the real one's error: "Could not create decoder. Code: 8")."""
    cpu_decoder = fake.Decoder

    def decoder(**kwargs):
        if kwargs.get("device_id") != fake.NVIMGCODEC_DEVICE_CPU_ONLY:
            raise RuntimeError("Internal error - Could not create decoder. Code: 8")
        return cpu_decoder(**kwargs)

    fake.Decoder = decoder
    monkeypatch.setattr(nvjpeg, "_cuda_driver_loads", lambda: False)
    monkeypatch.setattr(nvjpeg, "_warned", set())
    return fake


def test_auto_falls_back_to_pillow_where_the_gpu_decoder_cannot_open(no_gpu, monkeypatch, caplog):
    """"auto" on a GPU backend without a GPU decoder: Pillow, and one warning that says why (not
    one per load); "nvimgcodec" asked for by name: one error line naming the option and the fix."""
    with caplog.at_level("WARNING", logger="novic"):
        assert nvjpeg.jpeg_decoder("auto", device="cuda") is None
        assert nvjpeg.jpeg_decoder("auto", device="cuda") is None
    assert [r.getMessage() for r in caplog.records] == [
        "novic: JPEGs are decoded by Pillow: nvImageCodec cannot decode on GPU 0: no NVIDIA driver on this "
        "machine (libcuda)"]
    with pytest.raises(nvjpeg.JpegDecoderError) as raised:
        nvjpeg.jpeg_decoder("nvimgcodec", device="cuda", device_id=1)
    assert str(raised.value).startswith("jpeg_decoder='nvimgcodec': nvImageCodec cannot decode on GPU 1: no NVIDIA "
                                        "driver on this machine (libcuda); use jpeg_decoder='pillow', or 'auto'")
    assert "\n" not in str(raised.value)
    assert nvjpeg.jpeg_decoder("nvimgcodec", device="cpu").device == "cpu"    # its CPU decoder still opens

    monkeypatch.setattr(nvjpeg, "_cuda_driver_loads", lambda: True)   # a driver, but no nvJPEG (say)
    with pytest.raises(nvjpeg.JpegDecoderError, match=r"could not open a decoder on GPU 0 \(Internal error - "
                                                      r"Could not create decoder. Code: 8\); use jpeg_decoder="):
        nvjpeg.jpeg_decoder("nvimgcodec", device="cuda")


def test_classifier_on_a_gpu_backend_without_a_gpu_decoder(runtime_bundle, monkeypatch, caplog):
    """The real nvImageCodec on this machine (no GPU), ort-cuda stood in by CPU sessions: "auto"
    loads with Pillow and classifies JPEGs; "nvimgcodec" is the one-line error."""
    pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec not installed: pip install 'novic[nvjpeg]'")
    if nvjpeg._cuda_driver_loads():
        pytest.skip("an NVIDIA driver is present: nvImageCodec's GPU decoder may open here")
    from novic.runtime.backends import ort, select
    from novic.runtime.classifier import Classifier, ClassifierError

    monkeypatch.setattr(nvjpeg, "_warned", set())
    monkeypatch.setattr(select, "select_for_bundle", lambda bundle, requested: select.Choice(
        "ort-cuda", "ort-cuda: stand-in", "fp32"))
    for cls in ("OrtImageEncoder", "OrtDecoderSession"):
        real = getattr(ort, cls)
        monkeypatch.setattr(ort, cls, lambda *a, _real=real, **kw: _real(*a, **{**kw, "provider": "cpu"}))
    with caplog.at_level("WARNING", logger="novic"):
        with Classifier.load(runtime_bundle.bundle, "ort-cuda", threads=1) as clf:   # jpeg_decoder="auto"
            assert clf.backend == "ort-cuda" and clf.preprocessor.jpeg_decoder is None
            results = clf.classify([jpeg(image) for image in photos()[:2]], guided=False, beam_width=2, topk=1)
            assert [r.ok for r in results] == [True, True]
    assert "JPEGs are decoded by Pillow: nvImageCodec cannot decode on GPU 0: no NVIDIA driver" in caplog.text
    with pytest.raises(ClassifierError, match=r"^jpeg_decoder='nvimgcodec': nvImageCodec cannot decode on GPU 0: "
                                              r"no NVIDIA driver on this machine \(libcuda\); use jpeg_decoder="):
        Classifier.load(runtime_bundle.bundle, "ort-cuda", threads=1, jpeg_decoder="nvimgcodec")
