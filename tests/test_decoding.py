"""Decoding: token trie, PyTorch oracle (reference.py) and the torch-free runtime search.

Random decoders here are "peaked": token/prefix/position weights are scaled so that the
next-token distributions are sharp (ties between candidates are rare, so the oracle and the
KV-cache session must agree token for token), while the layers still mix in the image prefix
and the previous tokens (outputs vary by image and do not just repeat one token).
"""
import math

import numpy as np
import pytest
import torch

from novic.config import EOS, DecoderConfig
from novic.model import reference
from novic.model.decoder import ObjectDecoder
from novic.model.session import TorchDecoderSession
from novic.runtime import search
from novic.runtime.trie import TokenTrie

TINY = DecoderConfig(embed_dim=32, vocab_size=60, max_tokens=7, width=64, heads=4, ffn_width=16,
                     layers=2)
FULL = DecoderConfig(embed_dim=768, vocab_size=12000, max_tokens=12)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small matmuls on a shared 2-core machine: threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def peaked_decoder(cfg, seed=0, gain=3.0, eos_boost=1.5, eos_ramp=0.0):
    torch.manual_seed(seed)
    model = ObjectDecoder(cfg).eval()
    small = 1.2 / math.sqrt(cfg.width)  # layers and tokens: O(1) contributions per layer
    P = cfg.prefix_len
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=small)
        model.pos_embedding.normal_(std=1.0)      # dominate the own-token (tied) direction,
        model.prefix_proj.weight.normal_(std=1.0)  # so that outputs do not just repeat it
        model.norm.weight.fill_(gain)             # sharp distributions
        eos = model.token_embedding.weight[EOS]
        eos *= eos_boost                          # EOS wins sometimes: finished beams
        for j in range(cfg.max_new_tokens):       # later positions lean towards EOS
            model.pos_embedding[P + j] += eos_ramp * j * eos / eos.norm()
    return model


def full_decoder():
    # Among 12000 tokens a random EOS direction rarely wins: let EOS grow with the length.
    return peaked_decoder(FULL, gain=4.0, eos_boost=1.0, eos_ramp=2.0)


def unit_embeddings(n, dim, seed):
    e = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def random_nouns(n, cfg, seed, vocab=None):
    """n token sequences (length 1..Cmax-1) where many share prefixes, like real nouns."""
    rng = np.random.default_rng(seed)
    vocab = vocab or cfg.vocab_size
    seqs = []
    for _ in range(n):
        seq = []
        if seqs and rng.random() < 0.7:
            seq = list(seqs[rng.integers(len(seqs))])[:rng.integers(1, cfg.max_new_tokens + 1)]
        length = rng.integers(max(1, len(seq)), cfg.max_new_tokens + 1)
        while len(seq) < length:
            seq.append(int(rng.integers(1, vocab)))
        seqs.append(tuple(seq))
    return seqs


def tokens_of(results):
    return [[h.tokens for h in hyps] for hyps in results]


def assert_same(expected, actual, atol=2e-4):
    """Same hypotheses in the same order, scores within fp32 noise of the two code paths."""
    assert tokens_of(expected) == tokens_of(actual)
    for a, b in zip(expected, actual):
        np.testing.assert_allclose([h.logprob for h in a], [h.logprob for h in b], atol=atol)


# --- trie -------------------------------------------------------------------------------------
def test_trie_matches_brute_force():
    seqs = random_nouns(300, TINY, seed=0, vocab=12) + [(3, 4), (3, 4)]  # dense, duplicates
    trie = TokenTrie(seqs)
    nouns = set(seqs)
    prefixes = {s[:i] for s in nouns for i in range(len(s) + 1)}
    assert trie.num_sequences == len(nouns) and trie.num_nodes == len(prefixes)
    assert trie.max_len == max(map(len, nouns))

    node_of = {(): 0}
    for prefix in sorted(prefixes, key=len):  # walk every prefix through advance()
        if prefix:
            node_of[prefix] = trie.advance(node_of[prefix[:-1]], prefix[-1])
            assert node_of[prefix] > 0
    widest = 0
    for prefix, node in node_of.items():
        toks, kids = trie.children(node)
        expected = sorted({s[len(prefix)] for s in nouns if len(s) > len(prefix)
                           and s[:len(prefix)] == prefix})
        assert toks.tolist() == expected and toks.dtype == np.int64
        assert [node_of[prefix + (t,)] for t in toks.tolist()] == kids.tolist()
        assert trie.is_terminal(node) == (prefix in nouns)
        assert (prefix in trie) == (prefix in nouns)
        assert trie.advance(node, 12) == -1  # never used as a token here
        widest = max(widest, len(expected))
    assert trie.max_children == widest

    # candidates(): EOS first where a noun ends, then the children; padding masked.
    nodes = np.array(list(node_of.values()) + [-1])
    ids, nxt, valid = trie.candidates(nodes)
    assert ids.shape[1] == trie.max_candidates
    for row, node in enumerate(nodes.tolist()):
        allowed = ([EOS] if node >= 0 and trie.is_terminal(node) else [])
        allowed += trie.children(node)[0].tolist() if node >= 0 else []
        assert ids[row][valid[row]].tolist() == allowed
        for tok, child in zip(ids[row][valid[row]], nxt[row][valid[row]]):
            assert child == (node if tok == EOS else trie.advance(node, tok))
    assert not valid[-1].any()


