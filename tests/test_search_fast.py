"""The short paths of guided beam search (novic/runtime/search.py) change no result.

Narrow steps (`_narrow_step`): late in a noun every beam's trie node has one candidate (one
child, or EOS where the noun ends) or a few, and the search skips the per-row top-k: one sort of
all the candidates' keys. These tests make such steps common (nouns with long private tails,
nouns that are prefixes of others) under heavy ties, finished beams at every step, batches,
length normalisation and NaN log-probs, and check the results against the PyTorch oracle
(reference.beam_one), and bit for bit against the general path alone.

A step's few wide rows (more candidates than the beam width: a beam at a wide node) take the
same short path with their own top-k (`_shortlist_wide`), and the step right after the prefill,
where every image has one beam at the root, is the root's top-k alone (`_first_step`); both are
checked the same way. The cand_ids of each step are the same whichever way they are filled
(one dense gather, a slice copy per row, one flat scatter).

Wide rows (`_best_columns`, the root's candidates): the top-k by a partition threshold equals
a stable argsort, ties, signed zeros, infinities and NaN included.
"""
import numpy as np
import pytest
import torch

from novic.config import EOS, DecoderConfig
from novic.model import reference
from novic.runtime import search
from novic.runtime.trie import TokenTrie

ROWS = 509  # distinct log-prob rows; a history picks one by hash


def chained_nouns(rng, vocab, max_len, n):
    """n nouns: a few short shared stems, then private random tails (1-wide chains in the trie);
    some nouns are prefixes of others (a row of EOS + children: not forced)."""
    stems = [[int(t) for t in rng.integers(1, vocab, rng.integers(1, 3))] for _ in range(4)]
    seqs = []
    for _ in range(n):
        seq = list(stems[rng.integers(len(stems))])
        seq += [int(t) for t in rng.integers(1, vocab, rng.integers(0, max_len - len(seq) + 1))]
        seqs.append(seq)
        if rng.random() < 0.3 and len(seq) > 1:
            seqs.append(seq[:int(rng.integers(1, len(seq)))])
    return seqs


def tie_rows(rng, vocab):
    """[ROWS, vocab] log-probs in (-2, -1]: multiples of 1/8 minus multiples of 2**-23 (equal
    values, and distinct values whose sums round equal), EOS sometimes near 0 so that beams
    finish at many different steps."""
    lp = -1 - rng.integers(0, 8, (ROWS, vocab)) / 8 - rng.integers(0, 4, (ROWS, vocab)) * 2.0 ** -23
    lp[:, EOS] = np.where(rng.random(ROWS) < 0.3, -0.125, lp[:, EOS])
    return lp.astype(np.float32)


def advance(state, token, position):
    return (state * 1_000_003 + token * 7919 + position) % ROWS


class HashSession:
    """A DecoderSession whose log-probs depend on each row's whole history (a hash of the image and
    the tokens fed along beam_idx), read from a table: the oracle recomputes the same hash from a
    beam's tokens. Records its inputs: cand_ids of each call, (tokens, beam_idx) of each step."""

    def __init__(self, cfg, table, drops):
        self.config, self.table, self.topk, self.drops_finished_rows = cfg, table, 4, drops
        self.calls = []

    def _out(self, cand_ids, first):
        lp = self.table[self.state].copy()
        if first:
            lp[:, EOS] = -np.inf
        order = np.argsort(-lp, axis=1, kind="stable")[:, :self.topk]
        self.calls.append(np.array(cand_ids, copy=True))
        return search.StepScores(np.take_along_axis(lp, order, 1), order,
                                 np.take_along_axis(lp, cand_ids, 1))

    def prefill(self, embeds, temperature, cand_ids):
        self.state = np.asarray(embeds[:, 0], np.int64) % ROWS
        return self._out(cand_ids, True)

    def step(self, tokens, position, beam_idx, temperature, cand_ids):
        self.calls.append((np.array(tokens), np.array(beam_idx)))
        self.state = advance(self.state[beam_idx], np.asarray(tokens), position)
        return self._out(cand_ids, False)


def oracle_logprobs(table, image, prefix_len):
    def next_logprobs(seqs):
        rows = []
        for seq in seqs:
            state = image % ROWS
            for i, tok in enumerate(seq):
                state = advance(state, tok, prefix_len + i)
            rows.append(table[state])
        return torch.from_numpy(np.stack(rows))
    return next_logprobs


@pytest.fixture
def narrow_steps(monkeypatch):
    """The width (1: forced) of each step that took the short path, None where it fell back
    (a test that never takes it proves nothing)."""
    taken = []
    inner, first = search._narrow_step, search._first_step

    def counting(out, guide, *args):
        wide = len(guide.wide)  # rows wider than the beam, each shortlisted on its own
        got = inner(out, guide, *args)
        taken.append(guide.widest if got is not None else None)
        if got is not None and wide:
            taken.append("wide")
        return got

    def counting_first(*args):
        taken.append("first")
        return first(*args)
    monkeypatch.setattr(search, "_narrow_step", counting)
    monkeypatch.setattr(search, "_first_step", counting_first)
    return taken


