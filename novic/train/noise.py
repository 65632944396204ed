"""Noise augmentation of unit text embeddings (docs/model.md "Training").

The decoder is trained on text embeddings but must accept image embeddings; the noise covers the
modality gap. Per sample, either
- Gaussian: add a vector with i.i.d. N(0, s^2) elements, s = noise_norm / sqrt(F), so that the
  expected squared norm of the noise is noise_norm^2 (3.25 in the released models), or
- with probability rotate_prob, rotation: turn the embedding by an angle drawn uniformly from
  [angle_min, angle_max] degrees towards a uniformly random direction orthogonal to it,
and renormalise to unit length. An optional mean-shift vector (e.g. mean image embedding minus
mean text embedding of the CLIP model) is added before the noise.

Draws are made for a whole (global) batch and may be sliced (``rows``), so that data-parallel ranks
that each noise their part of a batch get exactly what one process would have drawn.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseConfig:
    noise_norm: float = 3.25      # expected noise norm (sqrt of E|n|^2) of the Gaussian branch
    rotate_prob: float = 0.15     # per-sample probability of rotation instead of Gaussian noise
    angle_min: float = 45.0       # degrees
    angle_max: float = 75.0       # degrees
    mean_shift: str | None = None  # optional .npy file with a [F] vector added before the noise

    def __post_init__(self):
        if self.noise_norm < 0:
            raise ValueError(f"noise.noise_norm must be >= 0, got {self.noise_norm}")
        if not 0.0 <= self.rotate_prob <= 1.0:
            raise ValueError(f"noise.rotate_prob must be in [0, 1], got {self.rotate_prob}")
        if not 0.0 <= self.angle_min <= self.angle_max <= 180.0:
            raise ValueError(f"noise angles must satisfy 0 <= angle_min <= angle_max <= 180, "
                             f"got [{self.angle_min}, {self.angle_max}]")

    def to_dict(self) -> dict:
        return asdict(self)


def load_mean_shift(path: str | Path, dim: int) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noise.mean_shift: no such file {path} (a .npy [F] vector)")
    vec = np.load(path, allow_pickle=False)
    if vec.shape != (dim,):
        raise ValueError(f"noise.mean_shift {path}: shape {vec.shape}, expected ({dim},) to match "
                         f"the embedder's dimension")
    return torch.from_numpy(np.asarray(vec, dtype=np.float32))


class EmbeddingNoise:
    """Callable noise: ``noise(embeds [N,F], generator, rows=None) -> unit [N,F]`` (float32)."""

    def __init__(self, cfg: NoiseConfig, dim: int):
        self.cfg, self.dim = cfg, dim
        self.shift = load_mean_shift(cfg.mean_shift, dim) if cfg.mean_shift else None

    def __call__(self, embeds: torch.Tensor, generator: torch.Generator | None = None,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
        """rows = (start, total): draw for `total` samples and use rows start..start+N (DDP)."""
        cfg = self.cfg
        n, dim = embeds.shape
        start, total = rows if rows is not None else (0, n)
        dev = embeds.device
        x = F.normalize(embeds.float(), dim=-1)
        if self.shift is not None:
            x = F.normalize(x + self.shift.to(dev), dim=-1)
        # One Gaussian draw serves both branches: noise vector, or (projected) rotation direction.
        g = torch.randn(total, dim, generator=generator, device=dev)[start:start + n]
        u = torch.rand(total, 2, generator=generator, device=dev)[start:start + n]
        rotate = u[:, 0] < cfg.rotate_prob
        angle = torch.deg2rad(cfg.angle_min + (cfg.angle_max - cfg.angle_min) * u[:, 1])

        gauss = x + g * (cfg.noise_norm / math.sqrt(dim))
        ortho = F.normalize(g - (g * x).sum(-1, keepdim=True) * x, dim=-1)
        rotated = torch.cos(angle)[:, None] * x + torch.sin(angle)[:, None] * ortho
        return F.normalize(torch.where(rotate[:, None], rotated, gauss), dim=-1)