def test_trie_rejects_bad_sequences():
    for bad in ([], [()], [(1, 0, 2)], [(3,), (-1,)]):
        with pytest.raises(ValueError):
            TokenTrie(bad)


# --- hand-set weights: the answer is known ----------------------------------------------------
HAND = DecoderConfig(embed_dim=8, vocab_size=16, max_tokens=6, prefix_len=2, width=32, heads=4,
                     ffn_width=8, layers=2)
C_TOK, B_POS = 3.0, 6.0  # token embedding = C_TOK * one-hot; position forcing strength


def forced_decoder(first, then):
    """A decoder whose layers add nothing (output projections zero) and whose prefix is zero, so
    the residual stream at each position is token embedding + position embedding. Token
    embeddings are C_TOK * one-hot(id); position P-1 points to `first`, and position P+j-1 to
    then[j-1]: the next token is forced by position alone."""
    P = HAND.prefix_len
    torch.manual_seed(0)
    model = ObjectDecoder(HAND).eval()
    with torch.no_grad():
        model.prefix_proj.weight.zero_()
        for layer in model.layers:
            layer.attn.out_proj.weight.zero_()
            layer.linear2.weight.zero_()
        model.token_embedding.weight.copy_(C_TOK * torch.eye(HAND.vocab_size, HAND.width))
        model.pos_embedding.copy_(0.1 * torch.randn(HAND.seq_len, HAND.width))
        for p, tok in zip(range(P - 1, HAND.seq_len), [first, *then]):
            model.pos_embedding[p] = B_POS * torch.eye(HAND.width)[tok]
    return model


def hand_logprobs(model, prev, t):
    """Numpy log-probs of token t (t=1 first) after token `prev`: the model by hand."""
    P = HAND.prefix_len
    pos = model.pos_embedding.detach().numpy().astype(np.float64)
    emb = model.token_embedding.weight.detach().numpy().astype(np.float64)
    x = pos[P - 1] if t == 1 else emb[prev] + pos[P + t - 2]
    ln = (x - x.mean()) / np.sqrt(x.var() + HAND.ln_eps)
    z = emb @ ln
    lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
    if t == 1:
        lp[EOS] = -np.inf
    return lp


def hand_score(model, seq):
    """Exact score of a complete sequence: its tokens, then EOS unless it has Cmax-1 tokens."""
    steps = list(seq) + ([EOS] if len(seq) < HAND.max_new_tokens else [])
    return sum(hand_logprobs(model, ([None] + list(seq))[t - 1], t)[tok]
               for t, tok in enumerate(steps, start=1))


def decoders_of(model):
    """(name, greedy fn, beam fn) for the oracle and the runtime over the torch session."""
    session = TorchDecoderSession(model, topk=10)
    return [("oracle", lambda e, trie=None: reference.greedy_decode(model, e, trie=trie),
             lambda e, K, **kw: reference.beam_search(model, e, K, **kw)),
            ("runtime", lambda e, trie=None: search.greedy(session, e, trie=trie),
             lambda e, K, **kw: search.beam_search(session, e, K, **kw))]


def test_forced_sequence_greedy_and_beam():
    target = (5, 3, 7)
    model = forced_decoder(target[0], [*target[1:], EOS])
    embeds = unit_embeddings(3, HAND.embed_dim, seed=1)
    expected = hand_score(model, target)
    assert expected > -0.01  # the forcing is strong: nearly probability 1
    for name, greedy, beam in decoders_of(model):
        for hyp in greedy(embeds):
            assert hyp.tokens == target, name
            assert hyp.logprob == pytest.approx(expected, abs=1e-5)
        for hyps in beam(embeds, 10):
            assert hyps[0].tokens == target, name
            assert hyps[0].logprob == pytest.approx(expected, abs=1e-5)
            assert len(hyps) == 10 and all(h.logprob < expected - 1 for h in hyps[1:])


def test_eos_forbidden_first_and_ties_lowest_id():
    # Position P-1 points to EOS: EOS is forbidden, and all other tokens tie exactly.
    model = forced_decoder(EOS, [EOS] * 4)
    embeds = unit_embeddings(2, HAND.embed_dim, seed=2)
    for name, greedy, beam in decoders_of(model):
        assert [h.tokens for h in greedy(embeds)] == [(1,), (1,)], name
        for hyps in beam(embeds, 10):  # ten tied first tokens (ids 1..10), then EOS
            assert sorted(h.tokens for h in hyps) == [(t,) for t in range(1, 11)], name
            assert np.ptp([h.logprob for h in hyps]) < 1e-6


