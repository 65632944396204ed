"""Greedy, beam and trie-guided beam search over a DecoderSession (torch-free).

Semantics: docs/internals.md "Decoding semantics"; the PyTorch oracle in novic/model/reference.py
implements the same rules by full recomputation and must give identical tokens.

All B images x K beams advance in one session call per position. The host only reads back
O(B x K x k) numbers: the session's top-k (free decoding) or the log-probs of the trie children
of each beam (guided decoding), never a vocabulary-sized row; per-step cost is independent of
the number of nouns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from novic.config import EOS, DecoderConfig
from novic.runtime.trie import TokenTrie

NEG_INF = np.float32(-np.inf)


class Hypothesis(NamedTuple):
    tokens: tuple[int, ...]  # compact ids, without EOS
    logprob: float           # raw beam score: sum of log-probs (fp32 accumulation)
    prob: float              # exp(logprob), not normalised across hypotheses


@dataclass
class StepScores:
    topk_logprobs: np.ndarray  # f32 [N, k], descending, ties lower id first; EOS -inf at prefill
    topk_ids: np.ndarray       # i64 [N, k]
    cand_logprobs: np.ndarray  # f32 [N, G], log-probs of the cand_ids passed in


class DecoderSession(Protocol):
    """A decoder that owns its KV cache (docs/internals.md "Decoder session")."""

    config: DecoderConfig
    topk: int

    def prefill(self, embeds: np.ndarray, temperature: float,
                cand_ids: np.ndarray) -> StepScores: ...

    def step(self, tokens: np.ndarray, position: int, beam_idx: np.ndarray,
             temperature: float, cand_ids: np.ndarray) -> StepScores: ...


def rank_hypotheses(scores, lengths, finished, tokens, alpha: float) -> list[Hypothesis]:
    """Final ranking of one image's beams (in beam order): drop dead (-inf) beams, sort by
    score / n**alpha (n counts the EOS of a finished beam), stable so ties keep beam order."""
    hyps, keys = [], []
    for k in range(len(scores)):
        score = float(scores[k])
        if score == float("-inf"):
            continue
        n = int(lengths[k]) + int(bool(finished[k]))
        hyps.append(Hypothesis(tuple(int(t) for t in tokens[k][:lengths[k]]), score,
                               math.exp(score)))
        keys.append(score / n ** alpha)
    order = sorted(range(len(hyps)), key=lambda i: -keys[i])
    return [hyps[i] for i in order]


def _check(session: DecoderSession, embeds, width: int, temperature: float,
           trie: TokenTrie | None) -> np.ndarray:
    cfg = session.config
    embeds = np.ascontiguousarray(embeds, dtype=np.float32)
    if embeds.ndim != 2 or embeds.shape[1] != cfg.embed_dim:
        raise ValueError(f"embeds must have shape [B, {cfg.embed_dim}], got {embeds.shape}")
    if int(width) != width or width < 1:
        raise ValueError(f"beam width must be a positive integer, got {width}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if trie is None and width > session.topk:
        raise ValueError(f"beam width {width} exceeds the session's top-k {session.topk}: "
                         f"use width <= {session.topk} or export the decoder with a larger top-k")
    if trie is not None:
        if trie.max_token >= cfg.vocab_size:
            raise ValueError(f"noun trie uses token id {trie.max_token} but the decoder "
                             f"vocabulary has {cfg.vocab_size} ids: trie and model do not match")
        if trie.max_len > cfg.max_new_tokens:
            raise ValueError(f"noun trie has a {trie.max_len}-token noun but the decoder emits at "
                             f"most {cfg.max_new_tokens} tokens: trie and model do not match")
    return embeds


def _select(score, done, lp, ids, width):
    """One beam-search selection for B images at once.

    score, done [B, Kp]; lp, ids [B, Kp, G]: each beam's candidates in descending log-prob
    order, ties lower id first, as a top-k returns them (invalid entries -inf, last). Finished
    beams are replaced by their single EOS candidate with log-prob 0. Returns (parent [B,K],
    slot [B,K], new score [B,K], ids) of the `width` best candidates by a stable sort of the
    flattened scores: ties go to the lower beam, then the higher log-prob, then the lower id
    (the oracle's order; exact as long as every beam offers >= width candidates).
    """
    B, Kp, G = lp.shape
    eos_only = np.full(G, NEG_INF, dtype=np.float32)
    eos_only[0] = 0.0
    lp = np.where(done[:, :, None], eos_only, lp)
    ids = np.where(done[:, :, None], EOS, ids)
    cand = (score[:, :, None] + lp).reshape(B, Kp * G)  # fp32, same additions as the oracle
    if Kp * G < width:  # fewer candidates than beams: pad with dead ones
        cand = np.concatenate([cand, np.full((B, width - Kp * G), NEG_INF, np.float32)], 1)
    best = np.argsort(-cand, axis=1, kind="stable")[:, :width]
    new_score = np.take_along_axis(cand, best, 1)
    best = np.minimum(best, Kp * G - 1)  # padding slots are dead; any index will do
    return best // G, best % G, new_score, ids


def beam_search(session: DecoderSession, embeds, width: int = 10, temperature: float = 1.0,
                alpha: float = 0.0, trie: TokenTrie | None = None) -> list[list[Hypothesis]]:
    """Beam search (free, or guided by a noun trie). -> per image, hypotheses best first."""
    embeds = _check(session, embeds, width, temperature, trie)
    cfg = session.config
    B, K, T = len(embeds), int(width), cfg.max_new_tokens
    if B == 0:
        return []
    P = cfg.prefix_len
    rows = np.arange(B)[:, None]

    # Beam state; before the first token every image has one empty, unfinished beam (Kp = 1).
    score = np.zeros((B, 1), np.float32)
    done = np.zeros((B, 1), bool)
    length = np.zeros((B, 1), np.int64)
    tokens = np.zeros((B, 1, T), np.int64)
    node = np.zeros((B, 1), np.int64)  # trie node per beam (guided), -1 = none

    if trie is not None:
        cand_ids, nxt, valid = trie.candidates(node.reshape(-1))
    else:
        cand_ids = np.zeros((B, 1), np.int64)
    out = session.prefill(embeds, float(temperature), cand_ids)

    for t in range(1, T + 1):  # out holds the scores for token t
        Kp = score.shape[1]
        if trie is not None:
            # Trie candidates come in token order: put each beam's in top-k order instead.
            G = cand_ids.shape[1]
            lp = np.where(valid, np.asarray(out.cand_logprobs, np.float32), NEG_INF)
            by_logp = np.argsort(-lp, axis=1, kind="stable")
            lp, ids, nxt = (np.take_along_axis(a, by_logp, 1).reshape(B, Kp, G)
                            for a in (lp, cand_ids, nxt))
        else:
            lp = np.asarray(out.topk_logprobs, np.float32).reshape(B, Kp, -1)
            ids = np.asarray(out.topk_ids, np.int64).reshape(B, Kp, -1)

        parent, slot, score, ids = _select(score, done, lp, ids, K)
        token = ids[rows, parent, slot]
        was_done = done[rows, parent]
        length, tokens = length[rows, parent], tokens[rows, parent]
        grows = ~was_done & (token != EOS)
        tokens[grows, length[grows]] = token[grows]
        length = length + grows
        done = was_done | (token == EOS) | (score == NEG_INF)  # dead beams count as finished
        if trie is not None:
            node = np.where(done, -1, nxt[rows, parent, slot])

        if t == T or done.all():
            break
        beam_idx = (rows * Kp + parent).reshape(-1)  # previous call's row each beam continues
        if trie is not None:
            cand_ids, nxt, valid = trie.candidates(node.reshape(-1))
        else:
            cand_ids = np.zeros((B * K, 1), np.int64)
        out = session.step(token.reshape(-1), P + t - 1, beam_idx, float(temperature), cand_ids)

    return [rank_hypotheses(score[b], length[b], done[b] & (score[b] > NEG_INF), tokens[b], alpha)
            for b in range(B)]


def greedy(session: DecoderSession, embeds, temperature: float = 1.0,
           trie: TokenTrie | None = None) -> list[Hypothesis]:
    """Greedy decoding: argmax of the (trie-masked) log-probs each step, ties lowest id.
    -> one hypothesis per image; the same as beam search of width 1."""
    embeds = _check(session, embeds, 1, temperature, trie)
    cfg = session.config
    B, T, P = len(embeds), cfg.max_new_tokens, cfg.prefix_len
    if B == 0:
        return []
    rows = np.arange(B)
    score = np.zeros(B, np.float32)
    done = np.zeros(B, bool)
    length = np.zeros(B, np.int64)
    tokens = np.zeros((B, T), np.int64)
    node = np.zeros(B, np.int64)

    if trie is not None:
        cand_ids, nxt, valid = trie.candidates(node)
    else:
        cand_ids = np.zeros((B, 1), np.int64)
    out = session.prefill(embeds, float(temperature), cand_ids)
    for t in range(1, T + 1):
        if trie is not None:
            lp = np.where(valid, np.asarray(out.cand_logprobs, np.float32), NEG_INF)
            j = lp.argmax(1)  # first maximum; candidates are in ascending token order
            token, best = cand_ids[rows, j], lp[rows, j]
        else:
            token = np.asarray(out.topk_ids)[:, 0].astype(np.int64)
            best = np.asarray(out.topk_logprobs, np.float32)[:, 0]
        token = np.where(done, EOS, token)
        score = np.where(done, score, score + best)
        grows = ~done & (token != EOS)
        tokens[grows, length[grows]] = token[grows]
        length = length + grows
        done = done | (token == EOS)
        if t == T or done.all():
            break
        if trie is not None:
            node = np.where(done, -1, nxt[rows, j])
            cand_ids, nxt, valid = trie.candidates(node)
        out = session.step(token, P + t - 1, rows, float(temperature), cand_ids)
    return [Hypothesis(tuple(int(x) for x in tokens[b, :length[b]]), float(score[b]),
                       math.exp(float(score[b]))) for b in range(B)]
