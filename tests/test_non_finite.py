"""A diverged training run (NaN/inf) is stopped, never saved, never imported or exported, and
the runtime never hands out a NaN score: one line at each door."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_importer import make_original  # noqa: E402
from test_train_trainer import make_trainer, small_config  # noqa: E402

from novic.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from novic.model.importer import CheckpointImportError, import_checkpoint  # noqa: E402
from novic.train.trainer import TrainingDiverged  # noqa: E402


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr 1e4 on the tiny run: finite for 3 steps, then NaN (measured); checkpoints every 3."""
    cfg = small_config(tmp_path, **{"optim.lr": 1e4, "optim.steps": 12, "ckpt_every": 3})
    trainer = make_trainer(cfg)
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit()
    message = str(exc.value)
    run = tmp_path / "run"
    latest = json.loads((run / "latest.json").read_text())
    assert "\n" not in message and message.startswith("training diverged at step ")
    assert f"the last good checkpoint is {run / latest['checkpoint']} (step {latest['step']})" in message
    assert "lower optim.lr" in message
    ckpt = load_checkpoint(run / latest["checkpoint"])   # loads: its weights are finite
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [latest["checkpoint"]]


def test_non_finite_weights_are_never_saved_or_loaded(tmp_path):
    path, _, _ = make_original(tmp_path, H=32, layers=1, heads=2, ffn=16)
    ckpt = import_checkpoint(path).checkpoint
    ckpt.state_dict["layers.0.linear1.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"layers\.0\.linear1\.weight holds 1 NaN/inf values"):
        save_checkpoint(tmp_path / "bad.safetensors", ckpt)
    assert not (tmp_path / "bad.safetensors").exists()
    # a file written by an older novic: refused at load, so novic-export refuses it too
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    ckpt.state_dict["layers.0.linear1.weight"][0, 0] = 0.0
    save_checkpoint(good, ckpt)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    tensors = {k: v.clone() for k, v in ckpt.state_dict.items()}
    tensors["norm.weight"][3] = float("inf")
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"norm\.weight holds 1 NaN/inf values"):
        load_checkpoint(tmp_path / "old.safetensors")


def test_export_refuses_a_non_finite_checkpoint(tmp_path, monkeypatch, capsys):
    """novic-export onnx reads the checkpoint through load_checkpoint: one line, nothing written."""
    from novic.cli import export

    path, _, _ = make_original(tmp_path, H=32, layers=1, heads=2, ffn=16)
    ckpt = import_checkpoint(path).checkpoint
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_checkpoint(tmp_path / "good.safetensors", ckpt)
    with safe_open(str(tmp_path / "good.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = dict(ckpt.state_dict)
    tensors["pos_embedding"] = torch.full_like(tensors["pos_embedding"], float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    monkeypatch.setattr("sys.argv", ["novic-export", "onnx", "--checkpoint", str(tmp_path / "nan.safetensors"),
                                     "--out", str(tmp_path / "bundle")])
    with pytest.raises(SystemExit) as exc:
        export.main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "pos_embedding holds" in err and "NaN/inf" in err and "Traceback" not in err
    assert err.count("error:") == 1
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_import_refuses_non_finite_weights_naming_the_tensor(tmp_path, value):
    def poison(raw):
        raw["model_state_dict"]["transformer.layers.0.linear2.weight"][1, 2] = value

    path, _, _ = make_original(tmp_path, H=32, layers=1, heads=2, ffn=16, mutate=poison)
    with pytest.raises(CheckpointImportError) as exc:
        import_checkpoint(path, tmp_path / "out.safetensors")
    assert str(exc.value) == (f"{path}: weight transformer.layers.0.linear2.weight holds 1 NaN/inf values "
                              f"(a diverged or damaged training run); import another checkpoint")
    assert not (tmp_path / "out.safetensors").exists()


def test_the_runtime_never_reports_a_nan_score(runtime_bundle):
    """A decoder that scores NaN (a bundle exported from a diverged run before export refused
    them): the image gets an error line, no label, and its JSON is valid."""
    pytest.importorskip("onnxruntime")
    from novic.runtime.classifier import Classifier

    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu", threads=1)
    real = clf.decoder

    class NanSession:
        config, topk = real.config, real.topk

        def prefill(self, *args):
            out = real.prefill(*args)
            out.topk_logprobs = np.full_like(out.topk_logprobs, np.nan)
            out.cand_logprobs = np.full_like(out.cand_logprobs, np.nan)
            return out

        def step(self, *args):
            return real.step(*args)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    try:
        assert clf.classify([image])[0].ok
        clf.decoder = NanSession()
        two_nouns = clf.vocabulary().nouns[:2]   # a small vocabulary: every beam ends on a dead candidate
        for options in ({"guided": True}, {"guided": False}, {"vocab": two_nouns, "beam_width": 10}):
            result = clf.classify([image], **options)[0]
            assert not result.ok and result.labels == []
            assert "the decoder returned non-finite scores" in result.error
            json.dumps(result.to_dict(), allow_nan=False)
    finally:
        clf.decoder = real
        clf.close()


from fixtures_runtime import runtime_bundle  # noqa: E402,F401  (fixture)
