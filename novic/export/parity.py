"""How closely two implementations of a bundle's decoder agree, measured the same way by
``novic-export check`` (the bundle's graphs against the PyTorch decoder) and by the gate of the
fused graphs (novic.export.fused_gate: fused against plain graphs).

Both decode the same random unit embeddings with the runtime's search (novic.runtime.search),
greedy, beam and, with a noun trie, guided beam, and compare the token sequences image by image:
whole hypothesis lists and best hypotheses. The image encoders' cosine bars live here too.
"""
from __future__ import annotations

import numpy as np

FP32_COS, FP16_COS = 0.99999, 0.999   # minimum cosine of an fp32 / fp16 image encoder's embeddings

Tokens = tuple[int, ...]


def random_unit_embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """`n` random directions in the embedding space, float32 [n, dim], each of unit length (the
    image encoder's output is L2-normalised)."""
    embeds = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    return embeds


def token_lists(hyps_per_image) -> list[list[Tokens]]:
    """Each image's hypotheses (objects with `.tokens`), best first -> their token tuples."""
    return [[tuple(h.tokens) for h in hyps] for hyps in hyps_per_image]


def search_tokens(session, embeds: np.ndarray, width: int, trie=None) -> dict[str, list[list[Tokens]]]:
    """Decode `embeds` over a DecoderSession -> {"greedy", "beam" and, with `trie`, "guided": per
    image its hypotheses' token tuples, best first} (greedy: a list of one)."""
    from novic.runtime import search

    out = {"greedy": [[tuple(h.tokens)] for h in search.greedy(session, embeds)],
           "beam": token_lists(search.beam_search(session, embeds, width=width))}
    if trie is not None:
        out["guided"] = token_lists(search.beam_search(session, embeds, width=width, trie=trie))
    return out


def agreement(got: dict, ref: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Two `search_tokens` results -> (lists, best): per search, the fraction of images whose
    hypothesis lists are identical, and whose best hypotheses are."""
    lists = {k: float(np.mean([a == b for a, b in zip(got[k], ref[k])])) for k in got}
    best = {k: float(np.mean([a[:1] == b[:1] for a, b in zip(got[k], ref[k])])) for k in got}
    return lists, best
