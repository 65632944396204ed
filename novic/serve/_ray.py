"""Importing and starting Ray for novic.serve: one clear line when the extra is missing."""
from __future__ import annotations

from novic.errors import NovicError


class RayMissing(NovicError):
    """Ray (or one of its serve/data parts) is not installed."""


def require(module: str = "ray"):
    """Import `module` (ray, ray.serve, ray.data) or raise one line naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RayMissing(f"{module} is not installed ({exc}); install it with: pip install 'novic[ray]'") from None


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Join the cluster at `address` ('auto' = the one `ray start` made here), or start a local one
    (with `num_cpus`/`num_gpus` if given). Idempotent: an already connected driver stays as it is."""
    ray = require("ray")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:   # a private local cluster: its dashboard and ports stay on this machine
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    return ray
