"""novic.export.parity: the one measure of decoder agreement that novic-export check and the
fused-graph gate share (whole hypothesis lists, best hypotheses; greedy as a list of one)."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures_runtime import runtime_bundle  # noqa: F401  (fixture)
from novic.export.parity import agreement, random_unit_embeddings, search_tokens


def test_agreement_counts_lists_and_best_hypotheses_per_image():
    ref = {"greedy": [[(1, 2)], [(3,)], [(4,)], [(5,)]],
           "beam": [[(1, 2), (1,)], [(3,), (3, 4)], [(4,), (2,)], [(5,), (6,)]]}
    got = {"greedy": [[(1, 2)], [(3,)], [(9,)], [(5,)]],
           "beam": [[(1, 2), (1,)], [(3,), (4, 3)], [(2,), (4,)], [(5,), (6,)]]}
    lists, best = agreement(got, ref)
    assert lists == {"greedy": 0.75, "beam": 0.5}           # image 1: same best, other runner-up
    assert best == {"greedy": 0.75, "beam": 0.75}           # image 2: the two swapped
    assert agreement(ref, ref) == ({"greedy": 1.0, "beam": 1.0}, {"greedy": 1.0, "beam": 1.0})


def test_random_unit_embeddings():
    e = random_unit_embeddings(5, 8, seed=3)
    assert e.dtype == np.float32 and e.shape == (5, 8)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(e, random_unit_embeddings(5, 8, seed=3))
    assert not np.array_equal(e, random_unit_embeddings(5, 8, seed=4))


def test_the_gate_reports_the_shared_measure(runtime_bundle):   # noqa: F811
    """gate_decoder's numbers are parity.agreement of the two decoders' search_tokens."""
    pytest.importorskip("onnxruntime")
    from novic.export.fused_gate import gate_decoder
    from novic.runtime.backends.ort import OrtDecoderSession
    from novic.runtime.bundle import Bundle
    from novic.runtime.trie import TokenTrie

    b = Bundle.open(runtime_bundle.bundle)
    paths = (b.artifact_path("decoder_prefill", "fp32"), b.artifact_path("decoder_step", "fp32"))
    gate = gate_decoder(paths, paths, b.decoder_config, "fp32", n=8, width=3, noun_tokens=b.noun_tokens)
    session = OrtDecoderSession(*paths, b.decoder_config)
    tokens = search_tokens(session, random_unit_embeddings(8, b.decoder_config.embed_dim), 3,
                           TokenTrie(b.noun_tokens))
    lists, best = agreement(tokens, tokens)
    assert gate.passed and gate.numbers == {"max_abs_logprob_err": 0.0, "greedy": lists["greedy"],
                                            "beam_best": best["beam"], "beam_lists": lists["beam"],
                                            "guided_best": best["guided"], "guided_lists": lists["guided"]}
    assert set(tokens) == {"greedy", "beam", "guided"} and all(len(v) == 8 for v in tokens.values())
    assert all(len(hyps) == 1 for hyps in tokens["greedy"]) and all(len(h) == 3 for h in tokens["beam"])
