"""The training loop: teacher-forced cross-entropy on noised cached text embeddings.

Determinism (what makes --resume exact and DDP equal to one process):
- step s uses the global batch perm_e[k*G:(k+1)*G] where e, k = divmod(s, steps_per_epoch) and
  perm_e is a permutation seeded by (seed, e); rank r takes its contiguous slice of it;
- the noise of step s is drawn for the whole global batch from a generator seeded by (seed, s)
  and each rank uses its rows; dropout is seeded by (seed, s, rank);
- the learning rate is a pure function of the step; the optimizer moments are checkpointed.
The loss is the weighted mean token cross-entropy over the global batch: sum_i w_i sum_t ce_it /
sum_i w_i n_i, with n_i = content tokens + the first EOS. Every rank divides by the same global
denominator (computed from the sample arrays), so accumulation and DDP averaging give exactly the
single-process gradient.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from novic.atomic import check_writable_dir, disk_full, is_disk_full, write_json_atomic
from novic.config import EOS, DecoderConfig
from novic.errors import NovicError
from novic.model.checkpoint import write_safetensors
from novic.model.decoder import ObjectDecoder
from novic.train.config import ConfigError, TrainConfig, with_checked_embedder
from novic.train.data import EvalSet, TrainData
from novic.train.noise import EmbeddingNoise
from novic.train.progress import progress_bar


# --- distributed ----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) \
            else "gloo"
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available (use device=cpu)")
    return torch.device(name)


def derive_seed(*ints: int) -> int:
    """A seed from integers, the same in every process (unlike hash() of mixed tuples)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint64)[0] >> 1)


