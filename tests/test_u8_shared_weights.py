"""A uint8-input twin (novic.export.u8) holds no weights: it reads the float encoder's weight file.
Both graphs load from the bundle and agree; the shared file is hashed, and a tampered or missing
one is one clear line; nothing that replaces or deletes files breaks a twin's weights."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_runtime import runtime_bundle  # noqa: E402,F401  (fixture)

pytest.importorskip("onnxruntime")
skdata = pytest.importorskip("skimage.data")

U8 = "uint8-nhwc"
WEIGHTS = "image_encoder.fused.onnx.data"


def photos():
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]


@pytest.fixture(scope="module")
def bundle(runtime_bundle):   # noqa: F811
    from novic.runtime.bundle import Bundle

    return Bundle.open(runtime_bundle.bundle, verify="eager")


@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle.path, dst)
    return dst


def _flip_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_twin_reads_the_float_graphs_weights(bundle):
    """One weight file, listed under both entries with one hash; the twin graph is a small
    fraction of it; the plain graph (TensorRT's source) stays self-contained."""
    from novic.calib.weights import external_files

    flt = bundle.artifact("image_encoder", "fp32", "fused")
    twin = bundle.artifact("image_encoder", "fp32", "fused", U8)
    assert [r.file for r in flt.external_data] == [WEIGHTS] and twin.external_data == flt.external_data
    weights = flt.external_data[0].size
    assert twin.size * 10 < weights and flt.size * 2 < weights
    root = bundle.path.resolve()
    assert external_files(root / twin.file) == external_files(root / flt.file) == [root / WEIGHTS]
    plain = bundle.artifact("image_encoder", "fp32")
    assert plain.external_data == () and external_files(root / plain.file) == []
    names = sorted(f.name for f in bundle.path.iterdir() if f.name.startswith("image_encoder"))
    assert names == ["image_encoder.fused.onnx", WEIGHTS, "image_encoder.fused.u8.onnx", "image_encoder.onnx"]
    # readable like the graphs (onnx writes weight files 0o600: a service user could not load them)
    assert {(root / n).stat().st_mode & 0o777 for n in names} == {0o666 & ~_umask()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_both_graphs_load_and_agree(bundle):
    """onnxruntime (CPU) loads the float graph and the twin from the bundle directory; the same
    photos through the host float path and through the uint8 path give the same embeddings."""
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.preprocess import Preprocessor

    flt = OrtImageEncoder(bundle.artifact_path("image_encoder", "fp32", "fused"), threads=1)
    twin = OrtImageEncoder(bundle.artifact_path("image_encoder", "fp32", "fused", U8), threads=1)
    assert twin.takes_uint8 and not flt.takes_uint8
    pre = Preprocessor(bundle.preprocess_config, uint8=True)
    pixels = pre.batch(photos())
    np.testing.assert_allclose(twin(pixels), flt(pre.normalize_batch(pixels)), atol=1e-6)
    np.testing.assert_allclose(twin(pixels[1:2]), flt(pre.normalize_batch(pixels[1:2])), atol=1e-6)


@pytest.mark.parametrize("verify", [True, "cached"])
def test_tampered_shared_weights_are_refused(copy, verify):
    """A changed byte in the shared file fails the twin and the float graph alike (one line naming
    the file), for lazy and cached verification; the plain graphs, which do not read it, still run."""
    from novic.runtime.bundle import Bundle, BundleError
    from novic.runtime.classifier import Classifier

    if verify == "cached":   # remember good hashes first: a later write must still be caught
        Bundle.open(copy, verify="cached").verify()
    _flip_byte(copy / WEIGHTS)
    for u8 in (True, False):
        with pytest.raises(BundleError, match=rf"{WEIGHTS}: sha256 mismatch") as err:
            Classifier.load(Bundle.open(copy, verify=verify), "ort-cpu", fused=True, u8=u8)
        assert "\n" not in str(err.value) and "re-export" in str(err.value)
    with Classifier.load(copy, "ort-cpu", fused=False, threads=1) as clf:
        assert clf.classify_one(photos()[0]).ok


def test_check_names_the_tampered_shared_file_in_one_line(copy):
    _flip_byte(copy / WEIGHTS)
    code = f"import sys; sys.argv = ['novic-export', 'check', {str(copy)!r}]; from novic.cli.export import main; main()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert f"{WEIGHTS}: sha256 mismatch" in lines[0] and "Traceback" not in result.stderr


def test_missing_shared_weights_are_one_line(copy):
    """The weight file gone: the bundle does not open. Also where only the twin still lists it (a
    manifest edited down to the twin): the twin's own entry names the file."""
    from novic.runtime.bundle import Bundle, BundleError

    (copy / WEIGHTS).unlink()
    with pytest.raises(BundleError, match=rf"{WEIGHTS}: missing from the bundle .*re-export") as err:
        Bundle.open(copy)
    assert "\n" not in str(err.value)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"]
                             if not (a.get("variant") == "fused" and a["role"] == "image_encoder" and "pixels" not in a)]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"{WEIGHTS}: missing from the bundle"):
        Bundle.open(copy, verify=False)


def test_listings_of_a_shared_file_must_agree(copy):
    """The hash of a shared file is checked once per name, so a manifest that gives it two hashes
    is refused (else the second would never be checked)."""
    from novic.runtime.bundle import Bundle, BundleError

    manifest = json.loads((copy / "manifest.json").read_text())
    (twin,) = [a for a in manifest["artifacts"] if a.get("pixels") == U8]
    twin["external_data"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"{WEIGHTS} is listed twice with different sha256 or size"):
        Bundle.open(copy)