def random_case(rng):
    V, T = int(rng.integers(6, 30)), int(rng.integers(3, 9))
    cfg = DecoderConfig(embed_dim=2, vocab_size=V, max_tokens=T + 1, prefix_len=1, width=8,
                        heads=1, ffn_width=4, layers=1)
    trie = TokenTrie(chained_nouns(rng, V, T, int(rng.integers(1, 40))))
    embeds = np.zeros((int(rng.integers(1, 5)), 2), np.float32)
    embeds[:, 0] = rng.integers(0, 10_000, len(embeds))
    return cfg, trie, embeds, tie_rows(rng, V)


def test_narrow_steps_match_the_oracle(narrow_steps):
    rng = np.random.default_rng(0)
    for _ in range(60):
        cfg, trie, embeds, table = random_case(rng)
        width, alpha = int(rng.integers(1, 9)), float(rng.choice([0.0, 0.0, 0.7]))
        expected = [reference.beam_one(oracle_logprobs(table, int(e), cfg.prefix_len),
                                       cfg.max_new_tokens, width, alpha, trie=trie)
                    for e in embeds[:, 0]]
        for drops in (False, True):
            got = search.beam_search(HashSession(cfg, table, drops), embeds, width, alpha=alpha,
                                     trie=trie)
            assert got == expected, (width, alpha, drops)  # tokens, order and fp32 scores
    widths = [w for w in narrow_steps if w not in ("wide", "first")]
    assert widths.count(1) > 100 and sum(w is not None and w > 1 for w in widths) > 50
    assert narrow_steps.count("wide") > 20 and narrow_steps.count("first") > 20


def general_path_only(monkeypatch):
    """Every step through _step (the first one included)."""
    monkeypatch.setattr(search, "_narrow_step", lambda *args: None)
    monkeypatch.setattr(search, "_first_step", lambda *args: None)


def run_both(monkeypatch, cfg, trie, embeds, table, width, alpha, drops):
    """-> (short path, general path): (hypotheses, calls) of each."""
    runs = []
    for general in (False, True):
        with monkeypatch.context() as m:
            if general:
                general_path_only(m)
            session = HashSession(cfg, table, drops)
            runs.append((search.beam_search(session, embeds, width, alpha=alpha, trie=trie),
                         session.calls))
    return runs


def same_hypotheses(a, b):
    """Equal, with NaN scores equal to each other."""
    key = [[(h.tokens, np.float32(h.logprob).tobytes()) for h in hyps] for hyps in a]
    return key == [[(h.tokens, np.float32(h.logprob).tobytes()) for h in hyps] for hyps in b]


def test_narrow_steps_match_the_general_path_bit_for_bit(monkeypatch, narrow_steps):
    """Also with NaN and -inf log-probs, which the oracle does not define: the short path leaves
    NaN keys to the general one. Each session sees the same cand_ids, and the same tokens and
    beam_idx in every row whose beam is live (finished rows are filled in either way)."""
    rng = np.random.default_rng(1)
    nan_cases = 0
    for i in range(80):
        cfg, trie, embeds, table = random_case(rng)
        if i % 3 == 0:
            bad = rng.random(table.shape) < 0.15
            table[bad] = rng.choice([np.nan, -np.inf], int(bad.sum()))
            nan_cases += 1
        width, alpha = int(rng.integers(1, 11)), float(rng.choice([0.0, 0.5]))
        for drops in (False, True):
            (short, calls), (general, calls_general) = run_both(
                monkeypatch, cfg, trie, embeds, table, width, alpha, drops)
            assert same_hypotheses(short, general), (i, width, alpha, drops)
            assert len(calls) == len(calls_general)
            for i, (a, b) in enumerate(zip(calls, calls_general)):
                if isinstance(a, np.ndarray):  # cand_ids
                    np.testing.assert_array_equal(a, b)
                    continue
                # (tokens, beam_idx) of a step: the rows whose beam is live (every row that runs
                # where finished rows are dropped; else those asking for a token, not 0 only)
                live = np.ones(len(a[0]), bool) if drops else calls[i + 1].any(1)
                for x, y in zip(a, b):
                    np.testing.assert_array_equal(x[live], y[live])
    widths = [w for w in narrow_steps if w not in ("wide", "first")]
    assert nan_cases and widths.count(1) > 100 and sum(w is not None and w > 1 for w in widths) > 50
    assert narrow_steps.count("wide") > 20 and narrow_steps.count("first") > 20
    assert None in narrow_steps  # a NaN key sent some steps to the general path


