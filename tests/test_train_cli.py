"""novic-train CLI: config output, overrides, noun builder, clear one-line errors, a tiny run."""
import json

import pytest
from typer.testing import CliRunner

from novic.cli.train import app as main
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
    assert_one_line_error(runner.invoke(main, args), match)


def assert_one_line_error(res, match):
    assert res.exit_code == 1, res.output
    out = res.stderr if hasattr(res, "stderr") else res.output
    lines = [l for l in out.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], out


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the command gets as far as loading the embedder (the first real work)."""
    import novic.train.data

    def refuse(*args, **kwargs):
        raise AssertionError("bad input was not caught before the work started")
    monkeypatch.setattr(novic.train.data, "load_embedder", refuse)


@pytest.mark.parametrize("override,match", [
    ("model.width=abc", 'config model.width: expected an integer, got "abc"'),
    ("seed=1.5", "config seed: expected an integer, got 1.5"),
    ("seed=-1", "config seed: expected an integer >= 0, got -1"),
    ("optim.lr=fast", 'config optim.lr: expected a number, got "fast"'),
    ("optim.lr=NaN", "config optim.lr: expected a number, got NaN"),
    ("optim.lr=" + "9" * 400, "config optim.lr: expected a number, got 999"),
    ("out_dir=2024", """config out_dir: expected a string (quote it as JSON text: -o 'out_dir="2024"'), got 2024"""),
    ("optim.lr=0", "config optim.lr: expected a number > 0, got 0"),
    ("bf16=maybe", 'config bf16: expected true or false, got "maybe"'),
    ("out_dir=null", "config out_dir: expected a string, got null"),
    ("model.heads=3", "config model.width: expected a multiple of model.heads (3), got 512"),
    ("model.dropout=1", "config model.dropout: expected a number in [0, 1)"),
    ("optim.batch_size=0", "config optim.batch_size: expected an integer >= 1, got 0"),
    ("optim.epochs=0", "config optim.epochs: expected a number > 0, got 0"),
    ("optim.steps=0", "config optim.steps: expected an integer >= 1, or null"),
    ("optim.steps=-1", "config optim.steps: expected an integer >= 1, or null"),
    ("log_every=0", "config log_every: expected an integer >= 1, got 0"),
    ("eval_every=-5", "config eval_every: expected an integer >= 0"),
    ("keep_checkpoints=0", "config keep_checkpoints: expected an integer >= 1, got 0"),
    ("device=tpu", 'config device: expected auto, cpu, cuda or cuda:N, got "tpu"'),
    ("data.wordnet_max_nouns=0", "config data.wordnet_max_nouns: expected an integer >= 1, or null"),
    ("data.eval_samples=-1", "config data.eval_samples: expected an integer >= 1, got -1"),
    ("embedder.batch_size=0", "config embedder.batch_size: expected an integer >= 1, got 0"),
    ("captions.seed=-2", "captions.seed must be >= 0, got -2"),
])
@pytest.mark.parametrize("command", ["train", "cache"])
def test_bad_config_values_are_refused_before_any_work(command, override, match, no_work, tmp_path):
    res = runner.invoke(main, [command, "-o", f"out_dir={tmp_path / 'run'}", "-o", override])
    assert_one_line_error(res, match)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,text,match", [
    ("list.json", "[1, 2, 3]", "list.json: expected an object of sections and keys at the top, got [1, 2, 3]"),
    ("c.yaml", "seed: 1\n", "c.yaml: cannot read .yaml; config files are .json or .toml"),
    ("c.toml", "seed = 1.5\n", "config seed: expected an integer, got 1.5"),
    ("c.json", '{"optim": {"lr": "1e-3"}}', 'config optim.lr: expected a number, got "1e-3"'),
])
def test_bad_config_files_are_one_line(tmp_path, no_work, name, text, match):
    (tmp_path / name).write_text(text)
    res = runner.invoke(main, ["train", str(tmp_path / name), "-o", "progress=false"])
    assert_one_line_error(res, match)


def test_config_command_writes_json_only(tmp_path):
    res = runner.invoke(main, ["config", str(tmp_path / "out.toml")])
    assert_one_line_error(res, "out.toml: the config is written as JSON; name the file .json")
    assert not (tmp_path / "out.toml").exists()
    res = runner.invoke(main, ["config", str(tmp_path / "sub" / "out.json")])
    assert res.exit_code == 0, res.output
    assert load_config(tmp_path / "sub" / "out.json") == TrainConfig()


@pytest.mark.parametrize("command", ["train", "cache"])
@pytest.mark.parametrize("overrides,match", [
    ([], "config embedder.model: choose the model whose embeddings the decoder learns to name"),
    (["embedder.model=novic-tiny-clip"],
     "config embedder.pretrained: novic-tiny-clip has no weights here, so its embeddings would be random"),
    (["embedder.model=ViT-B-16-SigLIP"], "or -o embedder.random_weights=true for a test run"),
])
def test_the_embedder_must_be_chosen_and_not_random_unless_a_test(command, overrides, match, tmp_path, no_work):
    """The default config names no embedder: a run that only sets its data would otherwise train
    on a random CLIP's embeddings."""
    args = [command, "-o", f"out_dir={tmp_path / 'run'}"]
    for item in overrides:
        args += ["-o", item]
    assert_one_line_error(runner.invoke(main, args), match)
    assert not (tmp_path / "run").exists()


