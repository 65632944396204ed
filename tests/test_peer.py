"""The PyTorch peer (novic.bench.peer) decodes exactly like novic: same beams on the tiny bundle,
eager on the CPU (the compiled CUDA-graph mode is the same code under torch.compile)."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)

torch = pytest.importorskip("torch")


def unit_embeddings(n, dim, seed=0):
    e = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def peer(runtime_bundle):
    from novic.bench.peer import PeerPipeline

    return PeerPipeline(runtime_bundle.checkpoint, "cpu", max_batch=16, beam_width=10)


def test_peer_beams_equal_novic(peer, classifier):
    """Guided beam 10 over the bundle's nouns: the static-cache session gives novic's hypotheses
    (tokens and scores) for a batch, and again when the buffer is reused by smaller batches."""
    from novic.runtime.search import beam_search

    trie = classifier.vocabulary(None).trie
    for n, seed in ((16, 0), (3, 1), (1, 2)):
        embeds = unit_embeddings(n, classifier.config.embed_dim, seed)
        want = beam_search(classifier.decoder, embeds, 10, trie=trie)
        got = peer.decode(embeds)
        assert [[h.tokens for h in hyps] for hyps in got] == [[h.tokens for h in hyps] for hyps in want]
        assert np.allclose([h.logprob for hyps in got for h in hyps],
                           [h.logprob for hyps in want for h in hyps], atol=1e-4)


def test_peer_pipeline_labels_equal_classifier(peer, classifier):
    """From the same preprocessed photos: the peer's open_clip encoder gives novic's embeddings
    (fp32 on the CPU) and the same labels as `Classifier.classify_pixels`."""
    from novic.bench.measure import sample_images

    pixels = classifier.preprocessor.batch(sample_images(4))
    assert np.allclose(peer.embed(pixels), classifier.embed(pixels), atol=1e-4)
    ours = classifier.classify_pixels(pixels, [str(i) for i in range(4)], topk=10)
    assert peer.labels(pixels) == [[label.text for label in r.labels] for r in ours]


def test_peer_session_guards(peer):
    from novic.bench.peer import PeerDecoderSession

    with pytest.raises(ValueError, match="compile_mode"):
        PeerDecoderSession(peer.decoder.core.model, 4, compile_mode="fastest")
    fresh = PeerDecoderSession(peer.decoder.core.model, 4)
    with pytest.raises(RuntimeError, match="before prefill"):
        fresh.step(np.ones(1), 4, np.zeros(1), 1.0, np.zeros((1, 1), np.int64))