# --- schedule and optimizer -----------------------------------------------------------------
def lr_at(step: int, total: int, cfg) -> float:
    """Linear warm-up then cosine decay from lr to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW; weight decay on >= 2-D weights only (not on LayerNorm gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# --- loss and evaluation --------------------------------------------------------------------
def token_loss_sum(model, embeds, targets, lengths, weights):
    """sum_i w_i sum_{t < n_i} ce_it, and the teacher-forced logits' argmax hits.
    targets [b, Cmax] (EOS-padded), lengths [b] = content tokens + 1."""
    T = int(lengths.max())
    logits = model(embeds, targets[:, :T - 1])                       # [b, T, V]
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets[:, :T].flatten(),
                         reduction="none").view(len(targets), T)
    mask = torch.arange(T, device=targets.device)[None, :] < lengths[:, None]
    return (ce * mask * weights[:, None]).sum(), logits, mask


@torch.no_grad()
def greedy_tokens(model: ObjectDecoder, embeds: torch.Tensor) -> torch.Tensor:
    """Batched greedy decoding with the KV cache (internals.md semantics: EOS forbidden first,
    ties to the lowest id, stop at EOS or after Cmax-1 tokens) -> [N, Cmax-1], EOS after the end."""
    cfg = model.cfg
    logits, cache = model.prefill(embeds)
    logits[:, EOS] = float("-inf")
    out = torch.full((len(embeds), cfg.max_new_tokens), EOS, dtype=torch.long, device=embeds.device)
    done = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
    for t in range(cfg.max_new_tokens):
        tok = torch.where(done, EOS, logits.float().argmax(-1))
        out[:, t] = tok
        done |= tok == EOS
        if done.all() or t == cfg.max_new_tokens - 1:
            break
        pos = torch.tensor(cfg.prefix_len + t, device=embeds.device)
        logits, cache = model.step(tok, pos, cache)
    return out


@torch.no_grad()
def evaluate(model: ObjectDecoder, es: EvalSet, data: TrainData, noise: EmbeddingNoise, seed: int,
             device, batch: int = 512) -> dict:
    """Token accuracy (teacher forcing) and greedy exact match on one evaluation set."""
    was = model.training
    model.eval()
    gen = torch.Generator(device).manual_seed(seed)
    hits = total = exact = 0
    for i in range(0, len(es.nouns), batch):
        emb = torch.from_numpy(es.embeds[i:i + batch]).to(device)
        if es.noised:
            emb = noise(emb, gen)
        nouns = torch.from_numpy(es.nouns[i:i + batch])
        targets = data.noun_tokens[nouns].to(device)
        lengths = torch.from_numpy(data.noun_lengths[es.nouns[i:i + batch]]).to(device)
        _, logits, mask = token_loss_sum(model, emb, targets, lengths, torch.ones(len(emb), device=device))
        T = mask.shape[1]
        hits += ((logits.argmax(-1) == targets[:, :T]) & mask).sum().item()
        total += mask.sum().item()
        # Exact match: targets and predictions are both EOS-padded after their first EOS.
        pred = greedy_tokens(model, emb)
        exact += (pred == targets[:, :pred.shape[1]]).all(1).sum().item()
    model.train(was)
    return {f"eval/{es.name}/token_acc": hits / max(total, 1),
            f"eval/{es.name}/exact_match": exact / max(len(es.nouns), 1)}


# --- checkpoints ----------------------------------------------------------------------------
# What a run writes into out_dir ("*" is the zero-padded step).
LATEST, METRICS = "latest.json", "metrics.jsonl"
STATE_FILES, CHECKPOINT_FILES = "state-*.safetensors", "checkpoint-*.safetensors"


def save_train_state(path: Path, model, optimizer, step: int, config: dict):
    """Model + AdamW moments + step in one safetensors file (no pickle); written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    steps = {}
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        st = optimizer.state.get(p)
        if st:
            tensors[f"adam.{i}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
            tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
            steps[i] = float(st["step"])
    meta = {"step": str(step), "adam_steps": json.dumps(steps), "config": json.dumps(config)}
    write_safetensors(path, tensors, meta)


def load_train_state(path: Path, model, optimizer) -> tuple[int, dict]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    steps = {int(k): v for k, v in json.loads(meta["adam_steps"]).items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if i in steps:
            optimizer.state[p] = {
                "step": torch.tensor(steps[i]),
                "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device)}
    return int(meta["step"]), json.loads(meta["config"])


# --- the trainer ----------------------------------------------------------------------------
class TrainingDiverged(NovicError):
    """A non-finite loss, gradient or weight: the run stops without saving the bad step."""


class Trainer:
    def __init__(self, cfg: TrainConfig, data: TrainData, embedder_spec, dist_: Dist | None = None):
        self.cfg, self.data, self.embedder_spec = cfg, data, embedder_spec
        self.dist = dist_ or Dist()
        self.device = pick_device(cfg.device, self.dist.local_rank)
        m = cfg.model
        self.dcfg = DecoderConfig(embed_dim=data.dim, vocab_size=data.vocab.table.vocab_size,
                                  max_tokens=data.max_tokens, prefix_len=m.prefix_len, width=m.width,
                                  layers=m.layers, heads=m.heads, ffn_width=m.ffn_width,
                                  dropout=m.dropout)
        torch.manual_seed(cfg.seed)
        self.model = ObjectDecoder(self.dcfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.noise = EmbeddingNoise(cfg.noise, data.dim)
        o, W = cfg.optim, self.dist.world
        self.G = o.batch_size
        micro = o.micro_batch or o.batch_size // W
        if o.batch_size % (W * micro):
            raise ValueError(f"optim.batch_size {o.batch_size} must be a multiple of world size {W} x "
                             f"micro_batch {micro}")
        self.micro, self.accum = micro, o.batch_size // (W * micro)
        n = len(data.sample_caption)
        self.steps_per_epoch = n // self.G
        if self.steps_per_epoch < 1:
            raise ValueError(f"optim.batch_size {self.G} is larger than the {n} training samples")
        self.total_steps = o.steps if o.steps is not None else max(1, int(o.epochs * self.steps_per_epoch))
        self.step = 0
        self.out = Path(cfg.out_dir)
        self.tokens_dev = data.noun_tokens.to(self.device)
        self._perm_epoch, self._perm = -1, None
        model = self.model
        if cfg.compile:
            model = torch.compile(model)
        if W > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_model = model

    # data ---------------------------------------------------------------------------------
    def global_batch(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.data.sample_caption)), epoch
        return self._perm[k * self.G:(k + 1) * self.G]

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # one optimizer step -------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        d, dev = self.data, self.device
        rows = self.global_batch(step)
        lengths_all = d.noun_lengths[d.sample_noun[rows]]
        denom = float((d.sample_weight[rows] * lengths_all).sum())
        lr = lr_at(step, self.total_steps, self.cfg.optim)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        torch.manual_seed(derive_seed(self.cfg.seed, step, 1, self.dist.rank))  # dropout
        noise_seed = derive_seed(self.cfg.seed, step, 2)
        rank_start = self.dist.rank * self.micro * self.accum
        loss_sum = torch.zeros((), device=dev)
        self.model.train()
        for a in range(self.accum):
            start = rank_start + a * self.micro
            r = rows[start:start + self.micro]
            emb = torch.from_numpy(d.cache.get(d.sample_caption[r])).to(dev, non_blocking=True)
            # Each micro-batch redraws the step's global noise and takes its rows, so that any
            # split over ranks and accumulation steps sees the same noise.
            gen = torch.Generator(dev).manual_seed(noise_seed)
            emb = self.noise(emb, gen, rows=(start, self.G))
            nouns = torch.from_numpy(d.sample_noun[r]).to(dev)
            targets = self.tokens_dev[nouns]
            lengths = torch.from_numpy(lengths_all[start:start + self.micro]).to(dev)
            weights = torch.from_numpy(d.sample_weight[r]).to(dev)
            sync = a == self.accum - 1 or self.dist.world == 1
            ctx = nullcontext() if sync else self.train_model.no_sync()
            with ctx:
                with self._autocast():
                    s, _, _ = token_loss_sum(self.train_model, emb, targets, lengths, weights)
                loss = s / denom
                # DDP averages gradients over ranks; the loss is already a share of the global sum.
                (loss * self.dist.world).backward()
            loss_sum += loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                               self.cfg.optim.grad_clip or float("inf"))
        if not torch.isfinite(gnorm):   # the same on every rank (DDP averaged the gradients)
            raise self.diverged(step + 1, f"the loss is {loss_sum.item():g} and the gradient norm {float(gnorm):g}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist.world > 1:
            dist.all_reduce(loss_sum)
        if not torch.isfinite(loss_sum):
            raise self.diverged(step + 1, f"the loss is {loss_sum.item():g}")
        return {"step": step + 1, "loss": loss_sum.item(), "lr": lr, "grad_norm": float(gnorm),
                "epoch": (step + 1) / self.steps_per_epoch}

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        """The one-line stop: what went non-finite, and the checkpoint that is still good."""
        latest = self.out / LATEST
        try:
            info = json.loads(latest.read_text())
            kept = f"the last good checkpoint is {self.out / info['checkpoint']} (step {info['step']})"
        except (OSError, ValueError, KeyError, TypeError):
            kept = "no checkpoint was written before it"
        return TrainingDiverged(f"training diverged at step {step}: {what} (learning rate "
                                f"{lr_at(step - 1, self.total_steps, self.cfg.optim):g}); stopped without "
                                f"saving it; {kept}; lower optim.lr and train again")

    def check_weights(self) -> None:
        """Refuse to save weights with NaN/inf (an update can overflow with a finite loss)."""
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise self.diverged(self.step, f"weight {name} holds NaN/inf values")

    # checkpoints --------------------------------------------------------------------------
    def save(self):
        """train state (for --resume) + a foundation-format checkpoint (for export/inference)."""
        self.check_weights()   # on every rank (their weights are equal), so that all of them stop
        if not self.dist.main:
            return
        from novic.model.checkpoint import Checkpoint, save_checkpoint

        self.out.mkdir(parents=True, exist_ok=True)
        tag = f"{self.step:08d}"
        state, checkpoint = STATE_FILES.replace("*", tag), CHECKPOINT_FILES.replace("*", tag)
        save_train_state(self.out / state, self.model, self.optimizer, self.step, self.cfg.to_dict())
        vocab = self.data.vocab
        ckpt = Checkpoint(config=self.dcfg,
                          state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                          embedder=self.embedder_spec, token_table=vocab.table, nouns=list(vocab.nouns),
                          noun_tokens=[list(t) for t in vocab.noun_tokens],
                          meta={"step": self.step, "total_steps": self.total_steps,
                                "train_config": self.cfg.to_dict()})
        save_checkpoint(self.out / checkpoint, ckpt)
        write_json_atomic(self.out / LATEST, {"step": self.step, "state": state, "checkpoint": checkpoint})
        # Keep the newest few (the one latest.json names is always kept).
        for pattern in (STATE_FILES, CHECKPOINT_FILES):
            for old in sorted(self.out.glob(pattern))[:-max(1, self.cfg.keep_checkpoints)]:
                old.unlink()

    def resume(self) -> bool:
        latest = self.out / LATEST
        if not latest.is_file():
            return False
        info = json.loads(latest.read_text())
        self.step, saved = load_train_state(self.out / info["state"], self.model, self.optimizer)
        if saved.get("optim") != self.cfg.to_dict()["optim"] or saved.get("seed") != self.cfg.seed:
            raise ValueError(f"--resume: {latest} was written with other optim/seed settings; "
                             f"use the same config or another out_dir")
        return True

    # the loop -----------------------------------------------------------------------------
    def log(self, row: dict):
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            line = json.dumps(row) + "\n"
            try:
                with open(self.out / METRICS, "a") as f:
                    f.write(line)
            except OSError as exc:   # the same line as a checkpoint that does not fit
                if is_disk_full(exc):
                    raise disk_full(self.out / METRICS, len(line)) from None
                raise

    def run_eval(self) -> dict:
        row = {"step": self.step}
        for i, es in enumerate(self.data.eval_sets):
            row.update(evaluate(self.model, es, self.data, self.noise, self.cfg.seed + 1_000_003 + i,
                                self.device))
        self.log(row)
        return row

    def fit(self) -> list[dict]:
        cfg = self.cfg
        history = []
        t0, samples = time.time(), 0
        with progress_bar("train loss {loss}", self.total_steps, cfg.progress and self.dist.main,
                          unit="steps", completed=self.step) as advance:
            while self.step < self.total_steps:
                row = self.train_step(self.step)
                self.step += 1
                samples += self.G
                row["samples_per_s"] = samples / (time.time() - t0)
                history.append(row)
                advance(1, loss=f"{row['loss']:.4f}")
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.log(row)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self.run_eval()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < self.total_steps:
                    self.save()
        self.save()
        history.append(self.run_eval())
        return history


def embedder_spec_of(cfg: TrainConfig):
    from novic.model.embedder import EmbedderSpec
    e = cfg.embedder
    if e.type == "open_clip":
        return EmbedderSpec(e.model, e.pretrained, e.config_file)
    return EmbedderSpec(f"{e.type}:{e.model}")  # recorded for provenance; not an open_clip model


def holds_run(out_dir: Path) -> bool:
    """Whether out_dir already has what a run writes (metrics, checkpoints, latest.json)."""
    return out_dir.is_dir() and any(
        next(out_dir.glob(pattern), None) is not None
        for pattern in (LATEST, METRICS, STATE_FILES, CHECKPOINT_FILES))


def train(cfg: TrainConfig, resume: bool = False) -> list[dict]:
    """Everything `novic-train train` does: data (cache built by rank 0), model, loop."""
    from novic.train.data import load_embedder, prepare_data

    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a folder; choose another out_dir (-o out_dir=...)")
    # Before any work: a second run into the same folder would append to its metrics and mix
    # its checkpoints with the old ones.
    if not resume and holds_run(out):
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it, or "
                          f"choose another out_dir (-o out_dir=...) or remove it")
    check_writable_dir(out)   # now, not after hours of building the caption cache
    cfg = with_checked_embedder(cfg)
    d = init_distributed(cfg.device)
    device = pick_device(cfg.device, d.local_rank)
    embedder = load_embedder(cfg.embedder, device)
    data = prepare_data(cfg, embedder, build=d.main, barrier=d.barrier)
    del embedder  # training needs only the cached embeddings
    trainer = Trainer(cfg, data, embedder_spec_of(cfg), d)
    if resume and not trainer.resume() and d.main:
        print(f"--resume: nothing to resume in {cfg.out_dir}; starting from step 0")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", cfg.to_dict())
    history = trainer.fit()
    if d.world > 1:
        dist.destroy_process_group()
    return history
