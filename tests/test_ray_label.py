"""novic-label on Ray Data: labels equal serial Classifier.classify; error rows for bad images; a job
killed midway (one of its workers, then its driver) is completed by a rerun without duplicates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_ray import ray_cluster, worker_pids  # noqa: F401  (fixtures)
from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)

pytestmark = pytest.mark.ray
pytest.importorskip("ray.data")

from novic.serve import ray_label  # noqa: E402
from novic.serve.ray_label import LabelError, expand, label, open_output, read_output  # noqa: E402

GOOD = 1000
BAD = {"bad/garbage.jpg": b"this is not an image", "bad/empty.png": b"",
       "bad/truncated.png": None}   # None: a PNG cut in half (made below)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """GOOD tiny random images in a directory tree, plus the BAD ones."""
    root = tmp_path_factory.mktemp("label_images")
    rng = np.random.default_rng(7)
    for i in range(GOOD):
        folder = root / f"d{i % 7}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((10 + i % 5, 12, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    (root / "bad").mkdir()
    whole = (root / "d0" / "0000.png").read_bytes()
    for name, data in BAD.items():
        (root / name).write_bytes(whole[: len(whole) // 2] if data is None else data)
    return root


def expect_serial(classifier, rows):  # noqa: F811
    """Rows equal serial Classifier.classify over the same files: labels exactly, scores to float32."""
    serial = {r.source: r for r in classifier.classify(sorted(r["path"] for r in rows), batch_size=32)}
    for row in rows:
        want = serial[row["path"]]
        assert (row["error"] is None) == want.ok, row["path"]
        assert row["labels"] == [l.text for l in want.labels], row["path"]
        np.testing.assert_allclose(row["probs"], [l.prob for l in want.labels], rtol=1e-5, atol=0)
        np.testing.assert_allclose(row["logprobs"], [l.logprob for l in want.labels], rtol=1e-5, atol=1e-6)


def test_killed_worker_then_killed_driver_then_rerun_completes_without_duplicates(
        ray_cluster, runtime_bundle, classifier, images, tmp_path):  # noqa: F811
    out = tmp_path / "labels"
    # The driver, in its own process, joins this cluster; it reads its rows slowly (on_row sleeps)
    # so that it is surely midway when killed.
    driver = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from novic.serve.ray_label import label\n"
        f"label([{str(images)!r}], {str(out)!r}, bundle={str(runtime_bundle.bundle)!r}, batch_size=16,\n"
        f"      concurrency=2, address={ray_cluster!r}, part_rows=50, on_row=lambda row: time.sleep(0.01))\n")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Kill a worker as soon as one is up: on an idle machine the actor pool can finish all its
        # batches (and be torn down) before the slow driver has written 100 rows.
        deadline = time.monotonic() + 120
        while not (workers := worker_pids("MapWorker")):
            assert driver.poll() is None, f"driver exited early: {driver.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no Ray Data worker came up in 120 s"
            time.sleep(0.05)
        os.kill(workers[0], signal.SIGKILL)                    # a worker dies mid-job ...
        rows_now = wait_for_rows(out, 1, driver)
        wait_for_rows(out, max(rows_now + 200, 300), driver)   # ... and the job goes on without it
        driver.send_signal(signal.SIGKILL)                     # then the driver dies
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    partial = read_output(out)
    assert 300 <= len(partial) < GOOD + len(BAD), "the driver was not killed midway"
    assert len({r["path"] for r in partial}) == len(partial)

    summary = label([str(images)], out, bundle=runtime_bundle.bundle, batch_size=16, concurrency=2)
    rows = read_output(out)
    assert summary.already_done == len(partial) and summary.labelled == GOOD + len(BAD) - len(partial)
    assert len(rows) == GOOD + len(BAD) and len({r["path"] for r in rows}) == len(rows)   # complete, no duplicates
    errors = {Path(r["path"]).relative_to(images).as_posix(): r["error"] for r in rows if r["error"]}
    assert sorted(errors) == sorted(BAD)
    assert "not an image file" in errors["bad/garbage.jpg"] and "empty file" in errors["bad/empty.png"]
    assert all(r["labels"] == [] for r in rows if r["error"])
    expect_serial(classifier, rows)
    assert not list(out.glob(".part-*"))                       # the killed driver's temp part is gone


def wait_for_rows(out: Path, count: int, driver, timeout: float = 120.0) -> int:
    """Wait until OUT's parts hold >= count rows (the driver still running); -> the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"driver exited early: {driver.stderr.read().decode()[-2000:]}"
        have = len(read_output(out)) if out.is_dir() else 0
        if have >= count:
            return have
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} rows in {out} after {timeout} s")


