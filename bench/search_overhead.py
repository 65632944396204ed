"""Host-side cost of novic.runtime.search: beam search over a fake decoder that costs ~nothing.

The fake DecoderSession returns precomputed log-prob tables (a row per (history hash); top-k
sorted once up front; cand_logprobs by one gather), and the time spent inside it is subtracted,
so what is left is search.py's own numpy work per image: building the trie candidates, selecting
beams, reordering the beam state, ranking the hypotheses.

Paper configuration: V = 5,330, Cmax = 12, 11,897 synthetic nouns (novic.bench.setup), width 10.
The implementation before the optimisation (commit 4d8071e) is kept below as OLD, so one run
measures both and checks that they return identical hypotheses. "cand I/O" is what the candidate
arrays cost a GPU backend per image: cand_ids (int64, to the device) plus cand_logprobs (fp32,
back to the host), summed over the prefill and the steps; the new search pads step t to the
widest row at that depth (TokenTrie.depth_candidates[t]), trading some of this for shapes that
are the same for every batch.

    python bench/search_overhead.py                 # B in 1 8 32 256, free and guided
    python bench/search_overhead.py --batches 1 256 --markdown
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import sys
import time

import numpy as np

from novic.bench.setup import CONFIGS, synthetic_nouns
from novic.config import EOS, DecoderConfig
from novic.runtime import search
from novic.runtime.search import Hypothesis, StepScores
from novic.runtime.trie import TokenTrie


# ---- the fake session ------------------------------------------------------------------------
class FakeSession:
    """A DecoderSession over a fixed random log-prob table: the row of a call's row n is a hash of
    the beam's history (the previous row along beam_idx and the token fed), so results depend on
    the path like a real decoder's. Top-k is sorted once at construction (stable descending,
    EOS excluded at the prefill). `elapsed` accumulates the time spent inside the calls."""

    drops_finished_rows = True   # like onnxruntime on the CPU: search steps only unfinished beams

    def __init__(self, cfg: DecoderConfig, topk: int = 10, rows: int = 1024, seed: int = 0):
        rng = np.random.default_rng(seed)
        V = cfg.vocab_size
        logits = 3.0 * rng.standard_normal((rows, V), dtype=np.float32)
        logits[:, EOS] = rng.uniform(0.0, 14.0, rows)  # EOS wins sometimes: beams finish
        m = logits.max(1, keepdims=True)
        lse = m + np.log(np.exp(logits - m).sum(1, keepdims=True))
        self.table = (logits - lse).astype(np.float32)
        self.first = self.table.copy()
        self.first[:, EOS] = -np.inf
        self.top = [(np.take_along_axis(t, o, 1), o) for t in (self.first, self.table)
                    for o in [np.argsort(-t, axis=1, kind="stable")[:, :topk]]]
        self.config, self.topk, self.rows = cfg, topk, rows
        self.elapsed, self.calls = 0.0, 0
        self.widths: list[int] = []
        self.cand_bytes = 0

    def _out(self, which, state, cand_ids):
        lp, ids = self.top[which]
        table = self.first if which == 0 else self.table
        out = StepScores(lp[state], ids[state], table[state[:, None], cand_ids])
        self.widths.append(cand_ids.shape[1])
        self.cand_bytes += cand_ids.size * (8 + 4)  # cand_ids in (i64), cand_logprobs out (f32)
        return out

    def prefill(self, embeds, temperature, cand_ids):
        t0 = time.perf_counter()
        h = np.ascontiguousarray(embeds[:, :4], np.float32).view(np.uint32).astype(np.int64)
        self.state = (h.sum(1) * 2654435761) % self.rows
        out = self._out(0, self.state, cand_ids)
        self.elapsed += time.perf_counter() - t0
        self.calls += 1
        return out

    def step(self, tokens, position, beam_idx, temperature, cand_ids):
        t0 = time.perf_counter()
        self.state = (self.state[beam_idx] * 1_000_003 + tokens * 7919 + position) % self.rows
        out = self._out(1, self.state, cand_ids)
        self.elapsed += time.perf_counter() - t0
        self.calls += 1
        return out


# ---- the implementation before the optimisation (4d8071e), for the same-run comparison -------
NEG_INF = np.float32(-np.inf)


def old_candidates(trie, nodes):
    nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
    if nodes.size and (nodes.max() >= trie.num_nodes or nodes.min() < -1):
        raise IndexError("trie node out of range")
    live = nodes >= 0
    safe = np.where(live, nodes, 0)
    term = trie._terminal[safe] & live
    lo = trie._offsets[safe]
    nkids = np.where(live, trie._offsets[safe + 1] - lo, 0)
    counts = nkids + term
    G = max(1, int(counts.max(initial=0)))
    j = np.arange(G)[None, :]
    valid = j < counts[:, None]
    is_eos = (j == 0) & term[:, None]
    kid = valid & ~is_eos
    edge = np.where(kid, lo[:, None] + j - term[:, None], 0)
    token_ids = np.where(kid, trie._tokens[edge], EOS)
    next_nodes = np.where(kid, trie._nodes[edge], np.where(is_eos, nodes[:, None], -1))
    return token_ids, next_nodes, valid


def old_rank_hypotheses(scores, lengths, finished, tokens, alpha):
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


def old_select(score, done, lp, ids, width):
    B, Kp, G = lp.shape
    eos_only = np.full(G, NEG_INF, dtype=np.float32)
    eos_only[0] = 0.0
    lp = np.where(done[:, :, None], eos_only, lp)
    ids = np.where(done[:, :, None], EOS, ids)
    cand = (score[:, :, None] + lp).reshape(B, Kp * G)
    if Kp * G < width:
        cand = np.concatenate([cand, np.full((B, width - Kp * G), NEG_INF, np.float32)], 1)
    best = np.argsort(-cand, axis=1, kind="stable")[:, :width]
    new_score = np.take_along_axis(cand, best, 1)
    best = np.minimum(best, Kp * G - 1)
    return best // G, best % G, new_score, ids


def old_beam_search(session, embeds, width=10, temperature=1.0, alpha=0.0, trie=None):
    embeds = search._check(session, embeds, width, temperature, trie)
    cfg = session.config
    B, K, T = len(embeds), int(width), cfg.max_new_tokens
    if B == 0:
        return []
    P = cfg.prefix_len
    rows = np.arange(B)[:, None]
    score = np.zeros((B, 1), np.float32)
    done = np.zeros((B, 1), bool)
    length = np.zeros((B, 1), np.int64)
    tokens = np.zeros((B, 1, T), np.int64)
    node = np.zeros((B, 1), np.int64)
    if trie is not None:
        cand_ids, nxt, valid = old_candidates(trie, node.reshape(-1))
    else:
        cand_ids = np.zeros((B, 1), np.int64)
    out = session.prefill(embeds, float(temperature), cand_ids)
    for t in range(1, T + 1):
        Kp = score.shape[1]
        if trie is not None:
            G = cand_ids.shape[1]
            lp = np.where(valid, np.asarray(out.cand_logprobs, np.float32), NEG_INF)
            by_logp = np.argsort(-lp, axis=1, kind="stable")
            lp, ids, nxt = (np.take_along_axis(a, by_logp, 1).reshape(B, Kp, G)
                            for a in (lp, cand_ids, nxt))
        else:
            lp = np.asarray(out.topk_logprobs, np.float32).reshape(B, Kp, -1)
            ids = np.asarray(out.topk_ids, np.int64).reshape(B, Kp, -1)
        parent, slot, score, ids = old_select(score, done, lp, ids, K)
        token = ids[rows, parent, slot]
        was_done = done[rows, parent]
        length, tokens = length[rows, parent], tokens[rows, parent]
        grows = ~was_done & (token != EOS)
        tokens[grows, length[grows]] = token[grows]
        length = length + grows
        done = was_done | (token == EOS) | (score == NEG_INF)
        if trie is not None:
            node = np.where(done, -1, nxt[rows, parent, slot])
        if t == T or done.all():
            break
        beam_idx = (rows * Kp + parent).reshape(-1)
        if trie is not None:
            cand_ids, nxt, valid = old_candidates(trie, node.reshape(-1))
        else:
            cand_ids = np.zeros((B * K, 1), np.int64)
        out = session.step(token.reshape(-1), P + t - 1, beam_idx, float(temperature), cand_ids)
    return [old_rank_hypotheses(score[b], length[b], done[b] & (score[b] > NEG_INF), tokens[b],
                                alpha) for b in range(B)]


# ---- measurement -----------------------------------------------------------------------------
IMPLS = {"old": old_beam_search, "new": search.beam_search}


def load_search(path: str):
    """beam_search of a copy of novic/runtime/search.py kept elsewhere (an earlier revision:
    `git show REV:novic/runtime/search.py > FILE`); it runs on the current TokenTrie."""
    spec = importlib.util.spec_from_file_location("baseline_search", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.beam_search


def run_once(fn, session, embeds, width, trie):
    """-> (host seconds, session seconds, results, widths per call, candidate bytes moved)."""
    session.elapsed, session.widths, session.cand_bytes = 0.0, [], 0
    t0 = time.perf_counter()
    res = fn(session, embeds, width, trie=trie)
    wall = time.perf_counter() - t0
    return wall - session.elapsed, session.elapsed, res, list(session.widths), session.cand_bytes


def measure(impls, cfg, embeds, width, trie, repeats):
    """-> {name: (host ms per image, session ms per image, results, widths per call, candidate
    bytes per image)}. The implementations take turns, repeat after repeat, so load changes on
    the shared machine hit them alike; each keeps its minimum (its least disturbed run)."""
    B, best = len(embeds), {}
    sessions = {name: FakeSession(cfg, topk=max(10, width)) for name in impls}
    for _ in range(repeats):
        for name in impls:
            got = run_once(IMPLS[name], sessions[name], embeds, width, trie)
            if name not in best or got[0] < best[name][0]:
                best[name] = got
    return {name: (1e3 * h / B, 1e3 * i / B, res, widths, nbytes / B)
            for name, (h, i, res, widths, nbytes) in best.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 256])
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--images", type=int, default=512,
                    help="images per measurement (repeats = max(5, images // B))")
    ap.add_argument("--impls", nargs="+", default=["old", "new"],
                    choices=[*IMPLS, "baseline"], help="baseline: the --baseline FILE")
    ap.add_argument("--baseline", metavar="FILE", help="a copy of an earlier search.py")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)
    if "baseline" in args.impls:
        if not args.baseline:
            ap.error("--impls baseline needs --baseline FILE")
        IMPLS["baseline"] = load_search(args.baseline)

    pc = CONFIGS["paper"]
    cfg = DecoderConfig(embed_dim=pc.embed_dim, vocab_size=pc.vocab_size, max_tokens=pc.max_tokens)
    t0 = time.perf_counter()
    trie = TokenTrie(synthetic_nouns(pc.nouns, pc.vocab_size, cfg.max_new_tokens))
    build_ms = 1e3 * (time.perf_counter() - t0)
    root_g = trie.candidates(np.zeros(1, np.int64))[0].shape[1]
    print(f"# paper config: V={cfg.vocab_size}, Cmax={cfg.max_tokens}, {trie.num_sequences} nouns, "
          f"{trie.num_nodes} trie nodes (built in {build_ms:.0f} ms), root G={root_g}, "
          f"G per depth {trie.depth_candidates.tolist()}, width {args.width}; "
          f"python {platform.python_version()}, numpy {np.__version__}", file=sys.stderr)
    rng = np.random.default_rng(0)
    rows = []
    for B in args.batches:
        embeds = rng.standard_normal((B, cfg.embed_dim)).astype(np.float32)
        repeats = max(5, args.images // B)
        for mode, guide in (("free", None), ("guided", trie)):
            got = measure(args.impls, cfg, embeds, args.width, guide, repeats)
            same = ""
            if len(got) > 1:
                ref = next(iter(got.values()))[2]
                same = "yes" if all(v[2] == ref for v in got.values()) else "NO"
            rows.append((B, mode, {k: v[:2] for k, v in got.items()},
                         {k: v[3] for k, v in got.items()}, same,
                         {k: v[4] for k, v in got.items()}))
            line = " ".join(f"{k}={v[0]:.3f}" for k, v in got.items())
            print(f"B={B:4d} {mode:6s} host ms/image: {line}  identical={same or '-'}  "
                  f"G per call: " + "; ".join(f"{k} {v[3]}" for k, v in got.items()),
                  file=sys.stderr, flush=True)

    if args.markdown:
        names = args.impls
        slower = [n for n in names if n != "new"] if "new" in names else []  # speed-ups of new
        head = "| B | search | " + " | ".join(f"{n} host ms/img" for n in names)
        head += "".join(f" | {n} / new" for n in slower)
        head += " | identical | " + " | ".join(f"{n} cand I/O KB/img" for n in names) + " |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for B, mode, t, _, same, io in rows:
            cells = [f"{t[n][0]:.3f}" for n in names]
            cells += [f"{t[n][0] / t['new'][0]:.1f}x" for n in slower]
            cells.append(same or "-")
            cells += [f"{io[n] / 1024:.1f}" for n in names]
            print(f"| {B} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
