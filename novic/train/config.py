"""Training configuration: one nested dataclass, loaded from JSON/TOML plus dotted overrides.

Defaults are the released recipe (REFERENCE.md "Training recipe") except where a CPU-sized run
needs something else; example configs are in docs/training.md.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from novic.train.captions import CaptionConfig
from novic.train.noise import NoiseConfig


@dataclass(frozen=True)
class EmbedderConfig:
    type: str = "open_clip"           # open_clip | sentence_transformers
    model: str = "novic-tiny-clip"    # open_clip name / hf-hub id, or a sentence-transformers model
    pretrained: str | None = None     # open_clip tag or weights file
    config_file: str | None = "novic-tiny-clip.json"
    batch_size: int = 512             # texts per encode call when building the cache

    def __post_init__(self):
        if self.type not in ("open_clip", "sentence_transformers"):
            raise ValueError(f"embedder.type must be open_clip or sentence_transformers, got {self.type!r}")


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


@dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters; embed_dim, vocab_size and max_tokens come from the data."""
    prefix_len: int = 4
    width: int = 512
    layers: int = 6
    heads: int = 8
    ffn_width: int = 128
    dropout: float = 0.1


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
    steps: int | None = None          # overrides epochs

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1:
            raise ValueError("optim.lr must be > 0 and optim.batch_size >= 1")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError("optim.micro_batch must be >= 1")


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return _from_dict(cls, data, "")


def _from_dict(cls, data, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"config {where or 'root'}: expected a table/object, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in known else None
        kwargs[name] = (_from_dict(type(default), value, f"{where}{name}.")
                        if is_dataclass(default) else value)
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
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[leaf] = _parse_value(value.strip())
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".toml":
                import tomllib
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - JSON and TOML raise different errors
            raise ValueError(f"{path}: cannot parse config ({' '.join(str(e).split())})") from None
    try:
        return TrainConfig.from_dict(apply_overrides(data, list(overrides)))
    except TypeError as e:
        raise ValueError(f"bad config value: {e}") from None
