"""Image encoders that take uint8 pixels (novic.export.u8): written and gated at export, recorded
in the manifest, hash-checked, chosen where they should be, and classifying exactly like the float
path (real photos, odd images, a batch with a bad image)."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_runtime import runtime_bundle  # noqa: E402,F401  (fixture)

pytest.importorskip("onnxruntime")
skdata = pytest.importorskip("skimage.data")

U8 = "uint8-nhwc"


def photos():
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]


def odd_images():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (90, 70, 3), np.uint8)
    return {"gray": Image.fromarray(rgb[:, :, 0], "L"),
            "rgba": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (90, 70), np.uint8)]), "RGBA"),
            "cmyk": Image.fromarray(rgb).convert("CMYK"),
            "tiny": Image.fromarray(rgb[:1, :2]),
            "strip": Image.fromarray(rng.integers(0, 256, (6, 3000, 3), np.uint8)),
            "bad": b"this is not an image"}


@pytest.fixture(scope="module")
def bundle(runtime_bundle):   # noqa: F811
    from novic.runtime.bundle import Bundle

    return Bundle.open(runtime_bundle.bundle, verify="eager")   # every hash, the u8 graph's too


def test_export_writes_and_records_the_u8_encoder(bundle):
    """The runtime fixture exports fp32 only, with a fused encoder: its u8 twin is there, with
    uint8 NHWC input, its gate on real photos, and the prologue in front of the encoder."""
    (art,) = [a for a in bundle.artifacts if a.pixels == U8]
    assert (art.role, art.precision, art.variant, art.file) == ("image_encoder", "fp32", "fused",
                                                                "image_encoder.fused.u8.onnx")
    h, w = bundle.preprocess_config.size
    assert [t.to_dict() for t in art.inputs] == [{"name": "pixels_u8", "dtype": "uint8", "shape": ["B", h, w, 3]}]
    assert art.outputs == bundle.artifact("image_encoder", "fp32", "fused").outputs
    gate = art.extra["gate"]
    assert gate["min_cosine"] >= 0.99999 and gate["images"] == ["astronaut", "chelsea", "coffee", "rocket"]
    assert bundle.manifest["export"]["u8_gates"] == {"image encoder fp32 fused u8": "pass"}
    assert bundle.manifest["format_version"] == 3 and bundle.has_u8("fp32", "fused") and not bundle.has_u8("fp32")
    model = onnx.load(bundle.artifact_path("image_encoder", "fp32", "fused", U8))
    assert [n.op_type for n in model.graph.node[:5]] == ["Transpose", "Cast", "Div", "Sub", "Div"]
    assert bundle.precisions("image_encoder", "fused") == ["fp32"]   # the u8 twin is not a second fp32


def test_classify_equals_the_float_path(bundle):
    """Same labels and scores through the uint8 path as through the float path, for real photos,
    grayscale/RGBA/CMYK/tiny/extreme-aspect images, and a batch with one bad image."""
    from novic.runtime.classifier import Classifier

    odd = odd_images()
    inputs = photos() + list(odd.values())
    with Classifier.load(bundle, "ort-cpu", fused=True, u8=False, threads=1) as flt, \
            Classifier.load(bundle, "ort-cpu", fused=True, u8=True, threads=1) as u8:
        assert not flt.encoder.takes_uint8 and u8.encoder.takes_uint8 and u8.preprocessor.uint8
        assert "uint8 pixels into the encoder" in u8.describe()
        want, got = flt.classify(inputs, topk=5, batch_size=4), u8.classify(inputs, topk=5, batch_size=4)
        u8_pixels, errors = u8.preprocessor.load_batch(inputs)
        float_pixels, _ = flt.preprocessor.load_batch(inputs)
        good = [i for i, e in enumerate(errors) if e is None]
        np.testing.assert_allclose(u8.embed(u8_pixels[good]), flt.embed(float_pixels[good]), atol=1e-6)
    assert [r.error is None for r in got] == [True] * (len(inputs) - 1) + [False]
    assert got[-1].error == want[-1].error and "not an image file" in got[-1].error
    for a, b in zip(want, got):
        assert [l.text for l in a.labels] == [l.text for l in b.labels]
        np.testing.assert_allclose([l.logprob for l in a.labels], [l.logprob for l in b.labels], atol=1e-5)


def test_uint8_preprocessing_stops_before_the_floats(bundle):
    from novic.runtime.preprocess import Preprocessor

    inputs = photos()[:2] + [odd_images()["cmyk"], b"\xff\xd8 broken"]
    flt = Preprocessor(bundle.preprocess_config, threads=2)
    u8 = Preprocessor(bundle.preprocess_config, threads=2, uint8=True)
    (want, want_err), (got, got_err) = flt.load_batch(inputs), u8.load_batch(inputs)
    h, w = bundle.preprocess_config.size
    assert got.dtype == np.uint8 and got.shape == (4, h, w, 3)
    assert [str(e) for e in got_err] == [str(e) for e in want_err] and got_err[-1] is not None
    assert not got[-1].any()                                          # a failed row stays zero
    np.testing.assert_array_equal(u8.normalize_batch(got[:3]), want[:3])   # the float path, bit for bit
    np.testing.assert_array_equal(u8(inputs[0]), got[0])


def test_classify_pixels_takes_either_form(bundle):
    """A uint8 batch is normalised for a float encoder; a float batch for a uint8 encoder is one
    clear error (it cannot be undone)."""
    from novic.runtime.classifier import Classifier, ClassifierError
    from novic.runtime.preprocess import Preprocessor

    u8_batch, _ = Preprocessor(bundle.preprocess_config, uint8=True).load_batch(photos())
    with Classifier.load(bundle, "ort-cpu", threads=1) as flt, \
            Classifier.load(bundle, "ort-cpu", fused=True, u8=True, threads=1) as u8:
        names = ["a", "b", "c", "d"]
        want = flt.classify_pixels(flt.preprocessor.normalize_batch(u8_batch), names)
        for clf in (flt, u8):
            got = clf.classify_pixels(u8_batch, names)
            assert [[l.text for l in r.labels] for r in got] == [[l.text for l in r.labels] for r in want]
        with pytest.raises(ClassifierError, match=r"takes uint8 pixels \[N, H, W, 3\].*load with u8=False"):
            u8.classify_pixels(flt.preprocessor.normalize_batch(u8_batch), names)


def test_selection_and_old_bundles(bundle, tmp_path, monkeypatch):
    """ort-cuda prefers the u8 encoder, ort-cpu does not (measured no faster); a bundle without it
    (written before) loads and classifies on the float path; u8=True there is one clear error."""
    from novic.runtime.backends import select
    from novic.runtime.bundle import Bundle
    from novic.runtime.classifier import Classifier, ClassifierError
    from novic.runtime.opening import encoder_input

    assert select.prefers_u8("ort-cuda") and not select.prefers_u8("ort-cpu") and not select.prefers_u8("trt")
    assert encoder_input(bundle, "fp32", "fused", "ort-cuda", None) == U8
    assert encoder_input(bundle, "fp32", "plain", "ort-cuda", None) == "float32-nchw"   # none for plain
    assert encoder_input(bundle, "fp32", "fused", "ort-cpu", None) == "float32-nchw"
    assert encoder_input(bundle, "fp32", "fused", "ort-cuda", False) == "float32-nchw"
    with pytest.raises(ClassifierError, match=r"no fp32 plain image encoder taking uint8.*load with fused=True"):
        Classifier.load(bundle, "ort-cpu", u8=True)

    old = tmp_path / "old"
    shutil.copytree(bundle.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for a in [a for a in manifest["artifacts"] if "pixels" in a]:
        (old / a["file"]).unlink()
        manifest["artifacts"].remove(a)
    manifest["format_version"] = 2
    manifest["export"].pop("u8_gates")
    (old / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(select, "CPU_PREFERS_U8", True)   # ort-cpu now takes it where it can
    image = photos()[1]
    with Classifier.load(bundle, "ort-cpu", fused=True, threads=1) as new:
        assert new.encoder.takes_uint8
        want = new.classify_one(image)
    with Classifier.load(Bundle.open(old, verify="eager"), "ort-cpu", fused=True, threads=1) as clf:
        assert not clf.encoder.takes_uint8 and not clf.preprocessor.uint8
        got = clf.classify_one(image)
    assert [l.text for l in got.labels] == [l.text for l in want.labels]
    with pytest.raises(ClassifierError, match="no fp32 fused image encoder taking uint8 pixels.*re-export"):
        Classifier.load(old, "ort-cpu", fused=True, u8=True)


def test_a_tampered_u8_graph_is_refused(bundle, tmp_path):
    from novic.runtime.bundle import BundleError
    from novic.runtime.classifier import Classifier

    copy = tmp_path / "copy"
    shutil.copytree(bundle.path, copy)
    graph = copy / "image_encoder.fused.u8.onnx"
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"image_encoder.fused.u8.onnx: sha256 mismatch"):
        Classifier.load(copy, "ort-cpu", fused=True, u8=True)
    with Classifier.load(copy, "ort-cpu", fused=True, u8=False, threads=1) as clf:   # the float graph is fine
        assert clf.classify_one(photos()[0]).ok


def test_manifest_rejects_bad_pixels(bundle, tmp_path):
    from novic.runtime.bundle import Bundle, BundleError

    copy = tmp_path / "copy"
    shutil.copytree(bundle.path, copy)
    text = (copy / "manifest.json").read_text()
    for change, pattern in ((("image_encoder", "pixels", "rgb"), "pixels 'rgb' is not one of"),
                            (("decoder_step", "pixels", U8), "only an image encoder takes pixels"),
                            (("image_encoder", "variant", "fused"), r"two artifacts for image_encoder/fp32 \(fused\) "
                                                                    r"\(uint8-nhwc\)")):
        manifest = json.loads(text)
        role, key, value = change
        for a in manifest["artifacts"]:
            if a["role"] == role and a.get("variant", "plain") == "plain":
                a[key] = value
                if key == "variant":
                    a["pixels"] = U8
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=pattern):
            Bundle.open(copy)


def test_gate_keeps_a_wrong_prologue_out(bundle, tmp_path, monkeypatch):
    """A u8 graph that normalises differently from the host is caught by the gate and not written."""
    from novic.export import u8 as u8_mod

    src = tmp_path / "image_encoder.onnx"
    shutil.copyfile(bundle.artifact_path("image_encoder", "fp32"), src)
    cfg = bundle.preprocess_config
    real = u8_mod.u8_file
    monkeypatch.setattr(u8_mod, "u8_file", lambda path, mean, std: real(path, [m + 0.2 for m in mean], std))
    lines = []
    kept, summary = u8_mod.export_u8([({"path": str(src)}, "fp32", "plain")], cfg, say=lines.append)
    assert kept == [] and summary["image encoder fp32 u8"].startswith("fail: cosine")
    assert "FAIL" in lines[0] and "not written" in lines[0]
    assert not (tmp_path / "image_encoder.u8.onnx").exists()


def test_fp16_encoder_normalises_in_fp32(bundle, tmp_path):
    """An fp16 encoder keeps its fp32 input and its own cast: the u8 twin feeds it the same fp32
    numbers, so its embeddings equal the fp16 float graph's."""
    from novic.export.fp16 import encoder_fp16
    from novic.export.u8 import export_u8
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.preprocess import Preprocessor

    src = tmp_path / "image_encoder.onnx"
    shutil.copyfile(bundle.artifact_path("image_encoder", "fp32"), src)
    fp16 = encoder_fp16({"path": str(src)})
    (made, precision, variant), = export_u8([(fp16, "fp16", "plain")], bundle.preprocess_config, say=lambda _: None)[0]
    assert Path(made["path"]).name == "image_encoder.fp16.u8.onnx" and made["gate"]["min_cosine"] >= 0.99999
    model = onnx.load(made["path"])
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    pre = Preprocessor(bundle.preprocess_config, uint8=True)
    pixels = pre.batch(photos())
    got = OrtImageEncoder(made["path"])(pixels)
    np.testing.assert_array_equal(got, OrtImageEncoder(fp16["path"])(pre.normalize_batch(pixels)))
    with pytest.raises(ValueError, match=r"takes uint8 pixels \[B, \d+, \d+, 3\]"):
        OrtImageEncoder(made["path"])(pre.normalize_batch(pixels))