def test_a_failed_gate_keeps_the_shared_weights(bundle, tmp_path, monkeypatch):
    """A fused graph's weights move into its side file before the twin is made; a twin that fails
    its gate is deleted without them, and the float graph still runs with its new file list."""
    from novic.export import u8 as u8_mod
    from novic.runtime.backends.ort import OrtImageEncoder

    onnx.save(onnx.load(bundle.artifact_path("image_encoder", "fp32", "fused")), tmp_path / "image_encoder.fused.onnx")
    export = {"path": str(tmp_path / "image_encoder.fused.onnx"), "files": [str(tmp_path / "image_encoder.fused.onnx")]}
    cfg = bundle.preprocess_config
    real = u8_mod.u8_file
    monkeypatch.setattr(u8_mod, "u8_file", lambda path, mean, std: real(path, [m + 0.2 for m in mean], std))
    kept, summary = u8_mod.export_u8([(export, "fp32", "fused")], cfg, say=lambda _: None)
    assert kept == [] and summary["image encoder fp32 fused u8"].startswith("fail: cosine")
    assert export["files"] == [str(tmp_path / WEIGHTS), export["path"]]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["image_encoder.fused.onnx", WEIGHTS]
    pixels = np.zeros((1, 3, *cfg.size), np.float32)
    np.testing.assert_array_equal(OrtImageEncoder(export["path"])(pixels),
                                  OrtImageEncoder(bundle.artifact_path("image_encoder", "fp32", "fused"))(pixels))


def test_the_twin_names_its_files_as_the_bundle_does(bundle, tmp_path):
    """Written through a symlinked directory, the twin's file list stays under the path given,
    so that the manifest entry names the shared weights relative to the bundle."""
    from novic.export.bundle import artifact_entry
    from novic.export.u8 import export_u8

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    root = tmp_path / "link"
    onnx.save(onnx.load(bundle.artifact_path("image_encoder", "fp32", "fused")), root / "image_encoder.fused.onnx")
    flt = bundle.artifact("image_encoder", "fp32", "fused")
    export = {"path": str(root / "image_encoder.fused.onnx"), "io": flt.signature()}
    ((made, _, _),), _ = export_u8([(export, "fp32", "fused")], bundle.preprocess_config, say=lambda _: None)
    assert made["files"] == [str(root / WEIGHTS), str(root / "image_encoder.fused.u8.onnx")]
    for e in (export, made):
        entry = artifact_entry(root, e, "image_encoder", "fp32", "fused")
        assert [f["file"] for f in entry["external_data"]] == [WEIGHTS]


@pytest.mark.parametrize("external", [False, True])
def test_a_plain_graph_stays_as_exported(bundle, tmp_path, external):
    """TensorRT's plain graphs are not rewritten: a self-contained one gets a self-contained twin;
    one with its weights in a side file already (a tower over 1 GiB) gets a twin that shares it."""
    from novic.calib.weights import external_files
    from novic.export.u8 import export_u8

    graph = tmp_path / "image_encoder.onnx"
    onnx.save(onnx.load(bundle.artifact_path("image_encoder", "fp32")), graph, save_as_external_data=external,
              location="image_encoder.onnx.data", size_threshold=1024)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    ((made, _, _),), _ = export_u8([({"path": str(graph)}, "fp32", "plain")], bundle.preprocess_config,
                                   say=lambda _: None)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.name in before} == before
    twin = Path(made["path"])
    assert external_files(twin) == ([(tmp_path / "image_encoder.onnx.data").resolve()] if external else [])
    assert (twin.stat().st_size * 10 < sum(len(b) for b in before.values())) == external   # vs graph + weights
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([*before, twin.name])


def test_a_self_contained_twin_still_loads(copy):
    """Bundles written before (format 3, a twin with its own copy of the weights) open and run."""
    from novic.export.bundle import artifact_entry
    from novic.runtime.bundle import Bundle
    from novic.runtime.classifier import Classifier

    twin = copy / "image_encoder.fused.u8.onnx"
    onnx.save(onnx.load(twin), twin)   # the weights pulled back in
    manifest = json.loads((copy / "manifest.json").read_text())
    (entry,) = [a for a in manifest["artifacts"] if a.get("pixels") == U8]
    old = artifact_entry(copy, {"path": str(twin), "io": {"inputs": entry["inputs"], "outputs": entry["outputs"]}},
                         "image_encoder", "fp32", "fused", U8)
    entry.clear()
    entry.update({**old, "gate": {"min_cosine": 1.0}})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    reopened = Bundle.open(copy, verify="eager")
    assert reopened.artifact("image_encoder", "fp32", "fused", U8).external_data == ()
    with Classifier.load(reopened, "ort-cpu", fused=True, u8=True, threads=1) as clf, \
            Classifier.load(reopened, "ort-cpu", fused=True, u8=False, threads=1) as flt:
        assert clf.encoder.takes_uint8
        assert [l.text for l in clf.classify_one(photos()[2]).labels] == \
            [l.text for l in flt.classify_one(photos()[2]).labels]


def test_calib_does_not_overwrite_a_listed_file(copy):
    """novic-export calib writes new encoder files only: a name another artifact lists (a twin's
    shared weights, a float graph) is refused before anything moves."""
    from novic.calib.run import CalibError, add_artifact

    before = (copy / "manifest.json").read_bytes()
    src = copy.parent / "quantised.onnx"
    shutil.copyfile(copy / "image_encoder.onnx", src)
    with pytest.raises(CalibError, match="image_encoder.fused.onnx belongs to another artifact"):
        add_artifact(copy, src, role="image_encoder", precision="int8", name="image_encoder.fused.onnx")
    assert (copy / "manifest.json").read_bytes() == before and src.exists()