def test_embedder_check_accepts_a_chosen_model():
    from novic.train.config import EmbedderConfig
    tiny = EmbedderConfig(model="novic-tiny-clip", random_weights=True).checked()
    assert tiny.config_file == "novic-tiny-clip.json"   # the shipped config, found by name
    assert EmbedderConfig(model="ViT-B-16-SigLIP", pretrained="webli").checked().config_file is None
    assert EmbedderConfig(model="hf-hub:timm/ViT-B-16-SigLIP").checked().model.startswith("hf-hub:")
    st = EmbedderConfig(type="sentence_transformers", model="all-MiniLM-L6-v2")
    assert st.checked() == st


@pytest.mark.parametrize("left", ["latest.json", "metrics.jsonl", "checkpoint-00000004.safetensors"])
def test_train_refuses_an_out_dir_that_holds_a_run(tmp_path, no_work, left):
    run = tmp_path / "run"
    run.mkdir()
    (run / left).write_text("old\n")
    res = runner.invoke(main, ["train", "-o", f"out_dir={run}"])
    assert_one_line_error(res, f"{run} already holds a training run; pass --resume")
    assert sorted(p.name for p in run.iterdir()) == [left] and (run / left).read_text() == "old\n"


@pytest.mark.parametrize("value", ["0", "-3"])
def test_nouns_max_nouns_must_be_positive(tmp_path, value):
    res = runner.invoke(main, ["nouns", str(tmp_path / "n.json"), "--max-nouns", value])
    assert res.exit_code == 2 and "--max-nouns" in res.output
    assert not (tmp_path / "n.json").exists()


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
            "-o", "data.eval_samples=10", "-o", "progress=false",
            "-o", "embedder.model=novic-tiny-clip", "-o", "embedder.random_weights=true"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "eval/train_noised/exact_match" in res.stdout
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "latest.json").is_file()
    from novic.model.checkpoint import load_checkpoint
    ckpt = load_checkpoint(run / json.loads((run / "latest.json").read_text())["checkpoint"])
    assert ckpt.embedder.model == "novic-tiny-clip" and ckpt.config.embed_dim > 0
    assert ckpt.token_table.decode(ckpt.noun_tokens[3][:-1]) == "red velvet cake"
    # Without --resume the finished run is left alone; with it no further training steps are done.
    before = (run / "metrics.jsonl").read_text()
    assert_one_line_error(runner.invoke(main, args), "already holds a training run")
    assert (run / "metrics.jsonl").read_text() == before
    res = runner.invoke(main, args + ["--resume"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4]  # log_every 10: only the last step
    assert [r["step"] for r in rows if "loss" not in r] == [4, 4]  # final eval of each invocation


def test_unwritable_out_dir_fails_before_any_work(tmp_path, no_work):
    (tmp_path / "a_file").write_text("x")
    res = runner.invoke(main, ["train", "-o", f"out_dir={tmp_path / 'a_file' / 'run'}"])
    assert_one_line_error(res, f"{tmp_path / 'a_file'}: Not a directory; check the path and its permissions")


def test_console_script_turns_os_errors_into_one_line(tmp_path, monkeypatch, capsys):
    from novic.cli.train import main as console_script

    (tmp_path / "d.json").mkdir()
    monkeypatch.setattr("sys.argv", ["novic-train", "config", str(tmp_path / "d.json")])
    with pytest.raises(SystemExit) as info:
        console_script()
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'd.json'}: Is a directory; check the path and its permissions, or choose another location"]