def test_guided_forced_sequence_not_a_noun():
    target = (5, 3, 7)
    nouns = [(5, 3, 8), (5, 4), (2, 9, 4), (11,), (5, 3, 8, 1, 2)]
    trie = TokenTrie(nouns)
    assert target not in trie
    model = forced_decoder(target[0], [*target[1:], EOS])
    embeds = unit_embeddings(2, HAND.embed_dim, seed=3)
    # Exhaustive by hand: width 10 >= 5 nouns keeps every noun prefix alive, so guided beam
    # returns all nouns ranked by their exact scores.
    ranked = sorted(nouns, key=lambda s: -hand_score(model, s))
    # Guided greedy by hand: argmax over the trie's allowed tokens at each step.
    node, seq = 0, []
    while True:
        toks, kids = trie.children(node)
        allowed = ([EOS] if trie.is_terminal(node) else []) + toks.tolist()
        lp = hand_logprobs(model, seq[-1] if seq else None, len(seq) + 1)
        tok = max(allowed, key=lambda t: (lp[t], -t))
        if tok == EOS:
            break
        seq.append(tok)
        node = trie.advance(node, tok)
    assert tuple(seq) in trie
    for name, greedy, beam in decoders_of(model):
        assert [h.tokens for h in greedy(embeds, trie=trie)] == [tuple(seq)] * 2, name
        for hyps in beam(embeds, 10, trie=trie):
            assert [h.tokens for h in hyps] == ranked, name
            np.testing.assert_allclose([h.logprob for h in hyps],
                                       [hand_score(model, s) for s in ranked], atol=1e-4)


# --- the search rules alone, under heavy ties ---------------------------------------------------
TABLE = DecoderConfig(embed_dim=4, vocab_size=12, max_tokens=6, prefix_len=2, width=8, heads=2,
                      ffn_width=4, layers=1)


def tie_table(n_images, seed):
    """Log-probs [image, step, previous token, next token] in (-2, -1]: multiples of 1/8 (exact
    ties in every row and across beams) minus multiples of 2**-23, the fp32 spacing there, so
    that distinct log-probs give summed scores that round to the same fp32 value (ties that
    appear only after the addition). Every tie rule is exercised."""
    rng = np.random.default_rng(seed)
    shape = (n_images, TABLE.max_new_tokens, TABLE.vocab_size, TABLE.vocab_size)
    return (-1 - rng.integers(0, 8, shape) / 8 - rng.integers(0, 4, shape) * 2.0 ** -23).astype(
        np.float32)


class TableSession:
    """A DecoderSession reading a tie_table: the next token depends on (image, step, previous
    token). Top-k in stable descending order, EOS masked at prefill, like the real sessions."""

    def __init__(self, table, topk):
        self.table, self.topk, self.config = table, topk, TABLE

    def _scores(self, logp, cand_ids):
        order = np.argsort(-logp, axis=1, kind="stable")[:, :self.topk]
        return search.StepScores(np.take_along_axis(logp, order, 1), order,
                                 np.take_along_axis(logp, cand_ids, 1))

    def prefill(self, embeds, temperature, cand_ids):
        self.image = np.arange(len(embeds))
        logp = self.table[self.image, 0, EOS].copy()
        logp[:, EOS] = -np.inf
        return self._scores(logp, cand_ids)

    def step(self, tokens, position, beam_idx, temperature, cand_ids):
        self.image = self.image[beam_idx]
        step = position - TABLE.prefix_len + 1
        return self._scores(self.table[self.image, step, tokens], cand_ids)


def table_logprobs(table, image):
    """The same table as the oracle's next_logprobs(seqs) for one image."""
    def next_logprobs(seqs):
        step = max(map(len, seqs))  # unfinished beams all have this length
        return torch.from_numpy(table[image, step, [s[-1] if s else EOS for s in seqs]])
    return next_logprobs


def test_search_rules_match_oracle_under_ties():
    n = 150
    table = tie_table(n, seed=40)
    embeds = np.ones((n, TABLE.embed_dim), np.float32)
    trie = TokenTrie(random_nouns(60, TABLE, seed=41))
    T = TABLE.max_new_tokens
    for kw in ({}, {"trie": trie}):
        expected = [reference.greedy_one(table_logprobs(table, i), T, **kw) for i in range(n)]
        assert search.greedy(TableSession(table, 4), embeds, **kw) == expected
        # Greedy is beam search of width 1, exactly, in both implementations.
        assert search.beam_search(TableSession(table, 4), embeds, 1, **kw) == \
            [[h] for h in expected]
        assert [reference.beam_one(table_logprobs(table, i), T, 1, **kw) for i in range(n)] == \
            [[h] for h in expected]
    ties = 0
    for width, topk, alpha, kw in [(5, 5, 0.0, {}), (4, 7, 0.7, {}), (6, 6, 0.0, {"trie": trie}),
                                   (3, 1, 0.5, {"trie": trie})]:
        expected = [reference.beam_one(table_logprobs(table, i), T, width, alpha, **kw)
                    for i in range(n)]
        actual = search.beam_search(TableSession(table, topk), embeds, width, alpha=alpha, **kw)
        assert actual == expected, (width, topk, alpha, kw)  # tokens and fp32 scores exactly
        ties += sum(len({h.logprob for h in hyps}) < len(hyps) for hyps in expected)
    assert ties > n  # the table really produces tied final scores, often


# --- properties on random decoders ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model = peaked_decoder(TINY)
    return model, TorchDecoderSession(model, topk=10)


def teacher_forced_score(model, embed, seq):
    """Score of a complete sequence by one forward pass (the same rules, no search)."""
    steps = list(seq) + ([EOS] if len(seq) < model.cfg.max_new_tokens else [])
    with torch.no_grad():
        logits = model(torch.as_tensor(embed)[None], torch.tensor([list(seq)]))[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(lp[t, tok]) for t, tok in enumerate(steps))


