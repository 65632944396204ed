"""Embedding cache: shards + index, reuse, atomic writes and resume after kill -9."""
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from novic.train.cache import EmbeddingCache, build_cache, cache_dir


class HashEmbedder:
    """Deterministic fake text embedder (the cache's protocol): unit vectors from a text hash.
    `delay` seconds per call makes it slow enough to be killed mid-run."""

    name = "hash-embedder"
    dim = 8

    def __init__(self, delay=0.0):
        self.delay, self.calls = delay, 0

    def encode_text(self, texts):
        self.calls += 1
        time.sleep(self.delay)
        out = np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], np.uint16)[:8]
                        .astype(np.float32) - 32768 for t in texts])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


TEXTS = [f"a photo of thing number {i}." for i in range(1000)]


def test_build_get_and_reuse(tmp_path):
    emb = HashEmbedder()
    cache = build_cache(tmp_path, emb, TEXTS, "h1", shard_size=300, batch_size=64, progress=False)
    assert len(cache) == 1000 and cache.dim == 8 and len(cache.shards) == 4
    rows = np.array([999, 0, 301, 300, 299, 5])
    expected = emb.encode_text([TEXTS[i] for i in rows]).astype(np.float16).astype(np.float32)
    assert np.array_equal(cache.get(rows), expected)
    assert np.allclose(np.linalg.norm(cache.all(), axis=1), 1, atol=2e-3)
    assert isinstance(cache.shards[0], np.memmap)
    # A second build of the same key reuses the cache without calling the embedder.
    emb2 = HashEmbedder()
    again = build_cache(tmp_path, emb2, TEXTS, "h1", shard_size=300, batch_size=64, progress=False)
    assert emb2.calls == 0 and np.array_equal(again.all(), cache.all())
    # Another data hash is another cache; other settings rebuild.
    assert cache_dir(tmp_path, emb, "h2") != cache.path
    f32 = build_cache(tmp_path, emb, TEXTS, "h1", shard_size=300, dtype="float32", progress=False)
    assert f32.shards[0].dtype == np.float32
    assert not EmbeddingCache(f32.path).index["dtype"] == "float16"


def test_missing_cache_and_bad_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete embedding cache"):
        EmbeddingCache(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        build_cache(tmp_path, HashEmbedder(), TEXTS, "h", dtype="int8", progress=False)


def test_resume_after_partial_run_recomputes_only_missing_shards(tmp_path):
    ref = build_cache(tmp_path / "ref", HashEmbedder(), TEXTS, "h", shard_size=100,
                      batch_size=50, progress=False)
    part = tmp_path / "part"
    build_cache(part, HashEmbedder(), TEXTS, "h", shard_size=100, batch_size=50, progress=False)
    d = cache_dir(part, HashEmbedder(), "h")
    # Simulate a crash: no index, three shards missing, one torn temporary file left behind.
    (d / "index.json").unlink()
    for i in (2, 5, 9):
        (d / f"shard_{i:05d}.npy").unlink()
    (d / ".shard_00002.npy.5f3a9c2e1b7d.tmp").write_bytes(b"torn")   # novic.atomic's temp name
    emb = HashEmbedder()
    cache = build_cache(part, emb, TEXTS, "h", shard_size=100, batch_size=50, progress=False)
    assert emb.calls == 3 * 2  # 3 shards x 2 batches
    assert np.array_equal(cache.all(), ref.all())
    assert not list(d.glob(".*.tmp"))


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train_cache import HashEmbedder, TEXTS
from novic.train.cache import build_cache
build_cache({root!r}, HashEmbedder(delay=0.05), TEXTS, "h", shard_size=100, batch_size=20,
            progress=False)
"""


def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path):
    root = tmp_path / "killed"
    d = cache_dir(root, HashEmbedder(), "h")
    script = SCRIPT.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while len(list(d.glob("shard_*.npy"))) < 2 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.12)  # land somewhere inside the next shard
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in d.glob("shard_*.npy"))
    assert 2 <= len(done) < 10 and not (d / "index.json").exists()
    emb = HashEmbedder()
    cache = build_cache(root, emb, TEXTS, "h", shard_size=100, batch_size=20, progress=False)
    assert emb.calls == (10 - len(done)) * 5
    ref = build_cache(tmp_path / "ref", HashEmbedder(), TEXTS, "h", shard_size=100, batch_size=20,
                      progress=False)
    assert np.array_equal(cache.all(), ref.all())
    for f in ref.path.glob("shard_*.npy"):
        assert f.read_bytes() == (cache.path / f.name).read_bytes()
