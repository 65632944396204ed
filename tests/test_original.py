"""The benchmark baseline (original-style pipeline) decodes exactly like the oracle."""
import numpy as np
import torch

from novic.config import DecoderConfig
from novic.model.decoder import ObjectDecoder
from novic.model.original import noun_token_matrix, original_beam_search
from novic.model.reference import beam_search
from novic.runtime.trie import TokenTrie

CFG = DecoderConfig(embed_dim=32, vocab_size=40, max_tokens=6, width=64, heads=4, ffn_width=16,
                    layers=2)


def peaked_decoder(seed=0):
    torch.manual_seed(seed)
    model = ObjectDecoder(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.3)
    return model


def random_nouns(n, rng):
    stems = [list(rng.integers(1, CFG.vocab_size, size=rng.integers(1, 3))) for _ in range(n // 4)]
    nouns = {tuple(stems[rng.integers(len(stems))] + list(rng.integers(1, CFG.vocab_size,
                                                              size=rng.integers(0, 3))))
             for _ in range(n)}
    return [list(map(int, s)) for s in nouns]


def test_original_style_beam_equals_oracle_free_and_guided():
    model = peaked_decoder()
    rng = np.random.default_rng(0)
    nouns = random_nouns(120, rng)
    nouns.append([1] * (CFG.max_tokens + 1))  # too long to be generated: must never appear
    trie = TokenTrie([n for n in nouns if len(n) <= CFG.max_new_tokens])
    embeds = torch.nn.functional.normalize(torch.randn(24, CFG.embed_dim), dim=-1)
    for guided in (False, True):
        matrix = noun_token_matrix(nouns, CFG.max_tokens) if guided else None
        ours = original_beam_search(model, embeds, matrix, width=5)
        oracle = beam_search(model, embeds, width=5, trie=trie if guided else None)
        for a, b in zip(ours, oracle):
            assert [h.tokens for h in a] == [h.tokens for h in b]
            assert np.allclose([h.logprob for h in a], [h.logprob for h in b], atol=1e-4)
            if guided:
                assert all(list(h.tokens) in nouns for h in a)