def test_runtime_matches_oracle_tiny(tiny):
    model, session = tiny
    embeds = unit_embeddings(200, TINY.embed_dim, seed=10)
    trie = TokenTrie(random_nouns(500, TINY, seed=11))
    greedy_ref = reference.greedy_decode(model, embeds)
    assert_same([[h] for h in greedy_ref], [[h] for h in search.greedy(session, embeds)])
    assert_same([[h] for h in reference.greedy_decode(model, embeds, trie=trie)],
                [[h] for h in search.greedy(session, embeds, trie=trie)])
    beam_ref = reference.beam_search(model, embeds, 10)
    assert_same(beam_ref, search.beam_search(session, embeds, 10))
    assert_same(reference.beam_search(model, embeds, 10, trie=trie),
                search.beam_search(session, embeds, 10, trie=trie))
    hot = embeds[:40]  # temperature enters before log-softmax in both
    assert_same(reference.beam_search(model, hot, 5, temperature=1.7, trie=trie),
                search.beam_search(session, hot, 5, temperature=1.7, trie=trie))
    # The random decoder is not degenerate: beam search differs from greedy on many images and
    # finished beams compete with unfinished ones.
    assert sum(b[0].tokens != g.tokens for b, g in zip(beam_ref, greedy_ref)) >= 20
    lengths = [len(h.tokens) for hyps in beam_ref for h in hyps]
    assert min(lengths) == 1 and max(lengths) == TINY.max_new_tokens


def test_beam_width_one_is_greedy(tiny):
    model, _ = tiny
    embeds = unit_embeddings(50, TINY.embed_dim, seed=12)
    assert [[h] for h in reference.greedy_decode(model, embeds)] == \
        reference.beam_search(model, embeds, 1)


def test_beam_scores_at_least_greedy(tiny):
    # Not a theorem (beam search may prune the greedy path and end lower), but with width 10
    # it holds nearly always; a search that loses finished beams or mis-adds scores fails this.
    model, session = tiny
    embeds = unit_embeddings(200, TINY.embed_dim, seed=13)
    greedy = search.greedy(session, embeds)
    beams = search.beam_search(session, embeds, 10)
    better = [b[0].logprob >= g.logprob - 1e-5 for b, g in zip(beams, greedy)]
    assert sum(better) >= 0.98 * len(better)
    assert sum(b[0].logprob > g.logprob + 1e-3 for b, g in zip(beams, greedy)) >= 20


def test_hypothesis_invariants(tiny):
    model, session = tiny
    embeds = unit_embeddings(100, TINY.embed_dim, seed=14)
    trie = TokenTrie(random_nouns(500, TINY, seed=15))
    for results in (search.beam_search(session, embeds, 10),
                    search.beam_search(session, embeds, 7, trie=trie),
                    reference.beam_search(model, embeds[:20], 10)):
        for hyps in results:
            assert 1 <= len(hyps) <= 10
            scores = [h.logprob for h in hyps]
            assert scores == sorted(scores, reverse=True)
            assert len({h.tokens for h in hyps}) == len(hyps)  # distinct beams
            for h in hyps:
                assert 1 <= len(h.tokens) <= TINY.max_new_tokens and EOS not in h.tokens
                assert h.prob == math.exp(h.logprob) and h.logprob <= 0
    for h in search.greedy(session, embeds):
        assert len(h.tokens) >= 1 and EOS not in h.tokens and h.prob == math.exp(h.logprob)


def test_guided_outputs_are_nouns(tiny):
    model, session = tiny
    embeds = unit_embeddings(100, TINY.embed_dim, seed=16)
    nouns = random_nouns(200, TINY, seed=17)
    trie = TokenTrie(nouns)
    free = search.beam_search(session, embeds, 10)
    assert sum(h.tokens not in trie for hyps in free for h in hyps) > 100  # guiding matters
    for hyps in search.beam_search(session, embeds, 10, trie=trie):
        assert len(hyps) == 10 and all(h.tokens in trie for h in hyps)
    assert all(h.tokens in trie for h in search.greedy(session, embeds, trie=trie))


def test_exhaustive_guided_search_finds_every_noun(tiny):
    # Width >= number of nouns keeps every noun prefix alive: the result is the full noun list
    # ranked by the teacher-forced score; beams beyond the noun count are dead and dropped.
    model, session = tiny
    embeds = unit_embeddings(10, TINY.embed_dim, seed=18)
    nouns = sorted(set(random_nouns(8, TINY, seed=19)))
    trie = TokenTrie(nouns)
    for results in (search.beam_search(session, embeds, 10, trie=trie),
                    reference.beam_search(model, embeds, 10, trie=trie)):
        for embed, hyps in zip(embeds, results):
            exact = {s: teacher_forced_score(model, embed, s) for s in nouns}
            assert sorted(h.tokens for h in hyps) == nouns
            assert [h.tokens for h in hyps] == sorted(nouns, key=lambda s: -exact[s])
            np.testing.assert_allclose([h.logprob for h in hyps],
                                       [exact[h.tokens] for h in hyps], atol=1e-4)
    single = TokenTrie([nouns[0]])
    for hyps in search.beam_search(session, embeds, 10, trie=single):
        assert [h.tokens for h in hyps] == [nouns[0]]


