"""novic-eval on generated labelled folders whose predictions are known (the tiny fixture bundle)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
from typer.testing import CliRunner  # noqa: E402

from fixtures_runtime import classifier, runtime_bundle  # noqa: E402,F401  (fixtures)
from novic.cli.eval import app  # noqa: E402
from novic.evaluation import EvalError, read_dataset  # noqa: E402
from novic.wordnet import WORDNET_DIR  # noqa: E402

needs_wordnet = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="wordnet-base not installed")

# For a top-1 prediction of the tiny model: a class name that is a synonym (correct), one WordNet step
# away (close: parent or sibling), looked up by hand in WordNet 3.0.
HAND = {"grass": ("grass", "gramineous plant"),            # parent: gramineous_plant.n.01
        "woman": ("adult female", "man"),                   # synonym; sibling under adult.n.01
        "man": ("adult male", "woman"),
        "astronaut": ("spaceman", "traveler"),              # synonym; parent: traveler.n.01
        "espresso": ("espresso", "coffee"),                 # parent: coffee.n.01
        "kitten": ("kitty", "young mammal"),
        "coffee cup": ("coffee cup", "cup")}
UNRELATED = ["rocket", "tripod", "flag", "spacesuit"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (56, 48 + seed % 7, 3), dtype=np.uint8))


@needs_wordnet
def test_eval_numbers_on_a_folder_with_known_predictions(classifier, runtime_bundle, tmp_path):
    images = [_noise(s) for s in range(12)]
    predicted = classifier.classify(images, topk=5)              # learn what the tiny model says
    kept = [(img, [l.text for l in r.labels]) for img, r in zip(images, predicted) if r.labels[0].text in HAND]
    assert len(kept) >= 3, [r.labels[0].text for r in predicted]
    data = tmp_path / "data"
    expect = {"correct": 0, "close": 0, "incorrect": 0, "top5": 0}
    for i, (img, top5) in enumerate(kept):
        kind = ("close", "incorrect", "correct")[i % 3]
        if kind == "incorrect":
            name = next(u for u in UNRELATED if u not in top5)
        else:
            name = HAND[top5[0]][0 if kind == "correct" else 1]
        expect[kind] += 1
        expect["top5"] += kind == "correct" or name in top5
        folder = data / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i}.png")
    first = sorted(data.iterdir())[0]
    (first / "broken.jpg").write_bytes(b"not a jpeg")            # an error row, not a score
    n = len(kept)

    out = _cli(data, "--bundle", runtime_bundle.bundle, "--backend", "ort-cpu", "--out", tmp_path / "report")
    assert out.exit_code == 0, out.output
    assert "Traceback" not in out.output and "broken.jpg" in out.output
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert (report["images"], report["scored"], report["failed"]) == (n + 1, n, 1)
    assert report["top1"] == pytest.approx(expect["correct"] / n, abs=1e-6)
    assert report["top5"] == pytest.approx(expect["top5"] / n, abs=1e-6)
    assert report["hierarchy"] == pytest.approx({k: expect[k] / n for k in ("correct", "close", "incorrect")},
                                                abs=1e-6)
    assert report["errors"][0]["path"].endswith("broken.jpg")
    synonyms = {c["class"]: c["top1"] for c in report["per_class"] if c["class"] in ("adult female", "adult male",
                                                                                      "spaceman", "kitty")}
    assert all(v == 1.0 for v in synonyms.values())     # a synonym folder name is a top-1 match
    assert sum(c["images"] for c in report["per_class"]) == n
    assert sum(c["count"] for c in report["confusions"]) == n - expect["correct"]
    assert report["throughput"]["images_per_second"] > 0
    md = (tmp_path / "report" / "eval.md").read_text()
    assert "## Per class" in md and "broken.jpg" in md


@needs_wordnet
def test_eval_with_granularity_scores_rolled_labels(classifier, runtime_bundle, tmp_path):
    from novic.runtime.hierarchy import rollup_for

    img = _noise(3)
    fine = classifier.classify([img], topk=1)[0].labels[0].text
    coarse = rollup_for(classifier.bundle, "coarse").roll(fine).text
    # a fine class name that differs from the prediction but rolls up to the same coarse label
    (tmp_path / "d" / fine.replace(" ", "_")).mkdir(parents=True)
    img.save(tmp_path / "d" / fine.replace(" ", "_") / "a.png")
    out = _cli(tmp_path / "d", "-b", runtime_bundle.bundle, "--granularity", "coarse", "-o", tmp_path / "r")
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert report["granularity"] == "coarse" and report["top1"] == 1.0
    assert report["rows"][0]["truth"] == coarse and report["rows"][0]["predictions"][0] == coarse


def test_unknown_class_name_is_a_note_and_matches_by_text(runtime_bundle, tmp_path):
    (tmp_path / "d" / "xyzzy").mkdir(parents=True)
    _noise(1).save(tmp_path / "d" / "xyzzy" / "a.png")
    out = _cli(tmp_path / "d", "-b", runtime_bundle.bundle, "-o", tmp_path / "r")
    assert out.exit_code == 0 and "Traceback" not in out.output
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert report["top1"] == 0.0 and report["per_class"][0]["class"] == "xyzzy"
    if (WORDNET_DIR / "data.noun").is_file():
        assert "xyzzy" in out.output and "exact text" in out.output
    assert ("per_class.png" in out.output) != ("matplotlib is not installed" in out.output)


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "no images in class folders"),
    (lambda d: (d / "cat").mkdir(parents=True), "no images in class folders"),
    (lambda d: None, "not found"),
])
def test_bad_data_is_one_line(runtime_bundle, tmp_path, make, message):
    data = tmp_path / "data"
    make(data)
    out = _cli(data, "-b", runtime_bundle.bundle, "-o", tmp_path / "r")
    assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output
    assert len([line for line in out.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "r").exists()


def test_csv_dataset(tmp_path):
    _noise(0).save(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("path,label\na.png,dog\n/abs/b.png,\"hot dog, with mustard\"\n")
    samples = read_dataset(tmp_path / "l.csv")
    assert [(s.path, s.label) for s in samples] == [(str(tmp_path / "a.png"), "dog"),
                                                     ("/abs/b.png", "hot dog, with mustard")]
    (tmp_path / "bad.csv").write_text("a.png,dog\nb.png\n")
    with pytest.raises(EvalError, match="line 2: expected two cells"):
        read_dataset(tmp_path / "bad.csv")


def _tiny_report():
    return {"granularity": "fine", "per_class": [{"class": "dog", "top1": 0.5}, {"class": "cat", "top1": None}]}


def test_chart_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from novic.evaluation import write_chart

    assert write_chart(_tiny_report(), tmp_path / "c.png") is None
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    import sys

    from novic.evaluation import write_chart

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails as if not installed
    line = write_chart(_tiny_report(), tmp_path / "c.png")
    assert "pip install 'novic[eval]'" in line and not (tmp_path / "c.png").exists()
