"""novic.bench's own measurements on the tiny bundle: the per-phase breakdown of one image."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures_runtime import classifier, runtime_bundle  # noqa: F401  (fixtures)


def test_phases_account_for_one_image(classifier):
    from novic.bench.measure import phases, sample_images

    image = sample_images(1)[0]
    session = classifier.decoder
    calls = []
    real_step = session.step

    def counting_step(*args, **kwargs):   # the session's own wrapper, which phases() must keep
        calls.append(1)
        return real_step(*args, **kwargs)

    session.step = counting_step
    try:
        pixels, _ = classifier.preprocessor.load_batch([image])
        classifier.decode(classifier.embed(pixels), classifier.vocabulary(None), 10, 1.0, 0.0)
        steps_per_image = len(calls)
        assert steps_per_image >= 1
        calls.clear()
        got = phases(classifier, image, reps=3, beam_width=10)
        assert len(calls) == 4 * steps_per_image          # warm-up + 3 rounds went through our wrapper
        assert session.step is counting_step and "prefill" not in vars(session)
    finally:
        del session.step
    assert got["steps"] == steps_per_image
    assert set(got) == {"preprocess_ms", "encoder_ms", "prefill_ms", "first_step_ms", "later_steps_ms",
                        "host_search_ms", "steps"}
    timed = [got[k] for k in ("preprocess_ms", "encoder_ms", "prefill_ms", "first_step_ms")]
    assert all(np.isfinite(timed)) and min(timed) > 0 and got["host_search_ms"] > 0
    assert (got["later_steps_ms"] > 0) == (steps_per_image > 1)
