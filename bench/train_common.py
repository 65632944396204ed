"""Helpers shared by the training benchmarks (bench/train_*.py): CPU threads, machine load,
CPU time, a timed training loop with periodic evaluation."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def load_avg() -> float:
    return os.getloadavg()[0]


def pick_threads(arg: str) -> int:
    """'auto': all cores on an idle machine, 1 thread when the 1-minute load average already fills
    the cores. On an oversubscribed machine torch's OpenMP threads wait for each other: measured
    here (2 cores, load ~7) one training step took 0.54 CPU-s / 1.10 s wall with 2 threads and
    0.12 CPU-s / 0.25 s wall with 1."""
    import torch
    cores = os.cpu_count() or 1
    n = (1 if load_avg() >= cores else cores) if arg == "auto" else int(arg)
    torch.set_num_threads(n)
    return n


def cpu_seconds() -> float:
    """CPU time of this process (all threads): comparable across machine loads, unlike wall time."""
    return time.process_time()


def run_timed(trainer, eval_every: int, log_path: Path | None = None, tag: dict | None = None,
              echo=print) -> list[dict]:
    """Train `trainer` (novic.train.trainer.Trainer) to its total steps, evaluating all its eval
    sets every `eval_every` steps and at the end. Rows: step, samples, train wall seconds and CPU
    seconds (both without the evaluations), samples/s, load average, loss and the eval metrics."""
    from novic.train.trainer import evaluate

    rows, wall, cpu = [], 0.0, 0.0
    total = trainer.total_steps
    for step in range(trainer.step, total):
        w0, c0 = time.time(), cpu_seconds()
        out = trainer.train_step(step)
        wall += time.time() - w0
        cpu += cpu_seconds() - c0
        trainer.step = step + 1
        if trainer.step % eval_every == 0 or trainer.step == total:
            row = {**(tag or {}), "step": trainer.step, "samples": trainer.step * trainer.G,
                   "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
                   "samples_per_s": round(trainer.step * trainer.G / wall, 1),
                   "load": round(load_avg(), 2), "loss": round(out["loss"], 4)}
            for i, es in enumerate(trainer.data.eval_sets):
                ev = evaluate(trainer.model, es, trainer.data, trainer.noise,
                              trainer.cfg.seed + 1_000_003 + i, trainer.device)
                row.update({k.removeprefix("eval/"): round(v, 4) for k, v in ev.items()})
            rows.append(row)
            echo(json.dumps(row))
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows
