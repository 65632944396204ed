"""Greedy, beam and trie-guided beam search over a DecoderSession (torch-free).

Semantics: docs/internals.md "Decoding semantics"; the PyTorch oracle in novic/model/reference.py
implements the same rules by full recomputation and must give identical tokens.

All B images x K beams advance in one session call per position; where the session allows it,
only unfinished beams' rows are stepped (a finished beam needs no decoder; see beam_search). The
host only reads back O(B x K x k) numbers: the session's top-k (free decoding) or the log-probs
of the trie children of each beam (guided decoding), never a vocabulary-sized row; per-step cost
is independent of the number of nouns.

Host cost (bench/search_overhead.py, bench/host_per_step.py): every step is a fixed number of
vectorised numpy calls over B x K rows; trie candidates are gathered from the trie's flat per-node
rows and only the entries of the rows in use are touched (per-row top-K by a partition, never a
[rows, widest row] sort). Late in a noun, where every row has at most K candidates (one, mostly:
the next token is forced), a step skips the per-row top-K: one sort of all candidates' keys
(`_narrow_step`); at batch 1 that is what keeps the host's work per step small. One or two rows
wider than K (a beam at a wide node) join that sort with their own top-K, and the step after the
prefill, where every image has one beam at the root, is the root's top-K alone (`_first_step`).
At these sizes each numpy call's fixed cost (about 1 us) is most of the work, so the short paths
count calls: array methods rather than np.* wrappers, cached aranges, no gathers where every row
ran.

Guided steps pad cand_ids to one width per search (`TokenTrie.depth_candidates[t]` at step t;
the prefill uses the root's row), so a session that is given every row sees the same shapes for
every batch (CUDA graphs can be replayed). The cand_ids array handed to `session.step` may be
reused (rewritten) by the next step: a session must copy what it keeps.
"""
from __future__ import annotations

import functools
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
    # Optional `drops_finished_rows: bool` (absent = False): True lets search step only the rows
    # of unfinished beams (`_Rows`); a session whose replays need fixed row counts leaves it out.

    def prefill(self, embeds: np.ndarray, temperature: float,
                cand_ids: np.ndarray) -> StepScores: ...

    def step(self, tokens: np.ndarray, position: int, beam_idx: np.ndarray,
             temperature: float, cand_ids: np.ndarray) -> StepScores: ...


def length_scales(alpha: float, max_new_tokens: int) -> np.ndarray:
    """f32 [max_new_tokens + 2]: entry n is n**-alpha, the factor on the score of a candidate whose
    beam has n - 1 tokens (n counts the token it adds, or the EOS of a finished beam).
    Python's float power, as the oracle computes it, so both round the same."""
    return np.array([1.0] + [float(n) ** -alpha for n in range(1, max_new_tokens + 2)], np.float32)


def _rank(scores: list, lengths: list, tokens: list) -> list[Hypothesis]:
    """One image's beams, which the search keeps best first, without the dead (-inf) ones."""
    return [Hypothesis(tuple(seq[:n]), score, math.exp(score))
            for score, n, seq in zip(scores, lengths, tokens) if score != float("-inf")]


def _results(score, length, tokens) -> list[list[Hypothesis]]:
    """_rank for every image, with one host conversion of each array."""
    return [_rank(*per_image) for per_image in zip(score.tolist(), length.tolist(), tokens.tolist())]


def _check(session: DecoderSession, embeds, width: int, temperature: float,
           trie: TokenTrie | None) -> np.ndarray:
    cfg = session.config
    if not _on_device(embeds):
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
    if len(embeds.shape) != 2 or embeds.shape[1] != cfg.embed_dim:
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


def _on_device(embeds) -> bool:
    """Embeddings that a backend left on its device (`on_device = True`, `.shape`, `len()`, e.g.
    ort's `DeviceEmbeddings`): handed to the session's prefill as they are, never read here."""
    return getattr(embeds, "on_device", False) is True


