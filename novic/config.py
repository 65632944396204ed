"""Decoder hyper-parameters: shared by training, export and the torch-free runtime."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class DecoderConfig:
    """The NOVIC object decoder. Defaults are the released architecture (docs/model.md)."""

    embed_dim: int = 768          # F: CLIP embedding width
    vocab_size: int = 12000       # V: compact vocabulary incl. id 0 = EOS/PAD
    max_tokens: int = 16          # Cmax: longest noun tokenisation incl. EOS
    prefix_len: int = 4           # P
    width: int = 512              # H
    layers: int = 6
    heads: int = 8
    ffn_width: int = 128          # H / 4 in the release
    dropout: float = 0.1          # training only
    ln_eps: float = 1e-5

    def __post_init__(self):
        problems = []
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.max_tokens < 2:
            problems.append(f"max_tokens {self.max_tokens} must be >= 2 (one token plus EOS)")
        if self.vocab_size < 2:
            problems.append(f"vocab_size {self.vocab_size} must be >= 2 (EOS plus one token)")
        for name in ("embed_dim", "prefix_len", "width", "layers", "heads", "ffn_width"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive")
        if problems:
            raise ValueError("invalid decoder config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def seq_len(self) -> int:
        """Smax = P + Cmax - 1: positions in the table and slots in the KV cache."""
        return self.prefix_len + self.max_tokens - 1

    @property
    def max_new_tokens(self) -> int:
        """At most Cmax - 1 content tokens are generated (the last slot is for EOS)."""
        return self.max_tokens - 1

    def cache_shape(self, rows) -> tuple:
        """The KV cache of `rows` sequences: [layers, 2 (K, V), rows, heads, Smax, head_dim]."""
        return (self.layers, 2, rows, self.heads, self.seq_len, self.head_dim)

    def num_params(self) -> int:
        """Closed form of the released size (docs/model.md), generalised to any width/depth."""
        H, L = self.width, self.layers
        per_layer = 4 * H * H + 2 * H * self.ffn_width + 2 * H
        return (L * per_layer + H + self.embed_dim * self.prefix_len * H
                + H * (self.vocab_size + self.seq_len))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown decoder config keys: {sorted(unknown)}")
        return cls(**data)


EOS = 0  # EOS = PAD = compact id 0; there is no BOS.
