"""Gate of a fused graph variant (novic.export.fused) against the plain fp32 graphs.

The plain fp32 graphs are the reference here (``novic-export check`` holds them to the PyTorch
oracle). Both sides run on onnxruntime's CPU provider, which has kernels for the fused ops:

- image encoder: random pixel batches (batch 1 and batch 3), minimum cosine of the embeddings;
- decoder (prefill + step together): N random unit embeddings; max |log-prob| difference of the
  prefill's top-k and token agreement of greedy, beam and guided beam decoding (the runtime
  search, as ``novic-export check`` does).

fp32 variants must match exactly in tokens (cosine >= 0.99999 for the encoder); fp16 variants
must reach cosine >= 0.999 and agree on the best hypothesis for >= 98 % of the embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from novic.calib.gates import cosine
from novic.export.parity import FP16_COS, FP32_COS, agreement, random_unit_embeddings, search_tokens

FP32_MAX_LOGPROB_ERR = 1e-3
FP16_AGREEMENT = 0.98


@dataclass
class GateResult:
    passed: bool
    numbers: dict = field(default_factory=dict)
    why: str = ""          # the first failed criterion, for the one-line report

    def line(self, what: str) -> str:
        shown = ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.numbers.items())
        return f"fused {what}: {'PASS' if self.passed else 'FAIL (' + self.why + '); not written'} ({shown})"


def gate_encoder(plain_path, fused_path, precision: str, *, seed: int = 0) -> GateResult:
    from novic.runtime.backends.ort import OrtImageEncoder

    plain = OrtImageEncoder(plain_path, provider="cpu")
    fused = OrtImageEncoder(fused_path, provider="cpu")
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((b, 3, *plain.image_size)).astype(np.float32) for b in (1, 3)]
    cos = min(float(cosine(fused(x), plain(x)).min()) for x in batches)
    bar = FP32_COS if precision == "fp32" else FP16_COS
    ok = cos >= bar
    return GateResult(ok, {"min_cosine": cos}, "" if ok else f"cosine {cos:.6f} < {bar}")


def gate_decoder(plain_paths, fused_paths, config, precision: str, *, n: int = 100, width: int = 10,
                 noun_tokens=None, seed: int = 0, reference: dict | None = None) -> GateResult:
    """plain_paths / fused_paths: (prefill, step). `reference`: a dict this function filled on an
    earlier call with the same plain graphs (the fp32 reference is decoded once for both gates)."""
    from novic.runtime.backends.ort import OrtDecoderSession
    from novic.runtime.trie import TokenTrie

    embeds = random_unit_embeddings(n, config.embed_dim, seed)
    trie = TokenTrie(noun_tokens) if noun_tokens else None
    cands = np.zeros((n, 1), np.int64)
    reference = {} if reference is None else reference
    if "tokens" not in reference:
        plain = OrtDecoderSession(*plain_paths, config, provider="cpu")
        reference["prefill"] = plain.prefill(embeds, 1.0, cands)
        reference["tokens"] = search_tokens(plain, embeds, width, trie)
    fused = OrtDecoderSession(*fused_paths, config, provider="cpu")
    ref_scores = reference["prefill"]
    scores = fused.prefill(embeds, 1.0, cands)
    same_ids = scores.topk_ids == ref_scores.topk_ids
    diff = np.abs(scores.topk_logprobs - ref_scores.topk_logprobs)[same_ids]
    err = float(diff.max()) if diff.size else float("inf")
    got = search_tokens(fused, embeds, width, trie)
    lists, best = agreement(got, reference["tokens"])
    numbers = {"max_abs_logprob_err": err, "greedy": lists["greedy"]}
    for kind in ("beam", "guided"):
        if kind in got:
            numbers[f"{kind}_best"], numbers[f"{kind}_lists"] = best[kind], lists[kind]
    if precision == "fp32":
        failed = [k for k, v in numbers.items() if k != "max_abs_logprob_err" and v < 1.0]
        if err > FP32_MAX_LOGPROB_ERR:
            failed.insert(0, f"log-prob error {err:.2g} > {FP32_MAX_LOGPROB_ERR}")
    else:
        failed = [k for k in ("greedy", "beam_best", "guided_best") if numbers.get(k, 1.0) < FP16_AGREEMENT]
    why = "" if not failed else (failed[0] if " " in failed[0] else
                                 f"{failed[0]} agreement {numbers[failed[0]]:.1%} below "
                                 f"{'100%' if precision == 'fp32' else f'{FP16_AGREEMENT:.0%}'}")
    return GateResult(not failed, numbers, why)