def test_narrow_rows_get_their_candidates():
    """The rows a forced step sends: exactly each node's candidate (EOS for a finished noun,
    token 0 for a finished beam), padded with 0 to the depth's width."""
    trie = TokenTrie([[1, 2, 3, 4], [1, 2], [5, 6, 7], [5, 8, 9, 10]])
    guide = search._Guide(trie, 2)
    guide.first(4)
    guide.depth = 1  # the rows below sit at depth 2
    node = {seq: trie.advance(trie.advance(0, seq[0]), seq[1]) for seq in [(1, 2), (5, 6), (5, 8)]}
    cand_ids = guide.next(np.array([node[(1, 2)], node[(5, 6)], -1, node[(5, 8)]]))
    assert guide.widest == 2  # the node (1, 2) ends a noun and has a child: 2 candidates
    assert cand_ids.tolist() == [[EOS, 3], [7, 0], [0, 0], [9, 0]]
    guide.depth = 1
    cand_ids = guide.next(np.array([node[(5, 6)], -1, node[(5, 8)]]))
    assert guide.widest == 1 and cand_ids.tolist() == [[7, 0], [0, 0], [9, 0]]  # (1, 2) is 2 wide
    at_7 = trie.advance(node[(5, 6)], 7)
    cand_ids = guide.next(np.array([at_7, trie.advance(node[(5, 8)], 9)]))
    assert guide.widest == 1 and cand_ids.tolist() == [[EOS], [10]]
    token, nxt = guide.pick_narrow(np.array([1, 0, 0]), None, np.array([False, False, True]))
    assert token.tolist() == [10, EOS, EOS] and nxt[:2].tolist() == [trie.advance(trie.advance(
        node[(5, 8)], 9), 10), at_7]


@pytest.mark.parametrize("n", [1, 7])
def test_top_k_of_wide_rows_is_a_stable_descending_sort(n):
    rng = np.random.default_rng(53)
    paths = set()
    for trial in range(40):
        w, k = int(rng.integers(search._WIDE, 3 * search._WIDE)), int(rng.integers(1, 12))
        # Ties everywhere, the k best spanning several tied values; signed zeros, infinities.
        values = (rng.integers(-8, 2, (n, w)) / 8 - (rng.random((n, w)) < 0.95)).astype(np.float32)
        values[(values == 0) & (rng.random((n, w)) < 0.5)] = -0.0
        values[rng.random((n, w)) < 0.01] = np.inf
        values[rng.random((n, w)) < 0.1] = -np.inf
        if trial % 4 == 1:  # continuous values, some -inf
            values = rng.standard_normal((n, w)).astype(np.float32)
            values[rng.random((n, w)) < 0.3] = -np.inf
        if trial % 4 == 2:  # NaN, but k non-NaN values per row: still the partition threshold
            values[rng.random((n, w)) < 0.5] = np.nan
        if trial % 4 == 3:  # a row with fewer than k non-NaN values: the packed keys instead
            values[0, :w - k + 1] = np.nan
        want = np.argsort(-values, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(search._best_columns(values, k), want)
        paths.add(bool(np.isnan(np.sort(-values, axis=1)[:, k - 1]).any()))
    assert paths == {False, True}


@pytest.mark.parametrize("fill", ["dense", "row by row", "flat"])
def test_cand_ids_are_the_same_however_filled(monkeypatch, fill):
    """Each way of filling a step's cand_ids gives every row its node's candidates, padded with 0
    to the depth's width; the buffers reused from step to step keep no stale entries."""
    monkeypatch.setattr(search, "_DENSE", 10 ** 9 if fill == "dense" else 0)
    monkeypatch.setattr(search, "_ROW_BY_ROW", 10 ** 9 if fill == "row by row" else 0)
    rng = np.random.default_rng(7)
    trie = TokenTrie(chained_nouns(rng, 40, 6, 60))
    depth_of = {0: 0}
    for node in range(trie.num_nodes):  # parents come before their children
        for child in trie.children(node)[1]:
            depth_of[int(child)] = depth_of[node] + 1
    guide = search._Guide(trie, 3)
    for _ in range(30):
        depth = int(rng.integers(1, max(depth_of.values()) + 1))
        at_depth = [n for n, d in depth_of.items() if d == depth]
        nodes = rng.choice(at_depth + [-1], 6)  # the same row count every time: buffers reused
        guide.depth = depth - 1
        got = guide.next(nodes)
        width = max(1, int(trie.depth_candidates[depth]) if depth < len(trie.depth_candidates) else 1)
        want = trie.candidates(nodes, width)[0]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(guide.wide, np.flatnonzero(guide.count > 3))


def test_top_k_of_one_wide_row_with_a_few_nan():
    """Fewer NaN than k in a row: the partition threshold still applies (NaN compares false and
    is left out, the k best non-NaN values are all above it)."""
    rng = np.random.default_rng(11)
    for _ in range(60):
        w, k = int(rng.integers(search._WIDE, 2 * search._WIDE)), int(rng.integers(2, 12))
        values = (rng.integers(-8, 2, w) / 8).astype(np.float32)
        values[rng.choice(w, int(rng.integers(1, k)), replace=False)] = np.nan
        col = search._best_of_row(values, k)
        assert col is not None
        np.testing.assert_array_equal(col, np.argsort(-values, kind="stable")[:k])
        np.testing.assert_array_equal(search._best_columns(values[None], k)[0], col)