_U32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_NAN_KEY = np.uint32(0xFFFFFFFF)
_SMALL = 8192  # up to this many values (rows narrower than _WIDE) a stable argsort is fastest
_WIDE = 256     # rows this wide: _best_columns's threshold partition; narrower: packed keys
_FEW_WIDE = 2   # up to this many rows wider than the beam: _narrow_step, each row on its own
_DENSE = 4096   # cand_ids of up to this many entries (rows x width): one dense gather
_ROW_BY_ROW = 16  # else, up to this many rows: a slice copy per row (fewer calls than a scatter)


def _desc_key(x: np.ndarray) -> np.ndarray:
    """f32 -> u32 whose ascending order is x descending (-0 = +0; NaN last, as np.argsort(-x))."""
    b = (x + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 = +0.0
    key = np.where(b >> np.uint32(31), b, np.uint32(0x7FFFFFFF) - b)
    nan = np.isnan(x)
    if nan.any():
        key[nan] = _NAN_KEY
    return key


def _best_columns(values: np.ndarray, k: int) -> np.ndarray:
    """values f32 [n, w], w >= k -> columns i64 [n,k] of the k first entries of a stable
    descending sort of each row (ties to the lower column, -0 = +0, NaN last).

    Small inputs: np.argsort. Wide rows (the root's or a wide node's candidates): a partition
    finds each row's k-th largest value; the entries >= it (the k best and their ties, NaN
    never) are few, and a stable sort of those alone, in column order, gives the same first k.
    Else (many rows, or rows with fewer than k non-NaN values): each value and its column packed
    in one u64 key (unique per row), a partition for the k smallest keys and a sort of those k:
    the same order again."""
    n, w = values.shape
    if w <= 2 * k or (values.size <= _SMALL and w < _WIDE):
        col = np.argsort(-values, axis=1, kind="stable")
        return col[:, :k] if w > k else col
    if w >= _WIDE:
        if n == 1:  # one row (the root's at batch 1, one wide node's): no row bookkeeping
            col = _best_of_row(values[0], k)
            if col is not None:
                return col[None]
        neg = -values  # ascending order of neg = descending order of values; NaN stays last
        kth = np.partition(neg, k - 1, axis=1)[:, k - 1:k]
        if not np.isnan(kth).any():
            row, at = np.nonzero(neg <= kth)  # row by row, columns ascending
            order = np.lexsort((neg[row, at], row))  # stable: ties keep the lower column first
            per_row = np.bincount(row, minlength=n)  # >= k each
            first = np.cumsum(per_row) - per_row
            return at[order[first[:, None] + np.arange(k)]]
    keys = (_desc_key(values).astype(np.uint64) << _SHIFT) | np.arange(w, dtype=np.uint64)
    keys = np.sort(np.partition(keys, k - 1, axis=1)[:, :k], axis=1)
    return (keys & _U32).astype(np.int64)


def _best_of_row(values: np.ndarray, k: int) -> np.ndarray | None:
    """_best_columns of one row f32 [w], w > k: the entries >= the k-th largest (a partition)
    hold the k best and their ties, and a stable sort of those few in column order gives the
    same first k. None where fewer than k entries qualify (NaN: it compares false; left to the
    packed keys). Array methods rather than the np.* wrappers: on rows this short, the calls'
    overhead is most of the cost."""
    at = len(values) - k
    kth = values.copy()
    kth.partition(at)
    at = (values >= kth[at:at + 1]).nonzero()[0]
    if len(at) < k:
        return None
    return at[(-values[at]).argsort(kind="stable")[:k]]


def _best(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """_best_columns, and the values there: (columns i64 [n,k], values f32 [n,k])."""
    n, w = values.shape
    col = _best_columns(values, k)
    if n == 1:  # one row (the root's at batch 1, a wide node's): per step, each numpy call counts
        return col, values[0][col]
    return col, values.reshape(-1)[col + np.arange(0, n * w, w)[:, None]]  # take_along_axis


def _top_rows(cl: np.ndarray, count: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row n, the k best of the first count[n] values of cl [N, G] in top-k order (log-prob
    descending, ties to the lower column). -> (log-probs f32 [N,k], columns i64 [N,k]); missing
    entries have log-prob -inf and a column >= count[n].

    Rows are handled in groups of similar width (<= k, <= 4k, <= 16k, ...), so the work is
    O(sum of counts), not O(N x widest row)."""
    N, G = cl.shape
    narrowest, widest = (int(count.min()), int(count.max())) if N else (0, 0)
    widths = [k]  # the groups' widths, up to the widest row's
    while widths[-1] < widest:
        widths.append(4 * widths[-1])
    if len(widths) == 1 or narrowest > widths[-2]:  # every row is in the last group
        return _top_block(cl, count, None, min(widths[-1], G), k, narrowest)
    lp, col = np.empty((N, k), np.float32), np.empty((N, k), np.int64)
    group = np.searchsorted(widths, count)  # the first width >= count
    for j in np.flatnonzero(np.bincount(group)).tolist():
        rows = np.flatnonzero(group == j)
        if j and len(rows) <= 2:  # one or two wide rows: each its own length, no mask, no copy
            for r in rows.tolist():
                c, v = _best(cl[r:r + 1, :count[r]], k)
                lp[r], col[r] = v[0], c[0]
        else:
            lp[rows], col[rows] = _top_block(cl, count, rows, min(widths[j], G), k, 0)
    return lp, col


def _top_block(cl, count, rows, g, k, narrowest):
    """_top_rows of `rows` (None: all), all of which have at most g <= G candidates."""
    sub = cl[:, :g] if rows is None else cl[rows, :g]
    if narrowest < g:  # (else every row fills all g columns)
        cnt = count[:, None] if rows is None else count[rows, None]
        sub = np.where(np.arange(g) < cnt, sub, NEG_INF)
    if g < k:  # fewer columns than k: dead padding
        sub = np.concatenate([sub, np.full((len(sub), k - g), NEG_INF, np.float32)], 1)
    col, lp = _best(sub, k)
    return lp, col


class _Guide:
    """The trie candidates of the rows of one search: cand_ids for the session (the root's row at
    the prefill, then the trie's widest row at that depth, in buffers rewritten in place), the
    per-row top-k of the log-probs that come back, and the token / next node of a pick.

    `k` is how many candidates a beam keeps (the beam width): rows with more are "wide"."""

    def __init__(self, trie: TokenTrie, k: int):
        self.trie, self.k = trie, k
        self.depth = 0        # tokens generated so far = trie depth of every live beam
        self.bufs = {}        # (N, G) -> [cand_ids buffer, what was written last time]

    def first(self, rows: int) -> np.ndarray:
        """Every row at the root: its candidate row, repeated (no gather needed)."""
        self.depth = 0
        self._rows(np.zeros(rows, np.int64))
        buf = np.empty((rows, len(self.trie.root_tokens)), np.int64)
        buf[:] = self.trie.root_tokens
        return buf

    def next(self, nodes: np.ndarray) -> np.ndarray:
        t = self.trie
        self.depth += 1
        widths = t.depth_candidates
        N, G = len(nodes), max(1, int(widths[self.depth]) if self.depth < len(widths) else 1)
        start, count = self._rows(nodes)
        if self.widest <= 1:  # every row's candidate is forced: the cand_ids are one gather
            token = t.row_token[nodes]  # node -1: 0
            if G == 1:
                return token.reshape(N, 1)
            buf = np.zeros((N, G), np.int64)
            buf[:, 0] = token
            return buf
        if N * G <= _DENSE:
            return self._dense(start, count, G)
        entry = self.bufs.get((N, G))
        if entry is None:
            entry = self.bufs[N, G] = [np.zeros((N, G), np.int64), None]
        fill = self._fill_row_by_row if N <= _ROW_BY_ROW else self._fill_flat
        entry[1] = fill(entry[0], start, count, entry[1])
        return entry[0]

    def _rows(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the candidates of each row's node are (node -1: none), the widest row, and the
        rows wider than k. -> (start, count)."""
        t = self.trie
        self.start, self.count = t.row_start[nodes], t.row_count[nodes]
        self.widest = int(self.count.max())
        self.wide = (self.count > self.k).nonzero()[0] if self.widest > self.k else ()
        return self.start, self.count

    def _dense(self, start, count, G: int) -> np.ndarray:
        """Few entries in all (narrow rows): every row's G columns gathered, padding masked."""
        j = _arange(G)
        token = self.trie.cand_tokens.take(start[:, None] + j, mode="clip")  # past the end: masked
        return np.where(j < count[:, None], token, 0)

    def _fill_row_by_row(self, buf, start, count, written):
        """Few wide rows: one slice copy per row (a memcpy each), and the stale tail of the row
        from the last time zeroed. -> what to zero next time (each row's count)."""
        tokens, count = self.trie.cand_tokens, count.tolist()
        for r, (s, c) in enumerate(zip(start.tolist(), count)):
            buf[r, :c] = tokens[s:s + c]
            if written is not None and written[r] > c:
                buf[r, c:written[r]] = 0
        return count

    def _fill_flat(self, buf, start, count, written):
        """Many rows: every row's entries in one scatter, and last time's zeroed first.
        -> the flat positions written."""
        flat = buf.reshape(-1)
        N, G = buf.shape
        if written is not None:
            flat[written] = 0
        total = int(count.sum())
        at = np.arange(total, dtype=np.int64)
        first = np.cumsum(count) - count  # where each row's entries begin in `at`
        pos = np.repeat(np.arange(0, N * G, G, dtype=np.int64) - first, count) + at
        flat[pos] = self.trie.cand_tokens[np.repeat(start - first, count) + at]
        return pos

    def top(self, cand_logprobs, k: int):
        """-> (log-probs f32 [N,k], columns [N,k]) of each row's k best candidates."""
        return _top_rows(np.asarray(cand_logprobs, np.float32), self.count, k)

    def pick_narrow(self, row, col, done):
        """pick for _narrow_step: candidate `col` (None: the first) of `row` where the beam is
        live (EOS where done). Where the beam is dead (-inf), `col` may be no candidate of `row`,
        or `row` -1: its token and node are then some other row's (clipped to the arrays), never
        used."""
        at, t = self.start[row] if col is None else self.start[row] + col, self.trie
        token = np.where(done, EOS, t.cand_tokens.take(at, mode="clip"))
        return token, t.cand_next.take(at, mode="clip")

    def pick(self, row, col, done):
        """Token and next node of candidate `col` of `row` (EOS where done or not a candidate)."""
        ok = (col < self.count[row]) & ~done
        at = np.where(ok, self.start[row] + col, 0)
        return np.where(ok, self.trie.cand_tokens[at], EOS), self.trie.cand_next[at]


@functools.lru_cache(maxsize=64)
def _arange(n: int) -> np.ndarray:
    """np.arange(n), read-only and made once: per step, each numpy call counts."""
    a = np.arange(n)
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=64)
def _beam_of(B: int, Kp: int, W: int) -> np.ndarray:
    """[B, Kp x W]: the beam (b x Kp + p) of each of W candidates per beam, image by image."""
    beam = (np.arange(B * Kp * W) // W).reshape(B, Kp * W)
    beam.setflags(write=False)
    return beam


@functools.lru_cache(maxsize=None)
def _eos_row(width: int) -> np.ndarray:
    """A finished beam's candidate row: EOS (column 0) with log-prob 0, nothing else."""
    row = np.full(width, NEG_INF, np.float32)
    row[0] = 0.0
    row.setflags(write=False)
    return row


def _select(score, done, lp, width, scale=None):
    """One beam-search selection for B images at once.

    score, done [B, Kp]; lp [B, Kp, G]: each beam's candidates in descending log-prob order,
    ties lower id first, as a top-k returns them (invalid entries -inf, last). Finished beams
    are replaced by their single EOS candidate (slot 0) with log-prob 0. `scale` [B, Kp] (length
    normalisation, None = 1): each beam's candidates compete by score x scale. Returns (src
    [B*K]: the beam each new beam continues, flat over B x Kp; slot [B*K]; new score [B,K]) of
    the `width` best candidates by a stable sort of the flattened keys: ties go to the lower
    beam, then the higher log-prob, then the lower id (the oracle's order; exact as long as
    every beam offers >= width candidates, or at least its best `width`: a beam's later
    candidates never come before its earlier ones, since its scale is positive).
    """
    B, Kp, G = lp.shape
    if done.any():
        lp = np.where(done[:, :, None], _eos_row(G), lp)
    n = Kp * G
    cand = (score[:, :, None] + lp).reshape(B, n)  # fp32, same additions as the oracle
    key = cand if scale is None else (cand.reshape(B, Kp, G) * scale[:, :, None]).reshape(B, n)
    if n < width:  # fewer candidates than beams: pad with dead ones (after every real one)
        key = np.concatenate([key, np.full((B, width - n), NEG_INF, np.float32)], 1)
    best = _best_columns(key, width)
    if n < width:
        best = np.minimum(best, n - 1)  # padding slots are dead; any index will do
    best += np.arange(0, B * n, n)[:, None]  # flat over the B images' candidates
    new_score = cand.reshape(-1)[best]
    if n < width:
        new_score[:, n:] = NEG_INF
    src, slot = np.divmod(best.reshape(-1), G)  # image b's beam p is src b * Kp + p
    return src, slot, new_score


class _Rows:
    """Which beams (or images) the last session call ran, in its row order, so that a search steps
    only the unfinished ones: a finished beam only ever appends EOS with log-prob 0 and needs no
    decoder. Only for sessions that say `drops_finished_rows = True`; others get every row."""

    def __init__(self, session: DecoderSession, n: int):
        self.drop = bool(getattr(session, "drops_finished_rows", False))
        self.ran = np.arange(n, dtype=np.int64)

    def spread(self, n: int, values: np.ndarray, fill) -> np.ndarray:
        """values [len(ran), ...] from the last call -> [n, ...], `fill` where a row did not run."""
        if len(self.ran) == n:
            return values
        out = np.full((n, *values.shape[1:]), fill, values.dtype)
        out[self.ran] = values
        return out

    def row_of(self, n: int) -> np.ndarray:
        """Where each of n beams sits in the last call's outputs and cache (-1: not run)."""
        if len(self.ran) == n:   # every beam ran: ran is arange(n)
            return self.ran
        row = np.full(n, -1, np.int64)
        row[self.ran] = np.arange(len(self.ran))
        return row

    def next(self, done: np.ndarray) -> bool:
        """The next call runs the unfinished beams (or all). -> whether any beam is unfinished."""
        if self.drop:
            self.ran = (~done).nonzero()[0]
            return len(self.ran) > 0
        if len(self.ran) != len(done):
            self.ran = np.arange(len(done), dtype=np.int64)
        return not done.all()

    def take(self, values: np.ndarray) -> np.ndarray:
        """The entries of the beams the next call runs (values itself when that is all of them)."""
        return values if len(self.ran) == len(values) else values[self.ran]


def _step(out, guide, rows, score, done, K, scale):
    """One selection from the session's output `out` for B images x Kp beams (score [B, Kp],
    done [B x Kp]). -> (src: the beam each new beam continues, its row in the last call, new
    score [B, K], token, next trie node (guided; else None)), flat over B x K."""
    B, Kp = score.shape
    n = B * Kp
    if guide is not None:
        lp, col = guide.top(out.cand_logprobs, K)
        col = rows.spread(n, col, 0)
    else:
        lp = np.asarray(out.topk_logprobs, np.float32)
        ids = rows.spread(n, np.asarray(out.topk_ids, np.int64), EOS)
        lp = lp[:, :K] if lp.shape[1] > K else lp  # a beam's best K suffice
    lp = rows.spread(n, lp, NEG_INF)  # rows not run are finished: _select gives them EOS
    G = lp.shape[1]
    src, slot, score = _select(score, done.reshape(B, Kp), lp.reshape(B, Kp, G), K, scale)
    was_done = done[src]
    row = rows.row_of(n)[src]  # its row in the last call (-1 only if it was finished)
    if guide is None:
        token, nxt = np.where(was_done, EOS, ids.reshape(-1)[src * ids.shape[1] + slot]), None
    else:
        token, nxt = guide.pick(np.maximum(row, 0), col.reshape(-1)[src * G + slot], was_done)
    return src, row, score, token, nxt


def _first_step(out, guide, K):
    """_step right after the prefill, where the root has more than K candidates. Every image has
    one beam, at the root, with score 0 and scale 1 (its first token), so _select would keep each
    row's top-K as it comes (already in its order: key descending, ties to the lower column):
    the top-K of the root's row is the selection, with no per-row grouping and no sort of keys."""
    cl = np.asarray(out.cand_logprobs, np.float32)
    B = len(cl)
    col, lp = _best(cl[:, :guide.widest], K)  # every row is the root's
    score = np.float32(0.0) + lp  # as _select adds the score 0 (-0.0 becomes +0.0)
    # image b's beams all continue its single one (row b)
    src = np.zeros(K, np.int64) if B == 1 else np.arange(B).repeat(K)
    col = col.reshape(-1)
    return src, src, score, guide.trie.root_tokens[col], guide.trie.root_next[col]


def _narrow_step(out, guide, rows, score, done, K, scale):
    """_step where few rows that ran have more than K candidates (at most _FEW_WIDE: the root's at
    batch 1, a beam at a wide node), and the rest at most K: late in a noun, where trie nodes
    have one child or a few. None where a key is NaN (left to _step).

    A narrow row keeps all its candidates, a wide row its K best (by a partition of its own row,
    in top-k order): no per-row top-k over all rows. Then one sort of the B x Kp x W keys in
    _select's order (key descending, ties to the lower beam, then the higher log-prob, then the
    lower column; with one candidate per beam, a plain stable argsort). The candidates with a
    finite score come first and in the same places as in _step; the rest are dead (-inf) beams
    either way, never ranked and never run again (which beam they continue and their token may
    differ). _step ranks NaN behind its -inf padding, hence the fallback.
    """
    B, Kp = score.shape
    n, W = B * Kp, min(guide.widest, K)
    row = rows.row_of(n)  # -1 (not run): a finished beam, given its EOS below
    cl = np.asarray(out.cand_logprobs, np.float32)
    every = len(rows.ran) == n  # then row is arange(n): no gathers
    lp = cl[:, :W] if every else cl[row, :W]
    if W > 1:  # columns past a row's own candidates are padding
        count = guide.count if every else guide.count[row]
        lp = np.where(_arange(W) < count[:, None], lp, NEG_INF)
        lp[done] = _eos_row(W)
    else:  # (a live beam's node always has a candidate: a child, or EOS where a noun ends)
        lp = np.where(done[:, None], np.float32(0.0), lp)
    # (a beam that ran is unfinished: writing a wide row's best over it loses no EOS row)
    columns = _shortlist_wide(cl, guide, rows.ran, lp, K) if len(guide.wide) else None
    cand = (score.reshape(n, 1) + lp).reshape(B, Kp * W)  # a finished beam: EOS, log-prob 0
    key = cand if scale is None else (cand.reshape(n, W) * scale.reshape(n, 1)).reshape(B, Kp * W)
    if math.isnan(key.min()):  # (min is NaN where any entry is)
        return None
    if W == 1:
        best = (-key).argsort(axis=1, kind="stable")
    else:
        best = np.lexsort((-lp.reshape(B, Kp * W), _beam_of(B, Kp, W), -key), axis=1)
    best = best[:, :K]
    if B > 1:
        best += np.arange(0, n * W, Kp * W)[:, None]  # flat over the B images' candidates
    new_score = cand.reshape(-1)[best]
    if Kp * W < K:  # fewer candidates than beams: pad with dead ones
        best = np.concatenate([best, np.repeat(best[:, :1], K - Kp * W, 1)], 1)
        new_score = np.concatenate([new_score, np.full((B, K - Kp * W), NEG_INF, np.float32)], 1)
    best = best.reshape(-1)
    src, col = (best, None) if W == 1 else np.divmod(best, W)  # (W 1: late in a noun, common)
    if columns is not None:
        col = columns.reshape(-1)[best]
    row, was_done = row[src], done[src]
    token, nxt = guide.pick_narrow(row, col, was_done)
    return src, row, new_score, token, nxt


def _shortlist_wide(cl, guide, ran, lp, K):
    """Each wide row's K best candidates (log-probs in top-k order) into its beam's row of lp
    [n, K], in place. -> the candidate column of each entry of lp, i64 [n, K]."""
    columns = _arange(K)[None].repeat(len(lp), 0)
    count = guide.count
    for r in guide.wide.tolist():
        col, values = _best(cl[r:r + 1, :count[r]], K)
        beam = ran[r]  # the beam that ran as row r
        lp[beam], columns[beam] = values[0], col[0]
    return columns


def beam_search(session: DecoderSession, embeds, width: int = 10, temperature: float = 1.0,
                alpha: float = 0.0, trie: TokenTrie | None = None) -> list[list[Hypothesis]]:
    """Beam search (free, or guided by a noun trie). -> per image, hypotheses best first.
    `alpha` != 0: candidates compete by score * n**-alpha at every step (the original release's
    length normalisation; docs/internals.md "Decoding semantics"); hypotheses keep raw scores.

    A finished beam only ever appends EOS with log-prob 0, so it needs no decoder: when the
    session allows it (`drops_finished_rows`), each step runs the unfinished beams' rows alone
    (`_Rows`) and the finished ones get their EOS in `_select`. Beams finish early (on the CPU
    bench's paper config, one random embedding stepped 10, 7, 3 and 1 rows), and a step's cost
    grows with its rows (docs/benchmarks.md, "CPU", run 5: decoding 1.5x faster). Sessions that
    replay CUDA graphs keyed by row count do not allow it and are given every row."""
    embeds = _check(session, embeds, width, temperature, trie)
    cfg = session.config
    B, K, T = len(embeds), int(width), cfg.max_new_tokens
    if B == 0:
        return []
    P = cfg.prefix_len
    temperature = float(temperature)
    # Beam state, flat over B x Kp rows; before the first token every image has one empty,
    # unfinished beam (Kp = 1). A live beam at step t has exactly t - 1 tokens.
    # A beam's length is its count of non-EOS tokens (real tokens are >= 1): counted where needed.
    score = np.zeros((B, 1), np.float32)
    done = np.zeros(B, bool)
    tokens = np.zeros((B, T), np.int64)

    guide = _Guide(trie, K) if trie is not None else None
    cand_ids = guide.first(B) if guide is not None else np.zeros((B, 1), np.int64)
    out = session.prefill(embeds, temperature, cand_ids)
    rows = _Rows(session, B)
    no_cands = np.zeros((B * K, 1), np.int64)
    scales = length_scales(alpha, T) if alpha != 0 else None

    for t in range(1, T + 1):  # out holds the scores for token t
        Kp = score.shape[1]
        scale = None if scales is None else scales[(tokens != EOS).sum(1) + 1].reshape(B, Kp)
        picked = None
        if t == 1 and guide is not None and guide.widest > K:
            picked = _first_step(out, guide, K)
        elif guide is not None and len(guide.wide) <= _FEW_WIDE:
            picked = _narrow_step(out, guide, rows, score, done, K, scale)
        if picked is None:
            picked = _step(out, guide, rows, score, done, K, scale)
        src, row, score, token, nxt = picked
        tokens = tokens[src]
        tokens[:, t - 1] = token  # a live beam had t - 1 tokens; a finished one gets EOS = 0
        done = (token == EOS) | (score.reshape(-1) == NEG_INF)  # dead beams count as finished

        if t == T or not rows.next(done):
            break
        if guide is not None:
            # node -1: a finished beam (which runs only where every row runs)
            cand_ids = guide.next(rows.take(nxt) if rows.drop else np.where(done, -1, nxt))
        else:
            cand_ids = no_cands[:len(rows.ran)]
        # a live beam's parent was live, so it ran: row >= 0 for every beam that runs
        out = session.step(rows.take(token), P + t - 1, rows.take(row), temperature, cand_ids)

    Kf = score.shape[1]
    return _results(score, (tokens != EOS).sum(1).reshape(B, Kf), tokens.reshape(B, Kf, T))


def greedy(session: DecoderSession, embeds, temperature: float = 1.0,
           trie: TokenTrie | None = None) -> list[Hypothesis]:
    """Greedy decoding: argmax of the (trie-masked) log-probs each step, ties lowest id.
    -> one hypothesis per image; the same as beam search of width 1."""
    embeds = _check(session, embeds, 1, temperature, trie)
    cfg = session.config
    B, T, P = len(embeds), cfg.max_new_tokens, cfg.prefix_len
    if B == 0:
        return []
    temperature = float(temperature)
    score = np.zeros(B, np.float32)
    done = np.zeros(B, bool)
    length = np.zeros(B, np.int64)
    tokens = np.zeros((B, T), np.int64)

    guide = _Guide(trie, 1) if trie is not None else None
    cand_ids = guide.first(B) if guide is not None else np.zeros((B, 1), np.int64)
    out = session.prefill(embeds, temperature, cand_ids)
    rows = _Rows(session, B)   # as in beam_search: only unfinished images are stepped
    for t in range(1, T + 1):
        row = rows.row_of(B)
        if guide is not None:
            best, col = guide.top(out.cand_logprobs, 1)
            best = rows.spread(B, best[:, 0], NEG_INF)
            token, nxt = guide.pick(np.maximum(row, 0), rows.spread(B, col[:, 0], 0), done)
        else:
            ids = rows.spread(B, np.asarray(out.topk_ids)[:, 0].astype(np.int64), EOS)
            token = np.where(done, EOS, ids)
            best = rows.spread(B, np.asarray(out.topk_logprobs, np.float32)[:, 0], NEG_INF)
        score = np.where(done, score, score + best)
        grows = token != EOS  # a finished sequence's token is EOS
        tokens[:, t - 1] = token  # grows => the sequence had t - 1 tokens; else EOS = 0
        length = length + grows
        done = ~grows
        if t == T or done.all():
            break
        rows.next(done)
        if guide is not None:
            # node -1: a finished beam (which runs only where every row runs)
            cand_ids = guide.next(rows.take(nxt) if rows.drop else np.where(done, -1, nxt))
        else:
            cand_ids = cand_ids[:len(rows.ran)]
        out = session.step(rows.take(token), P + t - 1, rows.take(row), temperature, cand_ids)
    return [Hypothesis(tuple(seq[:n]), s, math.exp(s))
            for seq, n, s in zip(tokens.tolist(), length.tolist(), score.tolist())]