def run_cli(args, capsys, monkeypatch) -> tuple[int, str]:
    """novic-label ARGS as a console script runs it (errors as one line) -> (exit code, stderr)."""
    from novic.cli.label import main

    monkeypatch.setattr(sys, "argv", ["novic-label", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_cli_parquet_and_one_line_errors(ray_cluster, runtime_bundle, classifier, images, tmp_path,  # noqa: F811
                                         capsys, monkeypatch):
    listed = tmp_path / "some.txt"    # a list file: paths relative to it, comments skipped
    some = sorted((images / "d3").glob("*.png"))[:5]
    listed.write_text("# five\n" + "\n".join(os.path.relpath(p, tmp_path) for p in some) + "\n")
    out = tmp_path / "pq"
    common = [listed, images / "bad", "--out", out, "--bundle", runtime_bundle.bundle]
    code, said = run_cli(common + ["--format", "parquet", "--topk", "3"], capsys, monkeypatch)
    assert code == 0 and "8 labelled (3 error rows)" in said, said
    rows = read_output(out)
    assert [p.suffix for p in out.iterdir()] == [".parquet"]
    assert all(r["granularity"] == "fine" and r["fine"] is None and r["paths"] is None for r in rows)
    assert sorted(r["path"] for r in rows) == sorted([str(p) for p in some] + [str(images / b) for b in BAD])
    serial = classifier.classify([str(p) for p in some], topk=3)
    assert {r["path"]: r["labels"] for r in rows if not r["error"]} == {r.source: [l.text for l in r.labels]
                                                                       for r in serial}

    code, said = run_cli(common + ["--format", "parquet"], capsys, monkeypatch)    # nothing left to do
    assert code == 0 and "0 labelled" in said and "8 already in" in said, said
    for args, message, exit_code in [(["--format", "jsonl"], "holds parquet parts", 1),
                                     (["--topk", "11"], "--topk 11 exceeds --beam-width 10", 2)]:   # usage error
        code, said = run_cli(common + args, capsys, monkeypatch)
        assert code == exit_code and message in said and "Traceback" not in said, said
        assert len(said.strip().splitlines()) == 1, said
    code, said = run_cli(common + ["--format", "csv"], capsys, monkeypatch)   # a usage error, as in every CLI
    assert code == 2 and "'csv'" in said and "Traceback" not in said, said


def test_cli_granularity(ray_cluster, runtime_bundle, classifier, images, tmp_path, capsys,  # noqa: F811
                         monkeypatch):
    """--granularity / --roll-up: rows equal Classifier.classify at that level (with each label's fine
    label and path); one OUT holds one level; a bad value is a usage error in one line."""
    if not classifier.bundle.has_hierarchy:
        pytest.skip("the test bundle has no noun hierarchy (wordnet-base not installed)")
    some = sorted((images / "d4").glob("*.png"))[:6]
    targets = tmp_path / "kingdoms.txt"
    targets.write_text("animal\nplant\nperson\nartifact\n")
    for fmt, args, level in [("parquet", ["--granularity", "coarse"], "coarse"),
                             ("jsonl", ["--roll-up", targets], str(targets))]:
        out = tmp_path / fmt
        code, said = run_cli([*some, "--out", out, "--bundle", runtime_bundle.bundle, "--format", fmt, "--topk", "3",
                              *args], capsys, monkeypatch)
        assert code == 0 and "6 labelled (0 error rows)" in said, said
        rows = {r["path"]: r for r in read_output(out)}
        serial = classifier.classify([str(p) for p in some], topk=3, granularity=level)
        assert len(rows) == len(serial) == 6
        for want in serial:
            row = rows[want.source]
            assert row["granularity"] == level and row["error"] is None
            assert row["labels"] == [l.text for l in want.labels]
            assert row["fine"] == [l.fine for l in want.labels] and row["paths"] == [list(l.path) for l in want.labels]
            np.testing.assert_allclose(row["probs"], [l.prob for l in want.labels], rtol=1e-5)
        assert any(t != f for r in rows.values() for t, f in zip(r["labels"], r["fine"]))   # something rolled up
    # one OUT, one level: a rerun asking for another is refused before any work
    code, said = run_cli([*some, "--out", tmp_path / "parquet", "--bundle", runtime_bundle.bundle, "--format",
                          "parquet", "--granularity", "basic"], capsys, monkeypatch)
    assert code == 1 and "holds labels at granularity 'coarse'" in said and len(said.strip().splitlines()) == 1, said
    for args, message in [(["--granularity", "medium"], "--granularity 'medium': use fine, basic or coarse"),
                          (["--granularity", "basic", "--roll-up", targets], "--roll-up replaces --granularity")]:
        code, said = run_cli([*some, "--out", tmp_path / "x", "--bundle", runtime_bundle.bundle, *args],
                             capsys, monkeypatch)
        assert code == 2 and message in said and len(said.strip().splitlines()) == 1, said
    assert not (tmp_path / "x").exists()   # refused before anything was written


def test_inputs_and_output_directory(images, tmp_path):
    listed = tmp_path / "list.lst"
    listed.write_text(f"{images / 'd1' / 'deep' / '0001.png'}\ns3://bucket/x.jpg\n\nd1/gone.png\n")
    paths, problems = expand([str(images / "d1"), str(images / "d1" / "*.png"), str(listed), "nothing/*.png"])
    tree = sorted(str(p) for p in (images / "d1").rglob("*.png"))
    # d1's tree (globbed and listed again), a URI, and a missing file (kept: it gets an error row)
    assert paths == tree + ["s3://bucket/x.jpg", str(tmp_path / "d1" / "gone.png")]
    assert problems == ["nothing/*.png: no files match this pattern"]

    out = tmp_path / "out"
    out.mkdir()
    (out / "part-a-000000.jsonl").write_text(json.dumps({"path": "/x.png"}) + "\n")
    (out / ".part-a-000001.jsonl.1234.tmp").write_text('{"path": "/half')   # a killed driver's leftover
    assert open_output(out, "jsonl") == (out, {"/x.png"})   # a part from before the granularity column: fine
    with pytest.raises(LabelError, match="holds labels at granularity 'fine'"):
        open_output(out, "jsonl", "basic")
    assert not list(out.glob(".part-*"))
    with pytest.raises(LabelError, match="holds jsonl parts"):
        open_output(out, "parquet")
    with pytest.raises(LabelError, match="not a directory"):
        open_output(listed, "jsonl")


def test_an_unreadable_uri_is_an_error_row():
    source = ray_label._open_source("file:///no/such/image.jpg")
    assert source.name == "file:///no/such/image.jpg" and "cannot read" in source.read_error


def test_max_pixels_is_the_decode_tasks_bomb_limit(images, runtime_bundle):  # noqa: F811
    from novic.runtime.bundle import Bundle

    config = Bundle.open(runtime_bundle.bundle).preprocess_config
    batch = {"path": np.array([str(images / "d0" / "0000.png"), str(images / "d1" / "deep" / "0001.png")])}
    default = Image.MAX_IMAGE_PIXELS
    assert list(ray_label.decode_batch(batch, config, False)["error"]) == ["", ""]
    tight = ray_label.decode_batch(batch, config, False, max_pixels=10)   # 10x12 pixels > twice 10: refused
    assert all(e.startswith(p) and "image too large" in e for e, p in zip(tight["error"], batch["path"]))
    assert Image.MAX_IMAGE_PIXELS == default   # set for the batch only: the worker runs other tasks


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from novic.serve._ray import RayMissing

    monkeypatch.setitem(sys.modules, "ray.data", None)    # as if ray[data] were not installed
    with pytest.raises(RayMissing, match=r"ray.data is not installed .*pip install 'novic\[ray\]'"):
        label([str(tmp_path)], tmp_path / "out", bundle=tmp_path)
