"""A tiny checkpoint + bundle for runtime tests (tiny random CLIP, tiny random decoder).

`tiny_runtime(tmp_path_factory)` builds them once per test process (cached at module level, so
several test modules importing the `runtime_bundle` fixture share one export) and returns a
`TinyRuntime` with the checkpoint path, the bundle path and the nouns.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

NOUNS = ["dog", "hot dog", "cat", "tabby cat", "red velvet cake", "brazil nut tree", "coffee",
         "coffee cup", "espresso", "rocket", "space shuttle", "astronaut", "spacesuit", "flag",
         "camera", "photographer", "tripod", "crème brûlée", "t-shirt", "kitten", "saucer",
         "spoon", "launch pad", "smoke", "sky", "grass", "tree", "person", "man", "woman"]
DECODER = dict(width=64, layers=2, heads=2, ffn_width=16)
# Weight std of the random decoder: larger than the training init (0.02) so that next-token
# distributions are peaked (no near-ties) and depend on the image (a strong prefix projection).
STD = {"token_embedding.weight": 0.5, "pos_embedding": 0.25, "prefix_proj.weight": 1.0}

_lock = threading.Lock()
_built: dict = {}


@dataclass(frozen=True)
class TinyRuntime:
    root: Path
    checkpoint: Path
    bundle: Path
    nouns: list


def build_tiny_runtime(root: Path) -> TinyRuntime:
    import torch
    from open_clip.tokenizer import default_bpe

    from novic.bpe import ClipBpeEncoder
    from novic.config import DecoderConfig
    from novic.export.bundle import export_bundle
    from novic.model.checkpoint import Checkpoint, save_checkpoint
    from novic.model.decoder import ObjectDecoder
    from novic.model.embedder import tiny_spec
    from novic.model.tokenizer import build_noun_vocab

    vocab = build_noun_vocab(ClipBpeEncoder(default_bpe()), NOUNS)
    cfg = DecoderConfig(embed_dim=32, vocab_size=vocab.table.vocab_size, max_tokens=vocab.max_tokens,
                        **DECODER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = ObjectDecoder(cfg)
        state = {}
        for name, value in model.state_dict().items():
            if value.dim() == 2:
                std = STD.get(name, value.shape[1] ** -0.5)
                value = torch.randn(value.shape, dtype=value.dtype) * std
            state[name] = value.clone()
    ckpt = Checkpoint(config=cfg, state_dict=state, embedder=tiny_spec(), token_table=vocab.table,
                      nouns=vocab.nouns, noun_tokens=vocab.noun_tokens, meta={"note": "runtime tests"})
    ckpt_path = save_checkpoint(root / "tiny.safetensors", ckpt)
    from rich.console import Console

    export_bundle(ckpt_path, root / "bundle", fp16=False, topk=10, console=Console(stderr=True, quiet=True))
    return TinyRuntime(root, ckpt_path, root / "bundle", list(NOUNS))


def tiny_runtime(tmp_path_factory) -> TinyRuntime:
    with _lock:
        if "rt" not in _built:
            _built["rt"] = build_tiny_runtime(tmp_path_factory.mktemp("tiny_runtime"))
        return _built["rt"]


@pytest.fixture(scope="session")
def runtime_bundle(tmp_path_factory) -> TinyRuntime:
    pytest.importorskip("open_clip")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    return tiny_runtime(tmp_path_factory)


@pytest.fixture(scope="session")
def classifier(runtime_bundle):
    from novic.runtime.classifier import Classifier

    clf = Classifier.load(runtime_bundle.bundle, backend="ort-cpu", threads=2)
    yield clf
    clf.close()
