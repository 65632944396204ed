"""End to end: novic-run / Classifier on the tiny bundle == open_clip encode + PyTorch oracle decode."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

skdata = pytest.importorskip("skimage.data")
pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from fixtures_runtime import classifier, runtime_bundle  # noqa: E402,F401  (fixtures)
from novic.cli.run import app  # noqa: E402
from novic.runtime.classifier import Classifier, ClassifierError, Label, Result  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        Image.fromarray(getattr(skdata, name)()).save(root / f"{name}.{'png' if i % 2 else 'jpg'}", quality=92)
    return root


@pytest.fixture(scope="module")
def oracle(runtime_bundle):
    """open_clip's own transform + encode_image, then novic.model.reference beam search."""
    import torch

    from novic.model.checkpoint import load_checkpoint
    from novic.model.embedder import Embedder
    from novic.model.reference import beam_search
    from novic.runtime.bundle import Bundle
    from novic.runtime.trie import TokenTrie

    ckpt = load_checkpoint(runtime_bundle.checkpoint)
    bundle = Bundle.open(runtime_bundle.bundle)
    model, emb = ckpt.build_model(), Embedder.load(ckpt.embedder)
    transform = emb.image_transform()
    text_of = {}
    for noun, toks in zip(bundle.nouns, bundle.noun_tokens):
        text_of.setdefault(tuple(toks), noun)
    trie = TokenTrie(bundle.noun_tokens)

    def run(paths, guided=True, width=10, topk=5):
        pixels = []
        for p in paths:
            with Image.open(p) as im:
                pixels.append(transform(im))
        embeds = emb.encode_image(torch.stack(pixels))
        hyps = beam_search(model, embeds, width=width, trie=trie if guided else None)
        return [[(text_of[h.tokens] if guided else bundle.token_table.decode(h.tokens), h.logprob)
                 for h in per[:topk]] for per in hyps]

    return run


def _cli(*args, input=None, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)


def _jsonl(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def _photo_paths(photo_dir):
    return sorted(str(p) for p in photo_dir.iterdir())


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "free"])
def test_novic_run_matches_open_clip_and_oracle(runtime_bundle, photo_dir, oracle, guided):
    out = _cli("--bundle", runtime_bundle.bundle, "--json", "--topk", 5, "--guided" if guided else "--free",
               photo_dir)
    assert out.exit_code == 0, out.output
    rows = _jsonl(out.stdout)
    paths = _photo_paths(photo_dir)
    assert [r["source"] for r in rows] == paths
    want = oracle(paths, guided=guided)
    for row, expected in zip(rows, want):
        assert row["error"] is None
        assert [l["text"] for l in row["labels"]] == [t for t, _ in expected], row["source"]
        np.testing.assert_allclose([l["logprob"] for l in row["labels"]], [s for _, s in expected],
                                   rtol=1e-4, atol=1e-4)
        for l in row["labels"]:
            assert l["prob"] == pytest.approx(np.exp(l["logprob"]), rel=1e-6)
    if guided:
        assert all(l["text"] in runtime_bundle.nouns for r in rows for l in r["labels"])
    assert len({r["labels"][0]["text"] for r in rows}) >= 2  # the labels depend on the image


def test_greedy_and_user_vocab_match_oracle(classifier, photo_dir, oracle):
    paths = _photo_paths(photo_dir)
    greedy = classifier.classify(paths, topk=1, beam_width=1)
    assert [[(l.text) for l in r.labels] for r in greedy] == [[t for t, _ in o] for o in oracle(paths, width=1, topk=1)]


