"""examples/name_sentences.py, the quickstart's last step: a decoder trained in the all-MiniLM-L6-v2
text space names nouns of its own list for new sentences; a CLIP checkpoint is refused in one line."""
import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures_runtime import runtime_bundle  # noqa: F401  (fixture)
from test_train_st import MINILM, needs_minilm

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("name_sentences", ROOT / "examples" / "name_sentences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_clip_checkpoint_is_refused_in_one_line(runtime_bundle, capsys):
    assert load_example().main([str(runtime_bundle.checkpoint)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "novic-run" in err[0]


@needs_minilm
def test_sentences_are_named_with_nouns_of_the_list(tmp_path, capsys):
    from novic.cli.train import app

    nouns = ROOT / "examples" / "text_nouns.txt"
    args = ["train", "-o", "embedder.type=sentence_transformers", "-o", f"embedder.model={MINILM}",
            "-o", f"data.nouns={nouns}", "-o", "captions.variants_per_noun=2", "-o", "captions.multi_ratio=0",
            "-o", "model.width=32", "-o", "model.layers=1", "-o", "model.heads=2", "-o", "model.ffn_width=16",
            "-o", "optim.batch_size=16", "-o", "optim.steps=3", "-o", "data.eval_samples=10",
            "-o", "progress=false", "-o", f"out_dir={tmp_path / 'run'}", "-o", f"data.cache_root={tmp_path / 'c'}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    sentences = ["The kitten curled up on the windowsill.", "He rode his two-wheeler to school."]
    assert load_example().main([str(ckpt), *sentences]) == 0
    lines = capsys.readouterr().out.splitlines()
    known = set(nouns.read_text().split("\n")) - {""}
    assert lines[0::2] == sentences
    for line in lines[1::2]:
        named = [item.rsplit(" ", 1) for item in line.removeprefix("    -> ").split(", ")]
        assert len(named) == 3 and all(name in known and 0 <= float(p) <= 1 for name, p in named), line