def test_results_independent_of_batch(tiny):
    _, session = tiny
    embeds = unit_embeddings(24, TINY.embed_dim, seed=20)
    trie = TokenTrie(random_nouns(500, TINY, seed=21))
    for kw in ({}, {"trie": trie}):
        batched = search.beam_search(session, embeds, 10, **kw)
        alone = [search.beam_search(session, e[None], 10, **kw)[0] for e in embeds]
        # exact tokens; scores within fp32 noise: onnxruntime's CPU kernels may sum a batch of rows
        # in another order than one row (1.9e-5 seen on an Intel Xeon, 0 on an AMD EPYC)
        assert_same(alone, batched, atol=1e-4)
        shuffled = np.random.default_rng(0).permutation(len(embeds))
        again = search.beam_search(session, embeds[shuffled], 10, **kw)
        assert_same([batched[i] for i in shuffled], again, atol=1e-4)


def test_length_normalisation_selects_like_the_original(tiny):
    """alpha != 0: beams compete by score * n**-alpha at every step (the original release's rule),
    not only in the final ranking; runtime and oracle agree, lists come best first by that key."""
    model, session = tiny
    embeds = unit_embeddings(60, TINY.embed_dim, seed=22)
    T = TINY.max_new_tokens
    raw = search.beam_search(session, embeds, 10)
    normed = search.beam_search(session, embeds, 10, alpha=1.0)
    assert tokens_of(normed) == tokens_of(reference.beam_search(model, embeds, 10, alpha=1.0))
    reselected = 0
    for a, b in zip(raw, normed):
        n = [len(h.tokens) + (len(h.tokens) < T) for h in b]  # + the EOS of finished beams
        keys = [np.float32(h.logprob) * np.float32(float(k) ** -1.0) for h, k in zip(b, n)]
        assert keys == sorted(keys, reverse=True)
        reselected += sorted(h.tokens for h in a) != sorted(h.tokens for h in b)
    assert reselected >= 5   # other beams survive, not just another order


def test_length_normalisation_by_hand():
    """Width 2, alpha 1, worked by hand. Step 2 keeps [1,EOS] (-1.2) and [2,4] (-1.6). Step 3:
    the live beam's [2,4,5] (-1.65 / 3 = -0.55) and [2,4,6] (-1.7 / 3) beat the finished [1]
    (-1.2 / 2 = -0.6), which drops out; ranking only at the end would have kept it (raw -1.2 is
    the best score) and listed it second."""
    table = np.full((1, TABLE.max_new_tokens, TABLE.vocab_size, TABLE.vocab_size), -10, np.float32)
    for (step, prev, tok), lp in {(0, EOS, 1): -1.0, (0, EOS, 2): -1.5, (1, 1, EOS): -0.2, (1, 1, 3): -2.0,
                                  (1, 2, 4): -0.1, (1, 2, EOS): -3.0, (2, 4, 5): -0.05, (2, 4, 6): -0.1,
                                  (2, 4, EOS): -2.0, (3, 5, EOS): -0.1, (3, 6, EOS): -0.1}.items():
        table[0, step, prev, tok] = lp
    f32 = np.float32
    want = [((2, 4, 5), float(f32(-1.5) + f32(-0.1) + f32(-0.05) + f32(-0.1))),
            ((2, 4, 6), float(f32(-1.5) + f32(-0.1) + f32(-0.1) + f32(-0.1)))]
    got = search.beam_search(TableSession(table, 4), np.ones((1, TABLE.embed_dim), np.float32), 2, alpha=1.0)
    assert [(h.tokens, h.logprob) for h in got[0]] == want
    oracle = reference.beam_one(table_logprobs(table, 0), TABLE.max_new_tokens, 2, 1.0)
    assert [(h.tokens, h.logprob) for h in oracle] == want
    plain = search.beam_search(TableSession(table, 4), np.ones((1, TABLE.embed_dim), np.float32), 2)
    assert [h.tokens for h in plain[0]] == [(1,), (2, 4, 5)]   # alpha 0: raw scores


def test_search_input_validation(tiny):
    _, session = tiny
    e = unit_embeddings(2, TINY.embed_dim, seed=23)
    with pytest.raises(ValueError, match="top-k"):
        search.beam_search(session, e, 11)
    with pytest.raises(ValueError, match="embeds"):
        search.beam_search(session, e[:, :5], 3)
    with pytest.raises(ValueError, match="vocabulary"):
        search.beam_search(session, e, 3, trie=TokenTrie([(TINY.vocab_size,)]))
    with pytest.raises(ValueError, match="at most"):
        search.beam_search(session, e, 3, trie=TokenTrie([(1,) * TINY.max_tokens]))
    with pytest.raises(ValueError, match="temperature"):
        search.greedy(session, e, temperature=0.0)
    # Guided search reads no top-k, so it may be wider than the session's top-k.
    trie = TokenTrie(random_nouns(300, TINY, seed=24))
    assert all(len(h) == 12 for h in search.beam_search(session, e, 12, trie=trie))
    assert search.beam_search(session, e[:0], 3) == []