def test_user_vocab_list_file_and_skipped_nouns(classifier, photo_dir, tmp_path, caplog):
    nouns = ["cat", "tabby cat", "coffee cup", "rocket", "zzqqxxjj", "astronaut"]
    with caplog.at_level("WARNING", logger="novic"):
        vocab = classifier.vocabulary(nouns)
        assert classifier.vocabulary(list(nouns)) is vocab            # cached: built and reported once
    assert [n for n, _ in vocab.skipped] == ["zzqqxxjj"]
    assert "not in the decoder's vocabulary" in vocab.skipped[0][1]
    assert sum("cannot be produced" in r.message for r in caplog.records) == 1
    results = classifier.classify(_photo_paths(photo_dir), vocab=nouns, topk=3)
    assert all(l.text in nouns[:4] + ["astronaut"] for r in results for l in r.labels)
    # a file, one noun per line, comments and blanks ignored; same answers as the list
    f = tmp_path / "nouns.txt"
    f.write_text("# my nouns\n" + "\n".join(nouns) + "\n\n")
    assert [r.labels for r in classifier.classify(_photo_paths(photo_dir), vocab=f, topk=3)] == \
        [r.labels for r in results]
    # nouns not in the checkpoint vocabulary but made of known tokens are tokenised by the bundle's BPE
    extra = classifier.vocabulary(["hot cat", "dog"])
    assert extra.nouns == ["hot cat", "dog"] and not extra.skipped
    with pytest.raises(ClassifierError, match="none of the nouns"):
        classifier.vocabulary(["zzqqxxjj"])
    with pytest.raises(ClassifierError, match="not found"):
        classifier.vocabulary(tmp_path / "missing.txt")


def test_check_options_answers_without_an_image(classifier):
    """What a service checks per request before it reads the image: the normalised options, or one
    ClassifierError line (also exported as novic.ClassifierError)."""
    import novic

    topk, width, temp, alpha, vocab = classifier.check_options(topk=3, vocab=["cat", "dog"], beam_width=4)
    assert (topk, width, temp, alpha) == (3, 4, 1.0, 0.0) and vocab.nouns == ["cat", "dog"]
    assert classifier.check_options(guided=False)[4] is None                 # free decoding: no vocabulary
    for kwargs, match in (({"topk": 11}, "topk 11 exceeds beam_width 10"),
                          ({"temperature": 0}, "temperature must be a positive number"),
                          ({"guided": False, "beam_width": 50}, "novic-export onnx --topk 50"),
                          ({"guided": False, "vocab": ["cat"]}, "vocab= restricts guided decoding")):
        with pytest.raises(novic.ClassifierError, match=match):
            classifier.check_options(**kwargs)


def test_cli_vocab_file(runtime_bundle, photo_dir, tmp_path):
    f = tmp_path / "nouns.txt"
    f.write_text("cat\nrocket\nzzqqxxjj\n")
    out = _cli("--bundle", runtime_bundle.bundle, "--json", "--topk", 2, "--vocab", f, photo_dir)
    assert out.exit_code == 0, out.output
    assert "zzqqxxjj" in out.stderr and "skipped" in out.stderr
    assert {l["text"] for r in _jsonl(out.stdout) for l in r["labels"]} <= {"cat", "rocket"}


