"""novic.bench.hostwork: host work per decoder call, on the three code paths of OrtDecoderSession
(tiny bundle, CPU). The numbers are not asserted (no timing asserts); their bookkeeping is."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)


@pytest.mark.parametrize("path", ["plain", "iobinding", "cuda-graph logic"])
def test_host_per_call_accounts_for_every_call(classifier, runtime_bundle, path):
    from novic.bench.hostwork import _ort_sessions, host_per_call, rehearse_cuda_graphs
    from novic.runtime.backends.ort import OrtDecoderSession
    from novic.runtime.bundle import Bundle
    from novic.runtime.search import beam_search

    b = Bundle.open(runtime_bundle.bundle)
    session = OrtDecoderSession(b.artifact_path("decoder_prefill", "fp32"), b.artifact_path("decoder_step", "fp32"),
                                b.decoder_config, threads=1, iobinding=path != "plain")
    if path == "cuda-graph logic":
        rehearse_cuda_graphs(session)
        assert not session.drops_finished_rows
    trie = classifier.vocabulary(None).trie
    embeds = np.random.default_rng(0).standard_normal((2, b.embed_dim)).astype(np.float32)
    want = beam_search(classifier.decoder, embeds, 10, trie=trie)

    calls = []
    real_step = session.step
    session.step = lambda *a, **k: calls.append(1) or real_step(*a, **k)   # the object's own wrapper
    got = host_per_call(session, embeds, 10, trie, reps=3)
    assert got["calls"] == 1 + len(calls) / 4   # prefill + steps, the same in each of 1 + 3 searches
    assert got["ort_us"] > 0 and got["search_us"] > 0 and got["session_us"] > 0
    assert got["host_us"] == pytest.approx(got["search_us"] + got["session_us"])
    # everything is unwrapped again: the object's own wrapper stays, the class methods return
    assert [name for name in ("prefill", "run", "run_with_iobinding") if name in vars(session)] == []
    assert vars(session)["step"] is not real_step and not any("run" in vars(s) for s in _ort_sessions(session))
    assert beam_search(session, embeds, 10, trie=trie) == want
