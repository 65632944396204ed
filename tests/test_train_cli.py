"""novic-train CLI: config output, overrides, noun builder, clear one-line errors, a tiny run."""
import json

import pytest
from typer.testing import CliRunner

from novic.cli.train import main
from novic.train.config import TrainConfig, load_config

runner = CliRunner()


def test_default_config_roundtrips_and_overrides(tmp_path):
    res = runner.invoke(main, ["config"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["optim"]["lr"] == 1.5e-3 and data["noise"]["noise_norm"] == 3.25
    (tmp_path / "c.json").write_text(res.stdout)
    cfg = load_config(tmp_path / "c.json", ["optim.lr=0.01", "captions.user_captions=null",
                                            "model.layers=2", "progress=false"])
    assert cfg.optim.lr == 0.01 and cfg.model.layers == 2 and cfg.progress is False
    assert cfg == TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    (tmp_path / "c.toml").write_text('seed = 3\n[optim]\nlr = 0.002\n')
    assert load_config(tmp_path / "c.toml").optim.lr == 0.002


@pytest.mark.parametrize("args,match", [
    (["train", "missing.json"], "does not exist"),
    (["train", "-o", "optim.learning_rate=1"], "unknown config key(s) optim.learning_rate"),
    (["train", "-o", "noise.rotate_prob=2"], "rotate_prob"),
    (["train", "-o", "optim"], "section.key=value"),
    (["cache", "-o", "embedder.type=word2vec"], "embedder.type"),
])
def test_bad_config_is_one_line(args, match):
    res = runner.invoke(main, args)
    assert res.exit_code == 1
    out = res.stderr if hasattr(res, "stderr") else res.output
    lines = [l for l in out.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], out


def test_nouns_command(tmp_path):
    from novic.train.nouns import WORDNET_DIR, load_nouns
    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip("wordnet-base not installed")
    res = runner.invoke(main, ["nouns", str(tmp_path / "n.json"), "--min-zipf", "4.5"])
    assert res.exit_code == 0, res.output
    nouns = load_nouns(tmp_path / "n.json")
    assert 50 < len(nouns) < 2000 and all(n.plural for n in nouns)


def test_tiny_open_clip_training_end_to_end(tmp_path):
    """The real path: tiny random open_clip model, its own CLIP BPE tokenizer, cache, train."""
    (tmp_path / "nouns.txt").write_text("dog\ncat\napple\nred velvet cake\nbrazil nut tree\n")
    args = ["train", "-o", f"out_dir={tmp_path / 'run'}", "-o", f"data.cache_root={tmp_path / 'c'}",
            "-o", f"data.nouns={tmp_path / 'nouns.txt'}", "-o", "captions.variants_per_noun=6",
            "-o", "model.width=32", "-o", "model.layers=1", "-o", "model.heads=2",
            "-o", "model.ffn_width=16", "-o", "optim.batch_size=16", "-o", "optim.steps=4",
            "-o", "data.eval_samples=10", "-o", "progress=false"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "eval/train_noised/exact_match" in res.stdout
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "latest.json").is_file()
    from novic.model.checkpoint import load_checkpoint
    ckpt = load_checkpoint(run / json.loads((run / "latest.json").read_text())["checkpoint"])
    assert ckpt.embedder.model == "novic-tiny-clip" and ckpt.config.embed_dim > 0
    assert ckpt.token_table.decode(ckpt.noun_tokens[3][:-1]) == "red velvet cake"
    # --resume of a finished run does no further training steps.
    res = runner.invoke(main, args + ["--resume"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4]  # log_every 10: only the last step
    assert [r["step"] for r in rows if "loss" not in r] == [4, 4]  # final eval of each invocation