def test_thread_safety_n_threads_equal_serial(classifier, photo_dir):
    paths = _photo_paths(photo_dir)
    calls = [dict(images=paths[i:] + paths[:i], topk=3, batch_size=1 + i % 3, guided=i % 2 == 0)
             for i in range(8)]
    serial = [classifier.classify(**c) for c in calls]
    threaded: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def work(i):
        barrier.wait()
        threaded[i] = classifier.classify(**calls[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert threaded == serial


def test_python_api_inputs_and_results(classifier, photo_dir):
    path = _photo_paths(photo_dir)[0]
    data = Path(path).read_bytes()
    with Image.open(path) as im:
        pil = im.copy()
    array = np.asarray(pil.convert("RGB"))
    results = classifier.classify([path, data, pil, array, open(path, "rb")], topk=2)
    assert all(isinstance(r, Result) and r.ok and len(r.labels) == 2 for r in results)
    assert all(isinstance(l, Label) for r in results for l in r.labels)
    first = [l.text for l in results[0].labels]
    assert all([l.text for l in r.labels] == first for r in results)  # same pixels, same answer
    assert results[1].source.startswith("<bytes") and results[2].source.startswith("<PIL")
    one = classifier.classify(path, topk=2)
    assert len(one) == 1 and one[0].labels == results[0].labels
    assert classifier.classify([]) == []
    assert json.loads(json.dumps(results[0].to_dict()))["labels"][0]["text"] == first[0]
    for kwargs, match in [(dict(topk=0), "topk"), (dict(topk=11), "beam_width"),
                          (dict(temperature=0), "temperature"), (dict(batch_size=0), "batch_size"),
                          (dict(guided=False, vocab=["cat"]), "vocab"),
                          (dict(guided=False, beam_width=50, topk=1), "top-k"),
                          (dict(guided="no"), "guided must be True or False"),
                          (dict(vocab=["cat", None]), r"vocab must hold nouns as strings; got None")]:
        with pytest.raises(ClassifierError, match=match):
            classifier.classify([path], **kwargs)


def test_load_reports_backend_and_reason(runtime_bundle, capsys):
    clf = Classifier.load(runtime_bundle.bundle, backend="auto", verbose=True)
    assert clf.backend == "ort-cpu" and "onnxruntime" in clf.backend_reason
    assert "backend ort-cpu" in capsys.readouterr().err
    assert clf.load_seconds is not None and clf.load_seconds < 30
    clf.close()
    from novic.runtime.backends.select import BackendError
    with pytest.raises(BackendError):
        Classifier.load(runtime_bundle.bundle, backend="trt")
    with pytest.raises(BackendError, match="unknown backend"):
        Classifier.load(runtime_bundle.bundle, backend="tpu")
    with pytest.raises(ClassifierError, match="bundle must be a directory path or a Bundle, got NoneType"):
        Classifier.load(None)
    with Classifier.load(runtime_bundle.bundle, backend="ort-cpu", precision="FP32") as clf:   # any case
        assert clf.precision == "fp32"


def test_cli_table_stdin_and_exit_codes(runtime_bundle, photo_dir, tmp_path):
    paths = _photo_paths(photo_dir)
    out = _cli("--bundle", runtime_bundle.bundle, "--topk", 2, paths[0], paths[1])
    assert out.exit_code == 0, out.output
    assert Path(paths[0]).name[:10] in out.stdout and "prob" in out.stdout  # a table
    assert "backend ort-cpu" in out.stderr and "startup" in out.stderr
    # stdin
    out = _cli("--bundle", runtime_bundle.bundle, "--json", "-q", "-", input=Path(paths[0]).read_bytes())
    assert out.exit_code == 0 and _jsonl(out.stdout)[0]["source"] == "<stdin>"
    # globs; a bad file among good ones: exit 1, one error line, the others still answered
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = _cli("--bundle", runtime_bundle.bundle, "--json", "-q", str(photo_dir / "*.jpg"), bad)
    assert out.exit_code == 1
    rows = _jsonl(out.stdout)
    assert [r["error"] is None for r in rows] == [True] * (len(rows) - 1) + [False]
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [f"error: {rows[-1]['error']}"]
    # nothing matched / nothing given / bad arguments / a missing bundle
    out = _cli("--bundle", runtime_bundle.bundle, str(tmp_path / "*.nothing"))
    assert out.exit_code == 1 and "no files match" in out.stderr
    assert _cli("--bundle", runtime_bundle.bundle).exit_code == 2
    out = _cli("--bundle", runtime_bundle.bundle, "--topk", 20, paths[0])
    assert out.exit_code == 2 and "--beam-width" in out.stderr
    out = _cli("--bundle", runtime_bundle.bundle, "--free", "--beam-width", 50, paths[0])
    assert out.exit_code == 2 and "beam width 50 needs decoder graphs with top-k >= 50" in out.stderr and "--topk 50" in out.stderr
    out = _cli("--bundle", tmp_path / "no_bundle", paths[0])
    assert out.exit_code != 0


def test_startup_is_small(runtime_bundle, tmp_path):
    """Import + bundle load of novic-run in a fresh process (reported in the issue)."""
    import subprocess
    import sys

    code = ("import time; t = time.perf_counter(); from novic.runtime.classifier import Classifier; "
            "t1 = time.perf_counter(); c = Classifier.load(%r, backend='ort-cpu'); "
            "t2 = time.perf_counter(); import sys; "
            "print(round(t1 - t, 3), round(t2 - t1, 3), 'torch' in sys.modules)") % str(runtime_bundle.bundle)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imp, load, torch_loaded = out.stdout.split()
    assert torch_loaded == "False"
    assert float(imp) + float(load) < 10, out.stdout  # generous for a shared 2-core CI box


def test_cli_prints_any_file_name_as_it_is(runtime_bundle, photo_dir, tmp_path):
    """Names with [brackets] (rich markup syntax) and with bytes that are not UTF-8 are printed, in
    the table, error lines and JSON, as valid text; stdin is read once and an empty stdin says so."""
    src = Path(_photo_paths(photo_dir)[0]).read_bytes()
    (tmp_path / "raw[/x]").mkdir(parents=True)   # "raw[" holding "x]"
    for name in ("photo [edited].jpg", "raw[/x]/a.jpg", "esc\x1b[2Jx.jpg"):   # the last: a terminal escape
        (tmp_path / name).write_bytes(src)
    (tmp_path / "broken [y].jpg").write_text("not an image")
    os.makedirs(os.fsencode(tmp_path / "uni"))
    with open(os.fsencode(tmp_path / "uni") + b"/caf\xe9.jpg", "wb") as f:
        f.write(src)
    out = _cli("--bundle", runtime_bundle.bundle, "-q", "-k", 1, "-r", tmp_path)
    assert out.exit_code == 1, out.output                      # the broken file, and only it
    assert "photo [edited].jpg" in out.stdout and "raw[/x]/a.jpg" in out.stdout
    assert "uni/caf\\xe9.jpg" in out.stdout
    assert "esc\\x1b[2Jx.jpg" in out.stdout and "\x1b" not in out.stdout
    assert [line.split(": ")[0] for line in out.stderr.splitlines()] == ["error", ] and \
        f"{tmp_path}/broken [y].jpg: not an image file" in out.stderr
    out = _cli("--bundle", runtime_bundle.bundle, "-q", "--json", "-r", tmp_path)
    rows = [json.loads(line) for line in out.stdout_bytes.decode("utf-8").splitlines()]   # strict UTF-8
    assert sorted(Path(r["source"]).name for r in rows) == ["a.jpg", "broken [y].jpg", "caf\\xe9.jpg",
                                                             "esc\\x1b[2Jx.jpg", "photo [edited].jpg"]
    vocab = tmp_path / "nouns [1].txt"
    vocab.write_text("cat\n[/x] dog\n")
    out = _cli("--bundle", runtime_bundle.bundle, "-q", "--vocab", vocab, tmp_path / "photo [edited].jpg")
    assert out.exit_code == 0 and "'[/x] dog'" in out.stderr and out.stderr.count("cannot be produced") == 1
    out = _cli("--bundle", runtime_bundle.bundle, "-q", "--vocab", tmp_path, tmp_path / "photo [edited].jpg")
    assert out.exit_code == 2 and "is a directory; pass a text file" in out.stderr   # a bad argument
    out = _cli("--bundle", runtime_bundle.bundle, "-q", "--json", "-", "-", input=b"")
    assert out.exit_code == 1 and len(out.stdout.splitlines()) == 1
    assert out.stderr.strip() == "error: <stdin>: empty data (0 bytes); pass the encoded image file contents"


def test_cli_max_pixels(runtime_bundle, photo_dir, monkeypatch):
    """A decompression-bomb refusal names the CLI's own way out, which works."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)   # restored after the test
    path = _photo_paths(photo_dir)[0]                                        # 512 x 512 = 262k pixels
    out = _cli("--bundle", runtime_bundle.bundle, "-q", "--max-pixels", 100_000, path)
    assert out.exit_code == 1 and "image too large" in out.stderr and "novic-run --max-pixels N" in out.stderr
    out = _cli("--bundle", runtime_bundle.bundle, "-q", "--max-pixels", 200_000, path)
    assert out.exit_code == 0, out.output


def test_cli_fast_decode(runtime_bundle, photo_dir, tmp_path, monkeypatch):
    """--fast-decode asks libjpeg for a reduced scale of >= 2x the model's input size (and only then)."""
    from PIL import JpegImagePlugin

    from novic.runtime.bundle import Bundle

    calls = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: (calls.append(size), draft(self, mode, size))[1])
    with Image.open(_photo_paths(photo_dir)[0]) as im:
        big = tmp_path / "big.jpg"
        im.convert("RGB").resize((1600, 1200)).save(big, quality=92)
    plain = _cli("--bundle", runtime_bundle.bundle, "-q", "--json", big)
    assert plain.exit_code == 0 and calls == [], plain.output
    fast = _cli("--bundle", runtime_bundle.bundle, "-q", "--json", "--fast-decode", big)
    assert fast.exit_code == 0, fast.output
    side = 2 * max(Bundle.open(runtime_bundle.bundle).preprocess["size"])
    assert calls == [(side, side)]
    assert len(_jsonl(fast.stdout)[0]["labels"]) == 5
