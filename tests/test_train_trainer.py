"""Trainer: loss, schedule, optimizer groups, greedy eval, checkpoints, exact resume,
gradient accumulation and DDP (2 processes, gloo on CPU) equal to one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_cache import HashEmbedder  # noqa: E402

from novic.config import DecoderConfig  # noqa: E402
from novic.model.decoder import ObjectDecoder  # noqa: E402
from novic.train.config import OptimConfig, load_config  # noqa: E402
from novic.train.data import prepare_data  # noqa: E402
from novic.train.trainer import (Trainer, greedy_tokens, lr_at, make_optimizer,  # noqa: E402
                                 token_loss_sum)

NOUNS = ("dog cat apple car chair table tree house bird fish horse boat cup pen book lamp shoe "
         "hat clock phone bottle plane train bus truck bicycle guitar piano camera window").split()


def small_config(tmp, **over):
    (tmp / "nouns.txt").write_text("\n".join(NOUNS) + "\n")
    items = {"out_dir": str(tmp / "run"), "data.cache_root": str(tmp / "cache"),
             "data.nouns": str(tmp / "nouns.txt"), "data.eval_samples": 40,
             "captions.variants_per_noun": 4, "captions.multi_ratio": 0.25,
             "model.width": 32, "model.layers": 1, "model.heads": 2, "model.ffn_width": 16,
             "model.dropout": 0.0, "optim.batch_size": 32, "optim.steps": 6, "optim.lr": 3e-3,
             "optim.warmup_steps": 2, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
             "progress": False}
    items.update(over)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])


def make_trainer(cfg):
    from novic.model.embedder import EmbedderSpec
    data = prepare_data(cfg, HashEmbedder())
    return Trainer(cfg, data, EmbedderSpec("hash-embedder"))


def test_optim_steps_null_means_epochs_decide(tmp_path):
    """optim.steps=null trains optim.epochs epochs of whole global batches; a number overrides."""
    by_epochs = make_trainer(small_config(tmp_path, **{"optim.steps": None, "optim.epochs": 2.5}))
    samples = len(by_epochs.data.sample_caption)
    assert by_epochs.steps_per_epoch == samples // 32 >= 2
    assert by_epochs.total_steps == int(2.5 * (samples // 32))
    assert make_trainer(small_config(tmp_path, **{"optim.steps": 3, "optim.epochs": 2.5})).total_steps == 3


def test_lr_schedule_warmup_then_cosine():
    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 110, o) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.55, abs=0.01) and lr_at(110, 110, o) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = ObjectDecoder(DecoderConfig(embed_dim=8, vocab_size=10, max_tokens=4, width=16,
                                        heads=2, ffn_width=8, layers=1))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 3  # norm1, norm2, final norm
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_loss_counts_tokens_up_to_first_eos_with_weights():
    torch.manual_seed(0)
    model = ObjectDecoder(DecoderConfig(embed_dim=8, vocab_size=10, max_tokens=5, width=16,
                                        heads=2, ffn_width=8, layers=1, dropout=0.0))
    emb = torch.randn(3, 8)
    targets = torch.tensor([[3, 4, 0, 0, 0], [5, 0, 0, 0, 0], [1, 2, 3, 4, 0]])
    lengths = torch.tensor([3, 2, 5])
    weights = torch.tensor([1.0, 0.5, 0.25])
    total, logits, mask = token_loss_sum(model, emb, targets, lengths, weights)
    logp = logits.log_softmax(-1)
    want = sum(-w * logp[i, t, targets[i, t]] for i, (n, w) in enumerate(zip(lengths, weights))
               for t in range(n))
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    assert mask.sum() == 10  # padding after the first EOS is not a target
    # Changing a token after the first EOS changes nothing.
    t2 = targets.clone()
    t2[0, 3] = 7
    assert token_loss_sum(model, emb, t2, lengths, weights)[0].item() == pytest.approx(total.item())


def test_batched_greedy_equals_reference_oracle():
    from novic.model.reference import greedy_decode
    torch.manual_seed(1)
    model = ObjectDecoder(DecoderConfig(embed_dim=8, vocab_size=12, max_tokens=5, width=32,
                                        heads=2, ffn_width=8, layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.3)
    emb = torch.randn(40, 8)
    batched = greedy_tokens(model, emb)
    for row, hyp in zip(batched.tolist(), greedy_decode(model, emb)):
        content = row[:row.index(0)] if 0 in row else row
        assert tuple(content) == hyp.tokens
        assert all(t == 0 for t in row[len(content):])


def test_short_run_learns_and_writes_metrics_and_checkpoint(tmp_path):
    from novic.model.checkpoint import load_checkpoint
    cfg = small_config(tmp_path, **{"optim.steps": 30, "optim.lr": 1e-2})
    trainer = make_trainer(cfg)
    history = trainer.fit()
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    final = rows[-1]
    assert 0 <= final["eval/train_noised/token_acc"] <= 1 and "eval/train_noised/exact_match" in final
    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    ckpt = load_checkpoint(tmp_path / "run" / latest["checkpoint"])
    assert ckpt.nouns == NOUNS and ckpt.config.embed_dim == 8
    for k, v in ckpt.build_model().state_dict().items():
        assert torch.equal(v, trainer.model.state_dict()[k])
    assert ckpt.token_table.decode(ckpt.noun_tokens[NOUNS.index("bicycle")][:-1]) == "bicycle"


def test_resume_continues_exactly(tmp_path):
    over = {"optim.steps": 8, "model.dropout": 0.1}
    full = make_trainer(small_config(tmp_path / "a", **over) if (tmp_path / "a").mkdir() is None
                        else None).fit()
    (tmp_path / "b").mkdir()
    cfg = small_config(tmp_path / "b", **over)
    first = make_trainer(cfg)
    part = [first.train_step(s) for s in range(3)]
    first.step = 3
    first.save()  # what ckpt_every writes; then the process "dies"
    second = make_trainer(cfg)
    assert second.resume() and second.step == 3
    rest = second.fit()
    got = [h["loss"] for h in part + rest if "loss" in h]
    want = [h["loss"] for h in full if "loss" in h]
    assert np.allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="other optim/seed"):
        make_trainer(small_config(tmp_path / "b", **{**over, "optim.lr": 1.0})).resume()


def test_gradient_accumulation_matches_full_batch(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    full = make_trainer(small_config(tmp_path / "a")).fit()
    acc = make_trainer(small_config(tmp_path / "b", **{"optim.micro_batch": 8}))
    assert acc.accum == 4
    got = acc.fit()
    assert np.allclose([h["loss"] for h in got if "loss" in h],
                       [h["loss"] for h in full if "loss" in h], rtol=1e-5)


def test_ddp_two_processes_match_one_process(tmp_path):
    single = make_trainer(small_config(tmp_path)).fit()
    want = [h["loss"] for h in single if "loss" in h]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NOVIC_TEST_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "ddp_losses.json").read_text())
    assert np.allclose(got, want, rtol=1e-5), (got, want)


if __name__ == "__main__":  # the DDP worker (run by torchrun from the test above)
    tmp = Path(os.environ["NOVIC_TEST_DIR"])
    from novic.model.embedder import EmbedderSpec
    from novic.train.trainer import init_distributed
    cfg = small_config(tmp, **{"out_dir": str(tmp / "ddp_run")})
    d = init_distributed("cpu")
    data = prepare_data(cfg, HashEmbedder(), build=d.main, barrier=d.barrier)
    trainer = Trainer(cfg, data, EmbedderSpec("hash-embedder"), d)
    assert trainer.micro == 16 and trainer.accum == 1
    hist = trainer.fit()
    if d.main:
        (tmp / "ddp_losses.json").write_text(json.dumps([h["loss"] for h in hist if "loss" in h]))
    torch.distributed.destroy_process_group()


def test_heldout_templates_embed_only_the_evaluated_captions(tmp_path):
    class Counting(HashEmbedder):
        texts: list = []

        def encode_text(self, texts):
            Counting.texts += list(texts)
            return super().encode_text(texts)

    (tmp_path / "held.txt").write_text("a sculpture of a {}.\na plushie {}.\nthe origami {}.\n")
    cfg = small_config(tmp_path, **{"data.eval_templates": str(tmp_path / "held.txt"), "data.eval_samples": 20})
    data = prepare_data(cfg, Counting())
    held = {e.name: e for e in data.eval_sets}
    clean, noised = held["heldout_clean"], held["heldout_noised"]
    assert len(clean.nouns) == 20 and np.array_equal(clean.nouns, noised.nouns)
    training = set(data.captions.texts)
    held_texts = [t for t in Counting.texts if t not in training]
    # 30 nouns x 3 templates x 2 forms = 180 held-out captions exist; only the 20 evaluated are embedded
    assert len(held_texts) == 20
    # each evaluated embedding is its caption's, and its target is the caption's noun
    for emb, target in zip(clean.embeds, clean.nouns):
        text = next(t for t in held_texts if np.allclose(HashEmbedder().encode_text([t])[0], emb, atol=2e-3))
        assert NOUNS[target] in text
