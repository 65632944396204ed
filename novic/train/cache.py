"""Text-embedding cache: caption embeddings computed once, stored as memory-mapped .npy shards.

Layout of one cache (a directory under the cache root, named by embedder and data hash):
    meta.json          what is being built: embedder id, data hash, count, dim, shard size, dtype
    shard_00000.npy    rows [0, shard_size) as unit vectors (float16 by default)
    ...
    index.json         written last: the cache is complete (shard list with row ranges)
Every file is written to a temporary name and renamed, so a shard is either complete or absent.
A run killed at any point (even kill -9) resumes by computing only the missing shards; each shard
is computed from its own texts in the same batches, so the result equals an uninterrupted run.

Any text embedder works (the protocol): ``name: str``, ``dim: int`` and
``encode_text(list[str]) -> [N, F]`` unit vectors (torch tensor or numpy array). open_clip models
come through `novic.model.embedder.Embedder`, which computes under fp16 autocast on CUDA.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from novic.atomic import open_atomic, write_json_atomic
from novic.train.progress import progress_bar

FORMAT = 1


class TextEmbedder(Protocol):
    name: str
    dim: int

    def encode_text(self, texts: list[str]): ...


def embedder_id(embedder) -> str:
    """What identifies the embedding space: the open_clip spec if there is one, else the name."""
    spec = getattr(embedder, "spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        return json.dumps(spec.to_dict(), sort_keys=True)
    return str(embedder.name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "embedder"


def _write_atomic(path: Path, write) -> None:
    with open_atomic(path) as f:
        write(f)


class EmbeddingCache:
    """A complete cache: ``cache.get(rows) -> float32 [n, F]``; shards are memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a complete embedding cache (no index.json); "
                                    f"build it with build_cache()")
        self.index = json.loads(index_file.read_text())
        self.num, self.dim = self.index["num"], self.index["dim"]
        self.shard_size = self.index["shard_size"]
        self.shards = [np.load(self.path / s["file"], mmap_mode="r") for s in self.index["shards"]]

    def __len__(self) -> int:
        return self.num

    def get(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        shard = rows // self.shard_size
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[s][rows[sel] - s * self.shard_size]
        return out

    def all(self) -> np.ndarray:
        return self.get(np.arange(self.num))


def cache_dir(root: str | Path, embedder, data_hash: str) -> Path:
    return Path(root) / f"{_slug(str(embedder.name))}-{data_hash[:16]}"


def build_cache(root: str | Path, embedder, texts: Sequence[str], data_hash: str,
                shard_size: int = 65536, batch_size: int = 512, dtype: str = "float16",
                progress: bool = True) -> EmbeddingCache:
    """Embed `texts` (or resume doing so) into the cache for (embedder, data_hash) under `root`;
    returns the complete cache. A directory left by another build of the same key with other
    settings (shard size, dtype, count) is rebuilt from scratch."""
    if shard_size < 1 or batch_size < 1:
        raise ValueError("cache shard_size and batch_size must be >= 1")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"cache dtype must be float16 or float32, got {dtype!r}")
    path = cache_dir(root, embedder, data_hash)
    meta = {"format": FORMAT, "embedder": embedder_id(embedder), "data_hash": data_hash,
            "num": len(texts), "dim": int(embedder.dim), "shard_size": shard_size, "dtype": dtype}
    if (path / "index.json").is_file():
        cache = EmbeddingCache(path)
        if {k: cache.index.get(k) for k in meta} == meta:
            return cache
    if (path / "meta.json").is_file() and json.loads((path / "meta.json").read_text()) != meta:
        shutil.rmtree(path)  # same key, other settings: start over
    path.mkdir(parents=True, exist_ok=True)
    for leftover in path.glob(".*.tmp"):  # partial writes of a killed run (novic.atomic's temp files)
        leftover.unlink()
    if not (path / "meta.json").is_file():
        write_json_atomic(path / "meta.json", meta)

    n_shards = max(1, -(-len(texts) // shard_size))
    shards = [{"file": f"shard_{i:05d}.npy", "start": i * shard_size,
               "count": min(shard_size, len(texts) - i * shard_size)} for i in range(n_shards)]
    todo = [s for s in shards if not _shard_ok(path / s["file"], s["count"], meta)]
    done_rows = sum(s["count"] for s in shards) - sum(s["count"] for s in todo)
    with progress_bar(f"embedding {len(texts):,} captions", len(texts), progress, unit="captions",
                      completed=done_rows) as advance:
        for s in todo:
            chunk = texts[s["start"]:s["start"] + s["count"]]
            rows = []
            for i in range(0, len(chunk), batch_size):
                emb = embedder.encode_text(list(chunk[i:i + batch_size]))
                emb = emb.float().cpu().numpy() if hasattr(emb, "cpu") else np.asarray(emb, np.float32)
                rows.append(emb.astype(dtype))
                advance(len(emb))
            data = np.concatenate(rows) if rows else np.zeros((0, meta["dim"]), dtype)
            if data.shape != (s["count"], meta["dim"]):
                raise ValueError(f"embedder {embedder.name} returned {data.shape} for "
                                 f"{s['count']} texts of dim {meta['dim']}")
            _write_atomic(path / s["file"], lambda f: np.save(f, data, allow_pickle=False))
    write_json_atomic(path / "index.json", {**meta, "shards": shards, "created": time.time()})
    return EmbeddingCache(path)


def _shard_ok(file: Path, count: int, meta: dict) -> bool:
    if not file.is_file():
        return False
    try:
        arr = np.load(file, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return arr.shape == (count, meta["dim"]) and arr.dtype == np.dtype(meta["dtype"])
