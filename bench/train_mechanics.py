"""Training mechanics benchmark (issue 3 acceptance): tiny random open_clip model, >= 2,000 WordNet
nouns, small decoder, 2 CPU cores, <= 10 minutes; reports greedy exact-match and token accuracy on
held-out noise draws of the training captions, the training throughput and the times.

    nice -n 10 python bench/train_mechanics.py [--steps 2000] [--out /tmp/novic-mech]

What it runs is the library's path (WordNet nouns -> captions -> embedding cache -> Trainer ->
checkpoint); only the loop is timed here (bench/train_common.py) so that the evaluations do not
count as training time. Choices, measured on this machine (docs/benchmarks.md "Training"):
- Noise 0.1 (rotation: 15 %, 2-5 degrees), not the released 3.25. The random, untrained
  novic-tiny-clip text tower maps captions into a 32-d cone (effective dimension ~8) where two
  captions of the same noun are no closer than captions of different nouns, and the nearest other
  noun's caption is at cosine ~0.98. A nearest-neighbour classifier that knows every clean
  embedding, i.e. about the best any decoder can do, gets 79 % of noised draws right at noise 0.3
  (the previous setting), 99.2 % at 0.1 with 5-10 degree rotations, 99.6 % at 0.1 with 2-5 degrees.
  The benchmark tests that the trainer fits (memorises 4,000 unrelated points into 2,000 nouns,
  robust to noise); zero-shot transfer is bench/train_generalisation.py's job.
- Decoder width 128, 2 layers, 4 heads, FFN 512 (the release's FFN is width/4; memorisation
  needs the wider FFN more than a wider model: width 192 gave the same accuracy per step at
  1.4x the CPU time), no dropout, weight decay 0.01, lr 3e-3 with 50 warm-up steps and cosine decay;
  batch 256 (512 with lr 4e-3 reached less per sample and per CPU second, 128 no more per sample).
- 2,000 steps (~30 epochs of the 4,000 captions): 1,500 gave 93.6 %.
- One torch thread when the machine is already loaded (see train_common.pick_threads).
"""
import argparse
import json
import time
from pathlib import Path

from train_common import cpu_seconds, load_avg, pick_threads, run_timed

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--nouns", type=int, default=2000)
p.add_argument("--variants", type=int, default=2, help="captions per noun")
p.add_argument("--noise", type=float, default=0.1)
p.add_argument("--eval-every", type=int, default=400)
p.add_argument("--threads", default="auto", help="torch CPU threads ('auto': 1 if loaded)")
p.add_argument("--out", default="/tmp/novic-mech")
a = p.parse_args()

t0, c0, load0 = time.time(), cpu_seconds(), load_avg()
threads = pick_threads(a.threads)

from novic.train.config import load_config, with_checked_embedder  # noqa: E402 - after the thread setting
from novic.train.data import load_embedder, prepare_data  # noqa: E402
from novic.train.trainer import Trainer, embedder_spec_of  # noqa: E402

over = {
    "embedder.model": "novic-tiny-clip", "embedder.random_weights": True,   # the machinery, on purpose
    "out_dir": f"{a.out}/run", "data.cache_root": f"{a.out}/cache", "data.wordnet_min_zipf": 2.0,
    "data.wordnet_max_nouns": a.nouns, "data.eval_samples": 2000, "device": "cpu",
    "captions.variants_per_noun": a.variants, "captions.multi_ratio": 0.0,
    "noise.noise_norm": a.noise, "noise.rotate_prob": 0.15, "noise.angle_min": 2, "noise.angle_max": 5,
    "model.width": 128, "model.layers": 2, "model.heads": 4, "model.ffn_width": 512,
    "model.dropout": 0.0, "optim.batch_size": 256, "optim.steps": a.steps, "optim.lr": 3e-3,
    "optim.warmup_steps": 50, "optim.weight_decay": 0.01, "ckpt_every": 0, "progress": False,
}
cfg = with_checked_embedder(load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()]))
data = prepare_data(cfg, load_embedder(cfg.embedder, "cpu"))
prep_wall, prep_cpu = time.time() - t0, cpu_seconds() - c0
trainer = Trainer(cfg, data, embedder_spec_of(cfg))
Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
log = Path(cfg.out_dir) / "curve.jsonl"
log.unlink(missing_ok=True)
curve = run_timed(trainer, a.eval_every, log)
trainer.save()
final = curve[-1]
print(json.dumps({
    "nouns": len(data.nouns), "captions": len(data.captions), "vocab": int(data.vocab.table.vocab_size),
    "embed_dim": data.dim, "params": sum(p.numel() for p in trainer.model.parameters()),
    "steps": a.steps, "threads": threads,
    "exact_match": final["train_noised/exact_match"], "token_acc": final["train_noised/token_acc"],
    "train_samples_per_s": final["samples_per_s"], "train_wall_s": final["train_wall_s"],
    "train_cpu_s": final["train_cpu_s"], "prep_wall_s": round(prep_wall, 1),
    "prep_cpu_s": round(prep_cpu, 1), "total_wall_s": round(time.time() - t0, 1),
    "total_cpu_s": round(cpu_seconds() - c0, 1), "load_start": round(load0, 2),
    "load_end": round(load_avg(), 2)}))
