"""novic.bench: the per-phase breakdown of one image (tiny bundle) and the bench setup's cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)


def test_phases_account_for_one_image(classifier):
    from novic.bench.measure import phases, sample_images

    image = sample_images(1)[0]
    session = classifier.decoder
    calls = []
    real_step = session.step

    def counting_step(*args, **kwargs):   # the session's own wrapper, which phases() must keep
        calls.append(1)
        return real_step(*args, **kwargs)

    session.step = counting_step
    try:
        pixels, _ = classifier.preprocessor.load_batch([image])
        classifier.decode(classifier.embed(pixels), classifier.vocabulary(None), 10, 1.0, 0.0)
        steps_per_image = len(calls)
        assert steps_per_image >= 1
        calls.clear()
        got = phases(classifier, image, reps=3, beam_width=10)
        assert len(calls) == 4 * steps_per_image          # warm-up + 3 rounds went through our wrapper
        assert session.step is counting_step and "prefill" not in vars(session)
    finally:
        del session.step
    assert got["steps"] == steps_per_image
    assert set(got) == {"preprocess_ms", "encoder_ms", "prefill_ms", "first_step_ms", "later_steps_ms",
                        "host_search_ms", "steps"}
    timed = [got[k] for k in ("preprocess_ms", "encoder_ms", "prefill_ms", "first_step_ms")]
    assert all(np.isfinite(timed)) and min(timed) > 0 and got["host_search_ms"] > 0
    assert (got["later_steps_ms"] > 0) == (steps_per_image > 1)


def test_bench_setup_exports_again_only_when_needed(tmp_path, monkeypatch, capsys):
    """A cached bench bundle is reused while the weights' config and the export code are the same;
    changed export code (or a missing bundle) exports the same checkpoint again; a changed config
    makes new weights. So a benchmark never times graphs the current code would not write."""
    import json

    import novic.export.bundle as bundle_mod
    from novic.bench import setup

    calls = []

    def fake_checkpoint(config, paths, seed):
        calls.append(("weights", config.vocab_size))
        for key in ("clip", "checkpoint"):
            paths[key].write_bytes(b"x")

    def fake_export(checkpoint, out, overwrite, console):
        calls.append(("export", str(checkpoint)))
        Path(out).mkdir(exist_ok=True)
        return {"seconds": 0.0, "timings": {}}

    monkeypatch.setattr(setup, "_random_checkpoint", fake_checkpoint)
    monkeypatch.setattr(bundle_mod, "export_bundle", fake_export)
    tiny = setup.CONFIGS["tiny"]
    ckpt = str(tmp_path / "decoder.safetensors")
    setup.build(tiny, tmp_path)
    assert calls == [("weights", 300), ("export", ckpt)]
    info = json.loads((tmp_path / "setup.json").read_text())
    assert info["export_code"] == setup.export_code_hash() and info["config"]["vocab_size"] == 300
    calls.clear()
    setup.build(tiny, tmp_path)
    assert calls == []                                              # cached
    del info["seed"]                                                # a setup.json from before seeds were kept
    (tmp_path / "setup.json").write_text(json.dumps(info))
    setup.build(tiny, tmp_path)
    assert calls == []                                              # seed 0, the only one used then
    monkeypatch.setattr(setup, "export_code_hash", lambda: "changed")
    setup.build(tiny, tmp_path)
    assert calls == [("export", ckpt)] and "export code or tools changed" in capsys.readouterr().err
    calls.clear()
    (tmp_path / "bundle").rmdir()
    setup.build(tiny, tmp_path)
    assert calls == [("export", ckpt)] and "no bundle" in capsys.readouterr().err
    calls.clear()
    setup.build(setup.BenchConfig(**{**tiny.__dict__, "vocab_size": 400}), tmp_path)
    assert calls == [("weights", 400), ("export", ckpt)]           # other sizes: new weights


def test_spread_and_outliers_are_reported():
    """A baseline p90 of 1284.8 ms against a median of 68.2 ms is flagged, not printed bare."""
    from novic.bench.compare import spread_warnings, table
    from novic.bench.timing import summarize

    steady = summarize([10.0, 10.5, 11.0, 10.2, 10.1, 10.4, 10.3, 10.6, 10.8, 10.9])
    assert steady["outliers"] == 0 and steady["max_ms"] == 11.0 and abs(steady["mad_ms"] - 0.3) < 1e-9
    noisy = summarize([68.2] * 8 + [1284.8, 1300.0])
    assert (noisy["p50_ms"], noisy["p90_ms"], noisy["outliers"]) == (68.2, 1300.0, 2)
    noisy = {**noisy, "p90_ms": 1284.8}

    def side(single, **extra):
        return {"single": single, "encoder": steady, "decoder": steady, "throughput": {},
                "peak_rss_mb": 100.0, "labels": ["cat"], "step_ms_by_position": [1.0, 1.0], **extra}

    result = {"ours": side(steady, backend="ort-cpu", precision="fp32"), "baseline": side(noisy, device="cpu"),
              "ratios": {"single": 1.0, "encoder": 1.0, "decoder": 1.0}}
    row = next(line for line in table(result).splitlines() if "p90" in line)
    assert "| 1284.8 ms (2/10) **outliers** | 11.0 ms (0/10) |" in row
    assert spread_warnings(result) == [
        "original-style single: p90 1284.8 ms is 18.8x the median 68.2 ms (2 of 10 runs took over 2x the "
        "median): the machine was disturbed during those runs; compare medians, or rerun on a quiet machine "
        "with more --reps"]
    old = {k: v for k, v in noisy.items() if k not in ("outliers", "max_ms", "mad_ms")}   # results saved before
    result["baseline"]["single"] = old
    assert "some runs were much slower" in spread_warnings(result)[0] and "1284.8 ms **outliers**" in table(result)
