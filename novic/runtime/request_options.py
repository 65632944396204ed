"""One request's search options in a service that batches many callers' requests.

A service (novic.runtime.batching.Batcher, novic-serve's Ray replicas) takes requests one image at
a time, each with its own options, and classifies many together. The decoder only needs the
options that steer the search to be equal: the vocabulary, the beam width, the temperature and
alpha. `topk` and `granularity` act after it, on the host: the beam list of a request decoded
with every hypothesis kept gives its own top k (the first k of the list) and its own roll-up
(which needs every beam label anyway, as in `Classifier.classify`). So requests differing only in
those share one decoder call, and each answer equals `Classifier.classify_pixels` with the
request's own options.

    options = check_request(clf, topk=3, granularity="basic")       # in the caller: a bad one raises
    for rows in decode_groups([o1, o2, o3]):                         # requests that decode together
        results = classify_together(clf, pixels[rows], names, [all_options[i] for i in rows])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from novic.runtime.classifier import Classifier, ClassifierError, Result, Vocabulary
from novic.runtime.hierarchy import RollUp, roll_up_result, rollup_for


@dataclass(frozen=True)
class RequestOptions:
    """A request's options, checked against one Classifier (`check_request`)."""

    topk: int
    beam_width: int
    temperature: float
    alpha: float
    vocabulary: Vocabulary | None      # None: free decoding
    rollup: RollUp | None              # None: fine labels

    @property
    def decode_key(self) -> tuple:
        """Equal for requests that can share a decoder call. A waiting request holds its
        Vocabulary, so the id cannot be reused by another vocabulary meanwhile."""
        return (id(self.vocabulary), self.beam_width, self.temperature, self.alpha)

    def decode_options(self) -> dict:
        """`Classifier.classify_pixels` keywords that decode with every beam hypothesis kept."""
        return dict(topk=self.beam_width, guided=self.vocabulary is not None, vocab=self.vocabulary,
                    beam_width=self.beam_width, temperature=self.temperature, alpha=self.alpha)

    def finish(self, result: Result) -> Result:
        """A result decoded with `decode_options` -> this request's answer: rolled up, top k."""
        if self.rollup is not None:
            return roll_up_result(result, self.rollup, self.topk)
        result.labels = result.labels[:self.topk]
        return result


def check_request(clf: Classifier, topk: int = 5, guided: bool = True, vocab: Any = None, beam_width: int = 10,
                  temperature: float = 1.0, alpha: float = 0.0, granularity: Any = None) -> RequestOptions:
    """`Classifier.classify`'s options checked as it checks them (one error line each: a
    ClassifierError, or a HierarchyError/BundleError for the granularity), vocabulary and roll-up
    built and cached."""
    rollup = rollup_for(clf.bundle, granularity)
    topk, beam_width, temperature, alpha, vocabulary = clf.check_options(topk, guided, vocab, beam_width,
                                                                         temperature, alpha)
    return RequestOptions(topk, beam_width, temperature, alpha, vocabulary, rollup)


def decode_groups(requests: Sequence[RequestOptions]) -> list[list[int]]:
    """Indices of `requests` grouped by what they need the decoder to do, in arrival order."""
    groups: dict[tuple, list[int]] = {}
    for i, options in enumerate(requests):
        groups.setdefault(options.decode_key, []).append(i)
    return list(groups.values())


def classify_together(clf: Classifier, pixels: np.ndarray, names: Sequence[str],
                      requests: Sequence[RequestOptions]) -> list[Result]:
    """Preprocessed pixels of N requests of one decode group (as `Classifier.classify_pixels` takes
    them) -> their answers, from one encoder + decoder call."""
    results = clf.classify_pixels(pixels, names, **requests[0].decode_options())
    if len(results) != len(requests):
        raise ClassifierError(f"{len(results)} results for {len(requests)} images")
    return [options.finish(result) for options, result in zip(requests, results)]