class Recorder:
    """Wraps a session and records what the host sends and reads back."""

    def __init__(self, inner):
        self.inner, self.config, self.topk = inner, inner.config, inner.topk
        self.drops_finished_rows = getattr(inner, "drops_finished_rows", False)   # a wrapper forwards it
        self.widths, self.read = [], []

    def _log(self, cand_ids, out):
        self.widths.append(cand_ids.shape[1])
        self.read.append(max(out.topk_ids.shape[1], out.cand_logprobs.shape[1]))
        return out

    def prefill(self, embeds, temperature, cand_ids):
        return self._log(cand_ids, self.inner.prefill(embeds, temperature, cand_ids))

    def step(self, tokens, position, beam_idx, temperature, cand_ids):
        return self._log(cand_ids, self.inner.step(tokens, position, beam_idx, temperature,
                                                   cand_ids))


def test_host_reads_only_candidates(tiny):
    _, session = tiny
    embeds = unit_embeddings(8, TINY.embed_dim, seed=25)
    trie = TokenTrie(random_nouns(500, TINY, seed=26))
    rec = Recorder(session)
    search.beam_search(rec, embeds, 10)
    assert rec.widths and set(rec.widths) == {1} and max(rec.read) == 10
    rec = Recorder(session)
    search.beam_search(rec, embeds, 10, trie=trie)
    assert max(rec.widths) <= trie.max_candidates < TINY.vocab_size - 1
    assert len(rec.widths) <= TINY.max_new_tokens


class RowRecorder(Recorder):
    """Keeps the tokens fed to each step, and says whether finished rows may be dropped (None:
    says nothing, like a session that does not know about it)."""

    def __init__(self, inner, drops: bool | None):
        super().__init__(inner)
        self.fed = []
        if drops is None:
            del self.drops_finished_rows
        else:
            self.drops_finished_rows = drops

    def step(self, tokens, position, beam_idx, temperature, cand_ids):
        self.fed.append(np.array(tokens, copy=True))
        return super().step(tokens, position, beam_idx, temperature, cand_ids)


@pytest.mark.parametrize("how", ["beam", "beam guided", "greedy", "greedy guided"])
def test_finished_beams_are_not_stepped(tiny, how):
    """Steps run only the unfinished rows (a finished beam's EOS needs no decoder) where the session
    allows it, with the same hypotheses as stepping every row; a session that says False, or says
    nothing, is given every row."""
    _, session = tiny
    embeds = unit_embeddings(16, TINY.embed_dim, seed=61)
    trie = TokenTrie(random_nouns(500, TINY, seed=62)) if "guided" in how else None
    if how.startswith("beam"):
        def run(s):
            return search.beam_search(s, embeds, 10, trie=trie)
    else:
        def run(s):
            return [[h] for h in search.greedy(s, embeds, trie=trie)]
    dropping, keeping, silent = RowRecorder(session, True), RowRecorder(session, False), RowRecorder(session, None)
    got, want = run(dropping), run(keeping)
    assert_same(want, got)
    assert_same(want, run(silent))
    assert [len(fed) for fed in silent.fed] == [len(fed) for fed in keeping.fed]
    assert all((fed != EOS).all() for fed in dropping.fed)           # no finished row was stepped
    assert any((fed == EOS).any() for fed in keeping.fed)            # ... and there were some
    assert sum(map(len, dropping.fed)) < sum(map(len, keeping.fed))
    assert {len(fed) for fed in keeping.fed} == {len(embeds) * (10 if how.startswith("beam") else 1)}


class HistorySession:
    """A fake decoder whose log-probs depend on each row's whole history (a hash of the tokens fed
    through beam_idx), with EOS often likely: beams finish at many steps, and the live rows can
    grow again (one live beam with several live children displacing finished ones)."""

    def __init__(self, cfg, topk, seed, eos_high, drops):
        rng = np.random.default_rng(seed)
        self.logits = 2.0 * rng.standard_normal((257, cfg.vocab_size)).astype(np.float32)
        self.logits[:, EOS] = rng.uniform(-2, eos_high, 257)
        self.config, self.topk, self.drops_finished_rows = cfg, topk, drops
        self.rows_per_step = []

    def _scores(self, temperature, cand_ids, first):
        logp = torch.log_softmax(torch.from_numpy(self.logits[self.state] / np.float32(temperature)), -1).numpy()
        if first:
            logp[:, EOS] = -np.inf
        order = np.argsort(-logp, axis=1, kind="stable")[:, :self.topk]
        return search.StepScores(np.take_along_axis(logp, order, 1), order,
                                 np.take_along_axis(logp, np.asarray(cand_ids), 1))

    def prefill(self, embeds, temperature, cand_ids):
        self.state = np.abs(embeds[:, 0] * 1e6).astype(np.int64) % len(self.logits)
        return self._scores(temperature, cand_ids, True)

    def step(self, tokens, position, beam_idx, temperature, cand_ids):
        assert np.min(beam_idx) >= 0 and np.max(beam_idx) < len(self.state)
        self.state = (self.state[beam_idx] * 1_000_003 + np.asarray(tokens) * 7919 + position) % len(self.logits)
        self.rows_per_step.append(len(tokens))
        return self._scores(temperature, cand_ids, False)


