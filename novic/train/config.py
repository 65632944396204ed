"""Training configuration: one nested dataclass, loaded from JSON/TOML plus dotted overrides.

Defaults are the released recipe (docs/model.md "Training") except where a CPU-sized run
needs something else; example configs are in docs/training.md.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import get_args, get_type_hints

from novic.errors import NovicError
from novic.train.captions import CaptionConfig
from novic.train.noise import NoiseConfig


class ConfigError(NovicError, ValueError):
    """A bad config file or value; one line naming the key, the value and what is expected."""


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."  # the message stays one readable line


def _need(ok: bool, key: str, value, expected: str):
    if not ok:
        raise ConfigError(f"config {key}: expected {expected}, got {_show(value)}")


TINY_CLIP = "novic-tiny-clip"   # the tiny random open_clip model shipped with novic (tests, examples)


@dataclass(frozen=True)
class EmbedderConfig:
    type: str = "open_clip"           # open_clip | sentence_transformers
    model: str | None = None          # open_clip name / hf-hub id, or a sentence-transformers model: required
    pretrained: str | None = None     # open_clip tag or weights file
    config_file: str | None = None    # open_clip model config (JSON); set for novic-tiny-clip automatically
    random_weights: bool = False      # allow an open_clip model without weights (random: tests only)
    batch_size: int = 512             # texts per encode call when building the cache

    def __post_init__(self):
        if self.type not in ("open_clip", "sentence_transformers"):
            raise ConfigError(f"embedder.type must be open_clip or sentence_transformers, got {self.type!r}")
        _need(self.batch_size >= 1, "embedder.batch_size", self.batch_size, "an integer >= 1")

    def checked(self) -> "EmbedderConfig":
        """This config, ready to load: the model is chosen, and an open_clip model without weights
        (whose embeddings are random: a decoder trained on them names nothing) only if
        `random_weights` says it is a test. Raises ConfigError (one line) otherwise."""
        example = ("-o embedder.model=ViT-B-16-SigLIP -o embedder.pretrained=webli, or "
                   "-o embedder.type=sentence_transformers -o embedder.model=all-MiniLM-L6-v2")
        if not self.model:
            raise ConfigError(f"config embedder.model: choose the model whose embeddings the decoder "
                              f"learns to name ({example})")
        if self.type != "open_clip":
            return self
        config_file = self.config_file or (TINY_CLIP + ".json" if self.model == TINY_CLIP else None)
        if self.pretrained is None and not self.model.startswith("hf-hub:") and not self.random_weights:
            raise ConfigError(f"config embedder.pretrained: {self.model} has no weights here, so its "
                              f"embeddings would be random; set embedder.pretrained (a tag or a weights "
                              f"file), or -o embedder.random_weights=true for a test run")
        return replace(self, config_file=config_file)


@dataclass(frozen=True)
class DataConfig:
    nouns: str | None = None          # noun list file (.txt/.json/.csv); None = build from WordNet
    wordnet_min_zipf: float = 3.0     # WordNet builder: wordfreq Zipf threshold
    wordnet_max_nouns: int | None = None
    wordnet_dir: str = "/usr/share/wordnet"
    cache_root: str = "cache"         # embedding caches live here (shared between runs)
    shard_size: int = 65536
    eval_samples: int = 2000          # held-out noise draws of training captions for evaluation
    eval_templates: str | None = None  # also evaluate on captions from these (held-out) templates

    def __post_init__(self):
        _need(self.wordnet_max_nouns is None or self.wordnet_max_nouns >= 1, "data.wordnet_max_nouns",
              self.wordnet_max_nouns, "an integer >= 1, or null for all")
        _need(self.shard_size >= 1, "data.shard_size", self.shard_size, "an integer >= 1")
        _need(self.eval_samples >= 1, "data.eval_samples", self.eval_samples, "an integer >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters; embed_dim, vocab_size and max_tokens come from the data."""
    prefix_len: int = 4
    width: int = 512
    layers: int = 6
    heads: int = 8
    ffn_width: int = 128
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("prefix_len", "width", "layers", "heads", "ffn_width"):
            _need(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an integer >= 1")
        _need(self.width % self.heads == 0, "model.width", self.width,
              f"a multiple of model.heads ({self.heads})")
        _need(0 <= self.dropout < 1, "model.dropout", self.dropout, "a number in [0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1.5e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1         # on >= 2-D weights only
    grad_clip: float = 1.0            # 0 disables
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0         # cosine decays to lr * min_lr_ratio
    batch_size: int = 8192            # global batch (all ranks, all accumulation steps)
    micro_batch: int | None = None    # per rank and forward pass; None = batch_size / world
    epochs: float = 18.0
    steps: int | None = None          # total optimizer steps; None: epochs decide

    def __post_init__(self):
        _need(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        for name in ("beta1", "beta2"):
            _need(0 <= getattr(self, name) < 1, f"optim.{name}", getattr(self, name), "a number in [0, 1)")
        for name in ("weight_decay", "grad_clip"):
            _need(getattr(self, name) >= 0, f"optim.{name}", getattr(self, name), "a number >= 0")
        _need(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        _need(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _need(self.batch_size >= 1, "optim.batch_size", self.batch_size, "an integer >= 1")
        _need(self.micro_batch is None or self.micro_batch >= 1, "optim.micro_batch", self.micro_batch,
              "an integer >= 1, or null for batch_size / world size")
        _need(self.epochs > 0, "optim.epochs", self.epochs, "a number > 0")
        # 0 is not "unset": a run of zero steps is a mistake, and null already means "use epochs".
        _need(self.steps is None or self.steps >= 1, "optim.steps", self.steps,
              "an integer >= 1, or null to train optim.epochs epochs")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/novic"
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    bf16: bool = True                 # bf16 autocast (CUDA only)
    compile: bool = False             # torch.compile the decoder
    log_every: int = 10
    eval_every: int = 500             # 0: only at the end
    ckpt_every: int = 1000            # 0: only at the end
    keep_checkpoints: int = 2
    progress: bool = True
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        _need(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device", self.device,
              "auto, cpu, cuda or cuda:N")
        _need(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        for name in ("eval_every", "ckpt_every"):
            _need(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0 (0: only at the end)")
        _need(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "an integer >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return _from_dict(cls, data, "")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:   # an int too large for a float
        return False


def _check_type(key: str, value, hint):
    """Types first, so that range checks and the trainer never see a string where a number goes."""
    allowed = get_args(hint) or (hint,)          # `int | None` -> (int, NoneType)
    if value is None and type(None) in allowed:
        return
    kind = next(t for t in allowed if t is not type(None))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int),
          float: number and _finite(value), str: isinstance(value, str)}[kind]
    expected = _EXPECTED[kind] + (" or null" if type(None) in allowed else "")
    if kind is str and number:   # -o out_dir=2024 parses as a number: say how to pass it as text
        expected += f" (quote it as JSON text: -o '{key}=\"{value}\"')"
    _need(ok, key, value, expected)


def _from_dict(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config {where[:-1] or 'root'}: expected a table/object of keys, got {_show(data)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    hints, kwargs = get_type_hints(cls), {}
    for name, value in data.items():
        if is_dataclass(hints[name]):
            kwargs[name] = _from_dict(hints[name], value, f"{where}{name}.")
        else:
            _check_type(where + name, value, hints[name])
            kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"none": None, "null": None, "true": True, "false": False}.get(text.lower(), text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """'optim.lr=1e-3' style overrides (values parsed as JSON where possible)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = _parse_value(value.strip())
    return data


CONFIG_FORMATS = (".json", ".toml")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Every value is type- and range-checked here, before any data or model work starts."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix not in CONFIG_FORMATS:
            raise ConfigError(f"config file {path}: cannot read {suffix or 'a file without suffix'}; "
                              f"config files are .json or .toml")
        text = path.read_text(encoding="utf-8")
        try:
            if suffix == ".toml":
                import tomllib
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - JSON and TOML raise different errors
            raise ConfigError(f"{path}: cannot parse config ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected an object of sections and keys at the top, "
                              f"got {_show(data)}")
    return TrainConfig.from_dict(apply_overrides(data, list(overrides)))


def with_checked_embedder(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `EmbedderConfig.checked()`: before a run does any work."""
    return replace(cfg, embedder=cfg.embedder.checked())
