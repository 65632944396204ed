"""One voice in every message: console scripts name their flags (the API its parameters), and a
bad option value is a usage error with exit code 2 in every console script, like typer's own."""
from __future__ import annotations

import importlib
import json

import pytest
from typer.testing import CliRunner

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)
from novic.errors import cli_voice, option


def _run(*args):
    from novic.cli.run import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("voice") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


def test_option_spelling_follows_the_caller():
    assert option("guided=False", "--free") == "guided=False"
    seen = []

    @cli_voice
    def command(fail: bool):
        seen.append(option("guided=False", "--free"))
        if fail:
            raise ValueError("bad")

    command(False)
    with pytest.raises(ValueError):
        command(True)
    assert seen == ["--free", "--free"] and option("guided=False", "--free") == "guided=False"   # restored


def test_api_and_cli_messages_name_their_own_options(classifier, runtime_bundle, image):  # noqa: F811
    from novic.runtime.classifier import ClassifierError

    with pytest.raises(ClassifierError, match="use beam_width <= 10") as api:
        classifier.check_options(guided=False, beam_width=50)
    out = _run("--bundle", runtime_bundle.bundle, "-q", "--free", "--beam-width", 50, image)
    assert out.exit_code == 2 and "use --beam-width <= 10" in out.stderr and "beam_width" not in out.stderr
    assert "beam_width" not in str(api.value).replace("use beam_width", "")   # one spelling per message

    with pytest.raises(ClassifierError, match="or guided=False$"):
        classifier.check_options(vocab=["zzqqxxjj"])
    out = _run("--bundle", runtime_bundle.bundle, "-q", "--vocab", "zzqqxxjj,qqzzkkxx", image)
    assert out.exit_code == 2 and out.stderr.rstrip().endswith("or --free") and "guided=False" not in out.stderr


@pytest.mark.parametrize("module", ["eval", "label"])
def test_eval_and_label_name_their_flags_and_refuse_bad_options_with_exit_2(module, runtime_bundle, image, tmp_path):  # noqa: F811
    """Refused before any image is read: novic-label never starts Ray for them."""
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "a.png").write_bytes(image.read_bytes())
    app = importlib.import_module(f"novic.cli.{module}").app
    where = [data, "--out", tmp_path / "out"]

    out = CliRunner().invoke(app, [str(a) for a in [*where, "--bundle", runtime_bundle.bundle, "--free",
                                                     "--beam-width", 50]])
    assert out.exit_code == 2 and "use --beam-width <= 10" in out.stderr and "beam_width" not in out.stderr, out.output
    if module == "label":   # novic-eval has no --topk (top-1 and top-5 are its scores)
        out = CliRunner().invoke(app, [str(a) for a in [*where, "--bundle", runtime_bundle.bundle, "--topk", 12]])
        assert out.exit_code == 2 and "--topk 12 exceeds --beam-width 10" in out.stderr, out.output
    assert not (tmp_path / "out").exists()


def test_wordnet_dir_is_named_as_the_caller_passes_it(tmp_path):
    from novic.cli.train import app
    from novic.train.nouns import read_wordnet_nouns

    with pytest.raises(FileNotFoundError, match="pass wordnet_dir$"):
        read_wordnet_nouns(tmp_path / "api")
    out = CliRunner().invoke(app, ["nouns", str(tmp_path / "n.json"), "--wordnet-dir", str(tmp_path / "cli")])
    assert out.exit_code == 1 and out.stderr.rstrip().endswith("pass --wordnet-dir DIR"), out.output