def test_dropping_rows_matches_all_rows_on_random_histories():
    """Random small vocabularies, batches, widths, temperatures, alphas, tries: dropping finished
    rows gives bit-identical hypotheses to stepping every row, also where the rows grow again."""
    rng = np.random.default_rng(0)
    shrank = grew = 0
    for _ in range(150):
        V, T = int(rng.integers(8, 40)), int(rng.integers(2, 8))
        cfg = DecoderConfig(embed_dim=4, vocab_size=V, max_tokens=T + 1, width=8, heads=1, ffn_width=4, layers=1)
        topk = int(rng.integers(1, min(V, 12) + 1))
        trie = TokenTrie(random_nouns(int(rng.integers(1, 60)), cfg, seed=int(rng.integers(1 << 30)))) \
            if rng.random() < 0.5 else None
        width = int(rng.integers(1, 11)) if trie else int(rng.integers(1, topk + 1))
        embeds = rng.standard_normal((int(rng.integers(1, 7)), 4)).astype(np.float32)
        kw = dict(temperature=float(rng.choice([1.0, 0.5, 2.0])), trie=trie)
        alpha = float(rng.choice([0.0, 0.7]))
        seed, eos_high = int(rng.integers(1 << 30)), float(rng.uniform(0, 8))
        sessions = [HistorySession(cfg, topk, seed, eos_high, drops) for drops in (True, False, True, False)]
        results = [search.beam_search(s, embeds, width, alpha=alpha, **kw) for s in sessions[:2]]
        results += [[[h] for h in search.greedy(s, embeds, **kw)] for s in sessions[2:]]
        for got, want in (results[:2], results[2:]):
            assert [[(h.tokens, h.logprob) for h in hs] for hs in got] == \
                [[(h.tokens, h.logprob) for h in hs] for hs in want]
        n = sessions[0].rows_per_step
        shrank += n != sessions[1].rows_per_step
        grew += any(b > a for a, b in zip(n, n[1:]))
    assert shrank > 50 and grew > 0


# --- full-size decoder ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full():
    model = full_decoder()
    return model, TorchDecoderSession(model, topk=10)


@pytest.mark.slow
def test_runtime_matches_oracle_full_free(full):
    model, session = full
    embeds = unit_embeddings(10, FULL.embed_dim, seed=30)
    assert_same([[h] for h in reference.greedy_decode(model, embeds)],
                [[h] for h in search.greedy(session, embeds)])
    beam_ref = reference.beam_search(model, embeds, 10)
    assert_same(beam_ref, search.beam_search(session, embeds, 10))
    finished = {len(h.tokens) for hyps in beam_ref for h in hyps} - {FULL.max_new_tokens}
    assert len(finished) >= 2  # beams end at different lengths


@pytest.mark.slow
def test_runtime_matches_oracle_full_guided(full):
    model, session = full
    embeds = unit_embeddings(10, FULL.embed_dim, seed=31)
    trie = TokenTrie(random_nouns(500, FULL, seed=32))
    assert_same(reference.beam_search(model, embeds, 10, trie=trie),
                search.beam_search(session, embeds, 10, trie=trie))
    assert_same([[h] for h in reference.greedy_decode(model, embeds, trie=trie)],
                [[h] for h in search.greedy(session, embeds, trie=trie)])


# --- host-side search machinery (novic/runtime/search.py internals) -----------------------------
def test_trie_candidate_rows_and_widths_per_depth():
    seqs = random_nouns(300, TINY, seed=50, vocab=12) + [(3,), (3, 4)]
    trie = TokenTrie(seqs)
    nodes = np.arange(-1, trie.num_nodes)
    start, count = trie.candidate_rows(nodes)
    ids, nxt, valid = trie.candidates(nodes)
    assert count.tolist() == valid.sum(1).tolist() and count[0] == 0
    for row in range(len(nodes)):
        sl = slice(start[row], start[row] + count[row])
        assert trie.cand_tokens[sl].tolist() == ids[row][valid[row]].tolist()
        assert trie.cand_next[sl].tolist() == nxt[row][valid[row]].tolist()
    # The steps' width per depth: the widest row of the nodes there.
    depth = np.zeros(trie.num_nodes, np.int64)
    for node in range(trie.num_nodes):
        for child in trie.children(node)[1]:
            depth[child] = depth[node] + 1
    for d, w in enumerate(trie.depth_candidates):
        assert w == count[1:][depth == d].max()
    assert trie.depth_candidates[0] == count[1] and trie.depth_candidates.max() == trie.max_candidates
    wide = trie.candidates(nodes[2:], width=trie.max_candidates + 3)
    assert wide[0].shape[1] == trie.max_candidates + 3
    for a, b in zip(wide, trie.candidates(nodes[2:], width=trie.max_candidates)):
        assert (a[:, :b.shape[1]] == b).all()
    extra = slice(trie.max_candidates, None)
    assert not wide[2][:, extra].any() and (wide[1][:, extra] == -1).all()
    with pytest.raises(ValueError, match="narrower"):
        trie.candidates(nodes, width=trie.max_candidates - 1)


@pytest.mark.parametrize("small", [search._SMALL, 0])  # np.argsort and the packed-key partition
def test_best_is_a_stable_descending_sort(monkeypatch, small):
    monkeypatch.setattr(search, "_SMALL", small)
    rng = np.random.default_rng(51)
    for n, w, k in [(7, 40, 10), (3, 10, 10), (5, 100, 1), (4, 3, 3), (2, 64, 20)]:
        # Heavy ties, both zeros, infinities and NaNs.
        pool = np.array([-1.5, -0.25, -0.0, 0.0, -np.inf, np.inf, np.nan, -3.0, 2.0], np.float32)
        values = rng.choice(pool, size=(n, w)).astype(np.float32)
        col, v = search._best(values, k)
        want = np.argsort(-values, axis=1, kind="stable")[:, :k]
        assert col.dtype == np.int64 and (col == want).all(), (n, w, k)
        np.testing.assert_array_equal(v, np.take_along_axis(values, want, 1))


