"""Noise augmentation: statistics of the released defaults and exact draw semantics."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from novic.train.noise import EmbeddingNoise, NoiseConfig


def unit(n, dim, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def angles_deg(a, b):
    return torch.rad2deg(torch.arccos((a * b).sum(-1).clamp(-1, 1)))


def test_output_is_unit_and_deterministic():
    x = unit(500, 64)
    noise = EmbeddingNoise(NoiseConfig(), 64)
    a = noise(x, torch.Generator().manual_seed(1))
    b = noise(x, torch.Generator().manual_seed(1))
    c = noise(x, torch.Generator().manual_seed(2))
    assert torch.allclose(a.norm(dim=-1), torch.ones(500), atol=1e-5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gaussian_branch_has_expected_noise_norm():
    dim, n = 768, 4000
    x = unit(n, dim)
    out = EmbeddingNoise(NoiseConfig(rotate_prob=0.0), dim)(x, torch.Generator().manual_seed(3))
    # Reconstruct the noise vector from the same draw: out must be normalize(x + s*g).
    g = torch.randn(n, dim, generator=torch.Generator().manual_seed(3))
    noise = g * 3.25 / math.sqrt(dim)
    assert torch.allclose(out, F.normalize(x + noise, dim=-1), atol=1e-5)
    rms = noise.pow(2).sum(-1).mean().sqrt().item()
    assert rms == pytest.approx(3.25, rel=0.01)
    # And what the decoder sees: tan(angle) = |n_perp| / (1 + n_par), about 3.25.
    tan = torch.tan(torch.deg2rad(angles_deg(out, x)))
    assert tan.median().item() == pytest.approx(3.25, rel=0.03)


def test_rotation_branch_angles_uniform_in_range_and_orthogonal_direction():
    dim, n = 256, 20000
    x = unit(n, dim)
    out = EmbeddingNoise(NoiseConfig(rotate_prob=1.0), dim)(x, torch.Generator().manual_seed(4))
    ang = angles_deg(out, x).numpy()
    assert ang.min() >= 45.0 - 1e-3 and ang.max() <= 75.0 + 1e-3
    # Uniform on [45, 75]: quartiles at 52.5 / 60 / 67.5.
    assert np.percentile(ang, [25, 50, 75]) == pytest.approx([52.5, 60.0, 67.5], abs=0.5)
    # Rotation stays in the plane of x and a direction orthogonal to x: out = cos*x + sin*u.
    cos = (out * x).sum(-1, keepdim=True)
    ortho = out - cos * x
    assert torch.allclose(ortho.norm(dim=-1), torch.sin(torch.arccos(cos.squeeze(-1))), atol=1e-4)
    # Directions are random: their mean is near zero (no preferred direction).
    mean_dir = F.normalize(ortho, dim=-1).mean(0).norm().item()
    assert mean_dir < 5 / math.sqrt(n)


def test_mix_ratio():
    dim, n = 128, 20000
    x = unit(n, dim)
    # A small Gaussian noise (~6 degrees) separates the branches from rotations (>= 45 degrees).
    out = EmbeddingNoise(NoiseConfig(noise_norm=0.1), dim)(x, torch.Generator().manual_seed(5))
    frac = (angles_deg(out, x) >= 44.0).float().mean().item()
    assert frac == pytest.approx(0.15, abs=0.01)


def test_rows_slices_reproduce_the_global_draw():
    x = unit(64, 32)
    noise = EmbeddingNoise(NoiseConfig(), 32)
    full = noise(x, torch.Generator().manual_seed(7))
    parts = [noise(x[i:i + 16], torch.Generator().manual_seed(7), rows=(i, 64))
             for i in range(0, 64, 16)]
    assert torch.allclose(torch.cat(parts), full, atol=1e-6)


def test_mean_shift_file(tmp_path):
    dim = 16
    shift = np.linspace(-0.5, 0.5, dim).astype(np.float32)
    np.save(tmp_path / "shift.npy", shift)
    cfg = NoiseConfig(noise_norm=0.0, rotate_prob=0.0, mean_shift=str(tmp_path / "shift.npy"))
    x = unit(10, dim)
    out = EmbeddingNoise(cfg, dim)(x)
    assert torch.allclose(out, F.normalize(x + torch.from_numpy(shift), dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="expected \\(32,\\)"):
        EmbeddingNoise(cfg, 32)
    with pytest.raises(FileNotFoundError, match="mean_shift"):
        EmbeddingNoise(NoiseConfig(mean_shift=str(tmp_path / "missing.npy")), dim)


@pytest.mark.parametrize("kwargs", [dict(noise_norm=-1), dict(rotate_prob=1.5),
                                    dict(angle_min=80, angle_max=70)])
def test_bad_config_is_one_clear_error(kwargs):
    with pytest.raises(ValueError, match="noise"):
        NoiseConfig(**kwargs)