def test_vocab_takes_files_and_inline_nouns_and_unites_repeats(runtime_bundle, image, tmp_path):
    nouns = tmp_path / "nouns.txt"
    nouns.write_text("cat\ndog\n")
    out = _run("--bundle", runtime_bundle.bundle, "-q", "--json", "--topk", 4, "--vocab", nouns,
               "--vocab", "rocket, sky", image)
    assert out.exit_code == 0, out.output
    assert sorted(l["text"] for l in json.loads(out.stdout)["labels"]) == ["cat", "dog", "rocket", "sky"]
    out = _run("--bundle", runtime_bundle.bundle, "-q", "--json", "--vocab", "rocket,sky", image)
    assert out.exit_code == 0 and sorted(l["text"] for l in json.loads(out.stdout)["labels"]) == ["rocket", "sky"]
    out = _run("--bundle", runtime_bundle.bundle, "-q", "--vocab", tmp_path, "--vocab", "a,b", image)
    assert out.exit_code == 2 and f"--vocab {tmp_path}: is a directory" in out.stderr
    out = _run("--bundle", runtime_bundle.bundle, "-q", "--vocab", tmp_path / "missing.txt", image)
    assert out.exit_code == 2 and out.stderr.strip() == (
        f"error: --vocab {tmp_path / 'missing.txt'}: no such file; give a text file with one noun per line, "
        f"or nouns separated by commas (--vocab 'cat,dog')")


def test_eval_and_label_take_vocab_as_novic_run_does(runtime_bundle, image, tmp_path, monkeypatch):
    from novic.cli.eval import app as eval_app
    from novic.cli.label import app as label_app
    from novic.serve import ray_label

    nouns = tmp_path / "nouns.txt"
    nouns.write_text("cat\ndog\n")
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "a.png").write_bytes(image.read_bytes())
    out = CliRunner().invoke(eval_app, [str(data), "--bundle", str(runtime_bundle.bundle), "--out", str(tmp_path / "ev"),
                                        "--vocab", "rocket, sky"])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["per_class"][0]["most_predicted"] in ("rocket", "sky")

    seen = {}   # what novic-label hands to the Ray job (the job itself: tests/test_ray_label.py)
    monkeypatch.setattr(ray_label, "label", lambda inputs, out, **options: seen.update(options) or
                        ray_label.LabelSummary(1, 0, 1, 0, 0.1, []))
    out = CliRunner().invoke(label_app, [str(data), "--bundle", str(runtime_bundle.bundle), "--out", str(tmp_path / "lb"),
                                         "--vocab", str(nouns), "--vocab", "rocket, sky"])
    assert out.exit_code == 0 and seen["vocab"] == ["cat", "dog", "rocket", "sky"], out.output

    for app in (eval_app, label_app):
        out = CliRunner().invoke(app, [str(data), "--bundle", str(runtime_bundle.bundle), "--out", str(tmp_path / "x"),
                                       "--vocab", str(tmp_path / "missing.txt")])
        assert out.exit_code == 2 and out.stderr.strip() == (
            f"error: --vocab {tmp_path / 'missing.txt'}: no such file; give a text file with one noun per line, "
            f"or nouns separated by commas (--vocab 'cat,dog')"), out.output


def test_beam_width_1_alone_is_greedy_with_one_label(runtime_bundle, image):
    out = _run("--bundle", runtime_bundle.bundle, "--json", "--beam-width", 1, image)
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.stdout)["labels"]) == 1
    assert "note: --beam-width 1 gives at most 1 label(s) per image" in out.stderr
    out = _run("--bundle", runtime_bundle.bundle, "--beam-width", 1, "--topk", 3, image)   # asked for: refused
    assert out.exit_code == 2 and "--topk 3 exceeds --beam-width 1" in out.stderr


def test_precision_is_case_insensitive_and_the_choices_are_the_runtime_s(runtime_bundle, image):
    from novic.cli._common import Backend, Precision
    from novic.runtime.backends.select import BACKENDS
    from novic.runtime.bundle import PRECISIONS

    assert tuple(p.value for p in Precision) == PRECISIONS
    assert tuple(b.value for b in Backend) == ("auto", *BACKENDS)
    out = _run("--bundle", runtime_bundle.bundle, "--precision", "FP32", "--backend", "ort-cpu", image)
    assert out.exit_code == 0 and "backend ort-cpu (fp32" in out.stderr, out.output


