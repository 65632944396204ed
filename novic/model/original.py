"""The original release's inference pipeline, re-created as the benchmark baseline.

docs/model.md "Inference in the original release": no KV cache (every step recomputes the whole sequence), a host sync
every step, a dense batch x beams x nouns guide mask, an fp32 decoder, the CLIP text tower loaded
at inference. This module reproduces those costs on purpose, with the same decoding semantics as
novic.model.reference (docs/internals.md), so that benchmarks compare like with like.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from novic.config import EOS
from novic.model.decoder import ObjectDecoder
from novic.runtime.search import Hypothesis


def noun_token_matrix(noun_tokens: list[list[int]], max_tokens: int) -> torch.Tensor:
    """[num_nouns, Cmax] compact tokens, each noun followed by EOS/PAD (= 0)."""
    matrix = torch.zeros(len(noun_tokens), max_tokens, dtype=torch.long)
    for i, seq in enumerate(noun_tokens):
        seq = [t for t in seq if t != EOS]
        if len(seq) <= max_tokens - 1:
            matrix[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        else:
            matrix[i] = -1  # cannot be generated: never allowed
    return matrix


@torch.no_grad()
def original_beam_search(model: ObjectDecoder, embeds: torch.Tensor, noun_matrix: torch.Tensor | None,
                         width: int = 10) -> list[list[Hypothesis]]:
    """Batched beam search recomputing the full sequence each step; guided when noun_matrix."""
    cfg = model.cfg
    device = embeds.device
    B, K, V = embeds.shape[0], width, cfg.vocab_size
    tokens = torch.zeros(B, 1, 0, dtype=torch.long, device=device)     # [B, beams, t]
    scores = torch.zeros(B, 1, device=device)
    finished = torch.zeros(B, 1, dtype=torch.bool, device=device)
    if noun_matrix is not None:
        noun_matrix = noun_matrix.to(device)
        alive = torch.ones(B, 1, noun_matrix.shape[0], dtype=torch.bool, device=device)  # dense
    for t in range(cfg.max_new_tokens):
        beams = tokens.shape[1]
        flat = tokens.reshape(B * beams, t)
        logits = model(embeds.repeat_interleave(beams, 0), flat)[:, -1].float()   # full recompute
        logp = F.log_softmax(logits, dim=-1).view(B, beams, V)
        if t == 0:
            logp[..., EOS] = float("-inf")
        if noun_matrix is not None:
            column = noun_matrix[:, t].clamp(min=0).expand(B, beams, -1)
            allowed = torch.zeros(B, beams, V, device=device)
            allowed.scatter_reduce_(2, column, (alive & (noun_matrix[:, t] >= 0)).float(), "amax")
            logp = logp.masked_fill(allowed == 0, float("-inf"))
        cand = scores[..., None] + logp
        cand = torch.where(finished[..., None], float("-inf"), cand)
        cand[..., EOS] = torch.where(finished, scores, cand[..., EOS])
        flat_cand = cand.reshape(B, beams * V)
        best = torch.sort(flat_cand, dim=1, descending=True, stable=True).indices[:, :K]
        parent, tok = best // V, best % V
        scores = flat_cand.gather(1, best)
        was_finished = finished.gather(1, parent)
        tok = torch.where(was_finished, EOS, tok)
        tokens = torch.cat([tokens.gather(1, parent[..., None].expand(-1, -1, t)), tok[..., None]], 2)
        finished = was_finished | (tok == EOS)
        if noun_matrix is not None:
            alive = alive.gather(1, parent[..., None].expand(-1, -1, alive.shape[2]))
            alive = alive & (noun_matrix[:, t] == tok[..., None])
        if bool(finished.all()):      # host sync every step, as the original
            break
    results = []
    for b in range(B):
        hyps = []
        for k in range(tokens.shape[1]):
            score = float(scores[b, k])
            if score == float("-inf"):
                continue
            seq = tuple(int(x) for x in tokens[b, k] if x != EOS)
            hyps.append(Hypothesis(seq, score, math.exp(score)))
        results.append(sorted(hyps, key=lambda h: -h.logprob))
    return results


class OriginalPipeline:
    """open_clip encode (fp16 autocast on CUDA) + original-style decoding, end to end."""

    def __init__(self, clip_model, decoder: ObjectDecoder, noun_tokens, device="cpu"):
        self.device = torch.device(device)
        self.clip = clip_model.to(self.device).eval()   # whole model: text tower too, as the original
        self.decoder = decoder.to(self.device).eval()
        self.noun_matrix = (noun_token_matrix(noun_tokens, decoder.cfg.max_tokens).to(self.device)
                            if noun_tokens else None)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            feats = self.clip.encode_image(pixels)
        return F.normalize(feats.float(), dim=-1)

    def classify(self, pixels: torch.Tensor, width: int = 10) -> list[list[Hypothesis]]:
        return original_beam_search(self.decoder, self.encode(pixels), self.noun_matrix, width)
