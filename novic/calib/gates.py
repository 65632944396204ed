"""Accuracy gates for a quantised image encoder, measured against the bundle's fp32 graphs on
held-out inputs (never the calibration images):

1. embedding cosine vs the fp32 encoder: mean >= `min_mean_cosine` (0.99); the minimum is reported;
2. top-1 label agreement of the whole pipeline (encoder + the bundle's fp32 decoder, guided beam
   search over the bundle's nouns, beam 10) vs the fp32 pipeline: >= `min_agreement` (97 %).

A variant that misses either gate is not written into the bundle (novic.calib.run).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_MEAN_COSINE = 0.99
MIN_AGREEMENT = 0.97
BEAM_WIDTH = 10


@dataclass
class GateResult:
    passed: bool
    n: int
    cosine_mean: float
    cosine_min: float
    agreement: float | None          # None when the label gate was not run (no nouns and no decoder)
    disagreements: list = field(default_factory=list)   # (name, fp32 label, variant label)
    reasons: list = field(default_factory=list)         # why it failed (empty when passed)
    thresholds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "n_heldout": self.n, "cosine_mean": round(self.cosine_mean, 6),
                "cosine_min": round(self.cosine_min, 6),
                "top1_agreement": None if self.agreement is None else round(self.agreement, 4),
                "thresholds": self.thresholds, "reasons": list(self.reasons)}

    def summary(self) -> str:
        agree = "n/a" if self.agreement is None else f"{self.agreement:.1%}"
        head = "PASS" if self.passed else "FAIL"
        text = (f"{head}: cosine mean {self.cosine_mean:.5f} (min {self.cosine_min:.5f}), top-1 agreement "
                f"{agree} on {self.n} held-out images")
        return text + ("" if self.passed else " - " + "; ".join(self.reasons))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(axis=1) / den
    return np.where(np.isfinite(cos), cos, -1.0)   # a NaN/zero embedding counts as the worst case


def top1_labels(classifier, embeds: np.ndarray, beam_width: int = BEAM_WIDTH, batch: int = 16) -> list[str]:
    """Top-1 label of guided beam search (bundle nouns) for each embedding; '' if none."""
    vocab = classifier.vocabulary(None)
    out = []
    for i in range(0, len(embeds), batch):
        hyps = classifier.decode(np.ascontiguousarray(embeds[i:i + batch], np.float32), vocab, beam_width, 1.0, 0.0)
        out += [classifier._text(h[0].tokens, vocab) if h else "" for h in hyps]
    return out


def run_gates(ref_embeds: np.ndarray, var_embeds: np.ndarray, *, classifier=None, names=None,
              ref_labels: list[str] | None = None, min_mean_cosine: float = MIN_MEAN_COSINE,
              min_agreement: float = MIN_AGREEMENT, beam_width: int = BEAM_WIDTH) -> GateResult:
    """Compare a variant's embeddings with fp32's on the same held-out pixels.

    `classifier`: an fp32 `Classifier` on the bundle (its decoder and vocabulary drive the label
    gate); without one the label gate is skipped and reported as n/a (it then fails the gate,
    since the variant is unchecked end to end)."""
    n = len(ref_embeds)
    names = list(names) if names is not None else [f"heldout{i}" for i in range(n)]
    cos = cosine(ref_embeds, var_embeds)
    result = GateResult(True, n, float(cos.mean()), float(cos.min()), None,
                        thresholds={"min_mean_cosine": min_mean_cosine, "min_top1_agreement": min_agreement,
                                    "beam_width": beam_width})
    if not result.cosine_mean >= min_mean_cosine:
        result.reasons.append(f"mean embedding cosine {result.cosine_mean:.5f} < {min_mean_cosine} "
                              f"(min {result.cosine_min:.5f})")
    if classifier is not None:
        ref = ref_labels if ref_labels is not None else top1_labels(classifier, ref_embeds, beam_width)
        ok = np.isfinite(var_embeds).all(axis=1)
        var = top1_labels(classifier, np.where(ok[:, None], var_embeds, 0.0), beam_width)
        var = [v if good else "<non-finite embedding>" for v, good in zip(var, ok)]
        same = [r == v for r, v in zip(ref, var)]
        result.agreement = float(np.mean(same))
        result.disagreements = [(nm, r, v) for nm, r, v, s in zip(names, ref, var, same) if not s]
        if not result.agreement >= min_agreement:
            ex = ", ".join(f"{nm}: {r!r} -> {v!r}" for nm, r, v in result.disagreements[:3])
            result.reasons.append(f"top-1 label agreement {result.agreement:.1%} < {min_agreement:.0%} "
                                  f"({len(result.disagreements)}/{n} changed, e.g. {ex})")
    else:
        result.reasons.append("label gate not run (no fp32 classifier)")
    result.passed = not result.reasons
    return result