def test_triton_choices_are_the_repository_writer_s():
    from novic.cli.export import EncoderBackend, TritonTarget
    from novic.serve.triton_repo import ENCODER_BACKENDS, TARGETS

    assert tuple(t.value for t in TritonTarget) == TARGETS
    assert tuple(b.value for b in EncoderBackend) == ENCODER_BACKENDS


@pytest.mark.parametrize("module, args, flag", [
    ("run", ["--bundle", "B", "--backend", "bogus", "x.jpg"], "'--backend'"),
    ("run", ["--bundle", "B", "--precision", "bf16", "x.jpg"], "'--precision'"),
    ("run", ["--bundle", "B", "--verify", "x", "x.jpg"], "--verify"),
    ("run", ["--bundle", "B", "--topk", "0", "x.jpg"], "'--topk'"),
    ("run", ["--bundle", "B", "--free", "--vocab", "a,b", "x.jpg"], "--vocab"),
    ("bench", ["run", "B", "--backend", "bogus"], "'--backend'"),
    ("bench", ["run", "B", "--precision", "bf16"], "'--precision'"),
    ("bench", ["run", "B", "--batches", "0"], "expected comma-separated positive integers"),
    ("bench", ["compare", "--backend", "bogus"], "'--backend'"),
    ("bench", ["compare", "--config", "bogus"], "unknown config 'bogus'"),
    ("bench", ["compare", "--device", "gpu"], "--device"),
    ("export", ["trt", "B", "--precision", "int4"], "--precision"),
    ("export", ["calib", "B", "--method", "bogus"], "--method"),
    ("importer", ["X.zip", "--out", "O.safetensors", "--embedder", "bogus"], "--embedder"),
    ("export", ["onnx", "--checkpoint", "C", "--out", "O", "--topk", "0"], "'--topk'"),
    ("importer", ["X.zip", "--out", "O.safetensors", "--heads", "0"], "'--heads'"),
    ("train", ["nouns", "n.json", "--max-nouns", "0"], "'--max-nouns'"),
    ("eval", ["D", "--bundle", "B", "--backend", "bogus"], "'--backend'"),
    ("eval", ["D", "--bundle", "B", "--precision", "bf16"], "'--precision'"),
    ("eval", ["D", "--bundle", "B", "--free", "--vocab", "a,b"], "--vocab"),
    ("label", ["I", "--bundle", "B", "--out", "O", "--free", "--vocab", "a,b"], "--vocab"),
    ("label", ["I", "--bundle", "B", "--out", "O", "--format", "xml"], "'--format'"),
    ("label", ["I", "--bundle", "B", "--out", "O", "--backend", "bogus"], "'--backend'"),
    ("export", ["triton", "B", "--out", "R", "--target", "tpu"], "'--target'"),
    ("export", ["triton", "B", "--out", "R", "--precision", "int8"], "'--precision'"),
    ("export", ["triton", "B", "--out", "R", "--encoder-backend", "tensorrt"], "'--encoder-backend'"),
])
def test_bad_option_values_exit_2_in_every_console_script(module, args, flag, tmp_path, monkeypatch):
    """Nothing is opened or run: B, C, X name nothing (the value is refused first)."""
    monkeypatch.chdir(tmp_path)
    app = importlib.import_module(f"novic.cli.{module}").app
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and flag in out.output, out.output


def test_the_pixel_limit_is_named_as_the_caller_sets_it(classifier, runtime_bundle, image, monkeypatch):  # noqa: F811
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)   # restored after the test
    Image.MAX_IMAGE_PIXELS = 20_000   # the image (480 x 300) is over twice it
    error = classifier.classify_one(str(image)).error
    assert "image too large" in error and "(PIL.Image.MAX_IMAGE_PIXELS)" in error and "novic-run" not in error
    out = _run("--bundle", runtime_bundle.bundle, "-q", "--max-pixels", 20_000, image)
    assert out.exit_code == 1 and "(novic-run --max-pixels N)" in out.stderr and "PIL.Image" not in out.stderr
