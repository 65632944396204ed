"""Reference (oracle) decoding in PyTorch: simple and obviously right, not fast.

Every step recomputes the whole sequence with ObjectDecoder.forward (no KV cache), one image at
a time; beam selection sorts the dense [K, V] candidate matrix, and guided decoding adds a dense
0/-inf mask built from the trie after log-softmax. Semantics: docs/internals.md "Decoding
semantics"; novic/runtime/search.py must give identical tokens. The search rules (greedy_one,
beam_one) take any next-token log-prob function, so tests can also drive them with tables.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from novic.config import EOS
from novic.model.decoder import ObjectDecoder
from novic.runtime.search import Hypothesis
from novic.runtime.trie import TokenTrie

NEG_INF = float("-inf")


def _model_logprobs(model: ObjectDecoder, embed: torch.Tensor, temperature: float):
    """next_logprobs(seqs) for one image: full recomputation of every sequence by forward()."""
    def next_logprobs(seqs: list[list[int]]) -> torch.Tensor:
        t = max(map(len, seqs))  # shorter (finished) sequences: padded, their output is unused
        tokens = torch.tensor([s + [EOS] * (t - len(s)) for s in seqs], dtype=torch.long,
                              device=embed.device).reshape(len(seqs), t)
        logits = model(embed[None].expand(len(seqs), -1), tokens)[:, -1].float()
        return F.log_softmax(logits / temperature, dim=-1)
    return next_logprobs


def _trie_mask(trie: TokenTrie, seqs: list[list[int]], V: int, device) -> torch.Tensor:
    """Dense [len(seqs), V] mask: 0 where the token continues a noun (EOS where one ends)."""
    mask = torch.full((len(seqs), V), NEG_INF, device=device)
    for i, seq in enumerate(seqs):
        node = 0
        for tok in seq:
            node = trie.advance(node, tok) if node >= 0 else -1
        if node < 0:
            continue  # a dead beam's path left the trie: nothing is allowed
        mask[i, trie.children(node)[0].tolist()] = 0.0
        if trie.is_terminal(node):
            mask[i, EOS] = 0.0
    return mask


def _per_image(model: ObjectDecoder, embeds, temperature: float, decode) -> list:
    """Run decode(next_logprobs) for each image, in eval mode and without autograd."""
    device = next(model.parameters()).device
    embeds = torch.as_tensor(embeds, dtype=torch.float32).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [decode(_model_logprobs(model, e, temperature))
                    for e in embeds.reshape(-1, model.cfg.embed_dim)]
    finally:
        model.train(was_training)


def greedy_decode(model: ObjectDecoder, embeds, temperature: float = 1.0,
                  trie: TokenTrie | None = None) -> list[Hypothesis]:
    """Argmax each step (ties: lowest id; EOS forbidden first). -> one hypothesis per image."""
    T = model.cfg.max_new_tokens
    return _per_image(model, embeds, temperature, lambda f: greedy_one(f, T, trie))


def beam_search(model: ObjectDecoder, embeds, width: int = 10, temperature: float = 1.0,
                alpha: float = 0.0, trie: TokenTrie | None = None) -> list[list[Hypothesis]]:
    """Beam search (free, or guided by a noun trie). -> per image, hypotheses best first."""
    T = model.cfg.max_new_tokens
    return _per_image(model, embeds, temperature,
                      lambda f: beam_one(f, T, width, alpha, trie))


# --- the search rules, for one image; next_logprobs(seqs) -> fp32 [len(seqs), V] ----------------
def greedy_one(next_logprobs, max_new_tokens: int, trie: TokenTrie | None = None) -> Hypothesis:
    seq, score = [], torch.zeros(())
    for t in range(max_new_tokens):
        logp = next_logprobs([seq])[0]
        if t == 0:
            logp = logp.index_fill(0, torch.tensor([EOS], device=logp.device), NEG_INF)
        if trie is not None:
            logp = logp + _trie_mask(trie, [seq], logp.shape[-1], logp.device)[0]
        tok = int(torch.argmax(logp))  # first maximum = lowest id
        score = score + logp[tok]
        if tok == EOS:
            break
        seq.append(tok)
    return Hypothesis(tuple(seq), float(score), math.exp(float(score)))


def beam_one(next_logprobs, max_new_tokens: int, width: int, alpha: float = 0.0,
             trie: TokenTrie | None = None) -> list[Hypothesis]:
    seqs: list[list[int]] = [[]]  # content tokens per beam (no EOS)
    finished = [False]
    scores = torch.zeros(1)
    for t in range(max_new_tokens):
        logp = next_logprobs(seqs)
        V = logp.shape[-1]
        if t == 0:
            logp = logp.index_fill(1, torch.tensor([EOS], device=logp.device), NEG_INF)
        if trie is not None:
            logp = logp + _trie_mask(trie, seqs, V, logp.device)
        logp = logp.clone()  # next_logprobs may hand out a view
        scores = scores.to(logp.device)
        done = torch.tensor(finished, device=logp.device)
        logp[done] = NEG_INF
        logp[done, EOS] = 0.0  # a finished beam only "emits" EOS with log-prob 0
        cand = scores[:, None] + logp  # [K, V] fp32
        # Length normalisation (the original release's rule): candidates compete by
        # score * n**-alpha, n = the beam's tokens + the one it adds (a finished beam: + its EOS).
        scale = torch.tensor([float(len(seq) + 1) ** -alpha for seq in seqs], device=logp.device)
        key = cand * scale[:, None] if alpha != 0 else cand
        # Order each beam's candidates by log-prob (stable: ties lower id first), then take a
        # stable sort of all K*V by key: ties go to the lower beam, then the higher log-prob,
        # then the lower id. (Distinct log-probs can round to equal fp32 scores; this order is
        # the one that a per-beam top-k reproduces exactly.)
        by_logp = torch.sort(logp, dim=1, descending=True, stable=True).indices
        key = key.gather(1, by_logp).flatten()
        best = torch.sort(key, descending=True, stable=True).indices[:width]
        parents, toks = (best // V).tolist(), by_logp.flatten()[best].tolist()
        scores = cand.gather(1, by_logp).flatten()[best]
        seqs = [seqs[p] + ([] if finished[p] or tok == EOS else [tok])
                for p, tok in zip(parents, toks)]
        finished = [finished[p] or tok == EOS for p, tok in zip(parents, toks)]
        if all(finished):
            break

    # The beams are in ranking order (the last selection's); dead ones (fewer valid
    # continuations than beams) are dropped.
    return [Hypothesis(tuple(seq), score, math.exp(score))
            for seq, score in zip(seqs, scores.tolist()) if score != NEG_INF]
