"""Training mechanics benchmark (issue 3 acceptance): tiny random open_clip model, >= 2,000 WordNet
nouns, small decoder, 2 CPU cores, <= 10 minutes; reports greedy exact-match on held-out noise
draws of the training captions and the training throughput.

    nice -n 10 python bench/train_mechanics.py [--steps 1500] [--out /tmp/novic-mech]

The noise is milder than the released default (3.25): a random, untrained CLIP text tower packs
all captions into a narrow cone, so the released noise level would drown the caption identity;
the benchmark checks the training machinery, not zero-shot transfer.
"""
import argparse
import json
import time

from novic.train.config import load_config
from novic.train.trainer import train

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--nouns", type=int, default=2000)
p.add_argument("--out", default="/tmp/novic-mech")
a = p.parse_args()
over = {
    "out_dir": f"{a.out}/run", "data.cache_root": f"{a.out}/cache", "data.wordnet_min_zipf": 2.0,
    "data.wordnet_max_nouns": a.nouns, "data.eval_samples": 2000,
    "captions.variants_per_noun": 2, "captions.multi_ratio": 0.0,
    "noise.noise_norm": 0.3, "noise.rotate_prob": 0.15, "noise.angle_min": 5, "noise.angle_max": 10,
    "model.width": 128, "model.layers": 2, "model.heads": 4, "model.ffn_width": 128,
    "model.dropout": 0.0, "optim.batch_size": 256, "optim.steps": a.steps, "optim.lr": 3e-3,
    "optim.warmup_steps": 50, "optim.weight_decay": 0.01, "log_every": 50,
    "eval_every": max(1, a.steps // 5), "ckpt_every": 0, "progress": False,
}
cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])
t0 = time.time()
hist = train(cfg)
rows = [h for h in hist if "loss" in h]
print(json.dumps({"wall_s": round(time.time() - t0, 1), "steps": a.steps,
                  "samples_per_s": round(rows[-1]["samples_per_s"], 1), "final_loss": rows[-1]["loss"],
                  **{k: round(v, 4) for k, v in hist[-1].items() if k.startswith("eval/")}}))