@pytest.mark.parametrize("small", [search._SMALL, 0])
def test_top_rows_matches_brute_force(monkeypatch, small):
    monkeypatch.setattr(search, "_SMALL", small)
    rng = np.random.default_rng(52)
    for k, G in [(3, 200), (10, 700), (5, 4), (1, 50)]:
        N = 40
        cl = (rng.integers(-6, 1, (N, G)) / 4).astype(np.float32)  # many ties
        cl[rng.random((N, G)) < 0.05] = -np.inf
        count = rng.choice([0, 1, 2, k, k + 1, 4 * k, 4 * k + 1, G], N).clip(0, G)
        check_top_rows(cl, count, k)


def check_top_rows(cl, count, k):
    """search._top_rows against a stable argsort of each row's own candidates."""
    lp, col = search._top_rows(cl, count, k)
    for r in range(len(cl)):
        vals = np.concatenate([cl[r, :count[r]], np.full(k, -np.inf, np.float32)])
        want = np.argsort(-vals, kind="stable")[:k]
        real = want < count[r]
        assert (col[r][real] == want[real]).all() and (col[r][~real] >= count[r]).all()
        np.testing.assert_array_equal(lp[r], vals[want])


@pytest.mark.parametrize("wide_rows", [1, 2, 3])
def test_top_rows_with_a_few_wide_rows(wide_rows):
    """Rows wider than 4k next to narrow ones (a beam at a node with many children): one or two
    are sliced to their own length, more go through the masked block; same top-k either way."""
    rng = np.random.default_rng(54)
    for _ in range(20):
        N, G, k = 10, int(rng.integers(300, 700)), int(rng.integers(1, 11))
        cl = (rng.integers(-6, 1, (N, G)) / 4).astype(np.float32)  # many ties
        cl[rng.random((N, G)) < 0.05] = -np.inf
        count = rng.integers(0, k + 1, N)
        count[rng.choice(N, wide_rows, replace=False)] = rng.integers(4 * k + 1, G + 1, wide_rows)
        check_top_rows(cl, count, k)


def test_search_rules_under_ties_packed_keys(monkeypatch):
    # The same exact-tie check with the packed-key partition in every selection.
    monkeypatch.setattr(search, "_SMALL", 0)
    test_search_rules_match_oracle_under_ties()


class TrieRecorder(Recorder):
    """Also keeps copies of the cand_ids sent and replays the trie along the tokens fed back,
    to check that every row asks for exactly its node's candidates."""

    def __init__(self, inner, trie):
        super().__init__(inner)
        self.trie, self.sent, self.expected = trie, [], []

    def prefill(self, embeds, temperature, cand_ids):
        self.nodes = np.zeros(len(embeds), np.int64)
        self._keep(cand_ids)
        return super().prefill(embeds, temperature, cand_ids)

    def step(self, tokens, position, beam_idx, temperature, cand_ids):
        prev = self.nodes[np.asarray(beam_idx)]
        self.nodes = np.array([self.trie.advance(p, t) if p >= 0 and t != EOS else -1
                               for p, t in zip(prev.tolist(), np.asarray(tokens).tolist())])
        self._keep(cand_ids)
        return super().step(tokens, position, beam_idx, temperature, cand_ids)

    def _keep(self, cand_ids):
        self.sent.append(np.array(cand_ids, copy=True))
        self.expected.append(self.trie.candidates(self.nodes, width=cand_ids.shape[1])[0])


def test_guided_cand_width_depends_only_on_the_step(tiny):
    _, session = tiny
    embeds = unit_embeddings(12, TINY.embed_dim, seed=53)
    trie = TokenTrie(random_nouns(400, TINY, seed=54))
    root_width = trie.candidates(np.zeros(1, np.int64))[0].shape[1]
    assert len(set(trie.depth_candidates[1:4].tolist())) > 1   # the steps' widths differ here
    runs = [(10, lambda s: search.beam_search(s, embeds, 10, trie=trie)),
            (3, lambda s: search.beam_search(s, embeds[:1], 3, trie=trie)),
            (1, lambda s: search.greedy(s, embeds, trie=trie))]
    for width, run in runs:
        rec = TrieRecorder(session, trie)
        assert run(rec) == run(session)
        assert len(rec.widths) >= 3, width  # the searches really take several steps
        assert rec.widths[0] == root_width
        # Step t pads to the widest trie row at depth t: the same for every batch and width.
        expected = [max(1, int(trie.depth_candidates[t])) if t < len(trie.depth_candidates) else 1
                    for t in range(len(rec.widths))]
        assert rec.widths == expected, (width, rec.widths)
        for sent, expected in zip(rec.sent, rec.expected):  # no stale entries in the buffer
            assert (sent == expected).all()
    rec = Recorder(session)
    search.beam_search(rec, embeds, 10)
    assert set(rec.widths) == {1}
