"""The object decoder: architecture facts and KV-cache parity with full recomputation."""
import pytest
import torch

from novic.config import DecoderConfig
from novic.model.decoder import ObjectDecoder, attention_mask

TINY = DecoderConfig(embed_dim=32, vocab_size=60, max_tokens=7, width=64, heads=4, ffn_width=16,
                     layers=2)
DEFAULT = DecoderConfig(embed_dim=768, vocab_size=11897 + 1, max_tokens=12)


def random_decoder(cfg, seed=0, std=None):
    """Random weights scaled so that logits span a realistic range (|logit| up to ~6)."""
    torch.manual_seed(seed)
    model = ObjectDecoder(cfg).eval()
    std = std or (0.2 if cfg.width <= 64 else 0.05)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=std)
    return model


def test_param_count_matches_reference_formula():
    for F, V, C in [(768, 11897, 12), (1152, 42919, 20), (1024, 5000, 9)]:
        cfg = DecoderConfig(embed_dim=F, vocab_size=V, max_tokens=C)
        expected = 7_084_544 + 2048 * F + 512 * (V + 4 + C - 1)
        assert sum(p.numel() for p in ObjectDecoder(cfg).parameters()) == expected


def test_no_biases_anywhere():
    names = [n for n, _ in ObjectDecoder(TINY).named_parameters()]
    assert not [n for n in names if "bias" in n]


def test_mask_prefix_bidirectional_rest_causal():
    m = attention_mask(6, 3)
    assert m[:3, :3].all()                        # prefix block sees itself fully
    assert not m[:3, 3:].any()                    # prefix never sees tokens
    assert torch.equal(m[3:], torch.ones(6, 6, dtype=torch.bool).tril()[3:])


def test_output_head_is_tied_to_token_embedding():
    model = random_decoder(TINY)
    e = torch.randn(2, 32)
    t = torch.randint(6, 60, (2, 3))            # inputs avoid token 5
    with torch.no_grad():
        before = model(e, t)
        model.token_embedding.weight[5] += 1.0  # so this can only act through the output head
        after = model(e, t)
    changed = (after - before).abs().amax(dim=(0, 1)) > 1e-6
    assert changed[5] and changed.sum() == 1
    assert before.shape == (2, 4, 60)


def test_embedding_norm_is_irrelevant():
    model = random_decoder(TINY)
    e, t = torch.randn(2, 32), torch.randint(1, 60, (2, 3))
    assert torch.allclose(model(e, t), model(7.5 * e, t), atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, DEFAULT], ids=["tiny", "default"])
def test_incremental_equals_full_recomputation(cfg):
    model = random_decoder(cfg, seed=1)
    B = 3
    torch.manual_seed(2)
    embeds = torch.randn(B, cfg.embed_dim)
    tokens = torch.randint(1, cfg.vocab_size, (B, cfg.max_new_tokens))
    with torch.no_grad():
        full = model(embeds, tokens)                # [B, Cmax, V]
        logits, cache = model.prefill(embeds)
        assert cache.shape == (cfg.layers, 2, B, cfg.heads, cfg.seq_len, cfg.head_dim)
        assert (logits - full[:, 0]).abs().max() <= 1e-5
        for j in range(cfg.max_new_tokens):
            position = torch.tensor(cfg.prefix_len + j)
            logits, cache = model.step(tokens[:, j], position, cache)
            assert (logits - full[:, j + 1]).abs().max() <= 1e-5, f"step {j}"


def test_step_does_not_touch_its_input_cache():
    model = random_decoder(TINY)
    with torch.no_grad():
        _, cache = model.prefill(torch.randn(2, 32))
        copy = cache.clone()
        model.step(torch.tensor([3, 4]), torch.tensor(TINY.prefix_len), cache)
    assert torch.equal(cache, copy)


def test_step_writes_only_its_slot_and_never_reads_later_ones():
    """The step's contract for the cache: the output equals the input except at slot `position`,
    and nothing at or after `position` is read (those slots hold stale values from earlier
    searches when a runtime reuses its buffers), so junk there changes neither logits nor cache."""
    model = random_decoder(TINY)
    P, S = TINY.prefix_len, TINY.seq_len
    with torch.no_grad():
        _, cache = model.prefill(torch.randn(2, 32))
        tokens = torch.tensor([3, 4])
        for position in (P, P + 2, S - 1):
            clean = cache.clone()
            clean[..., position:, :] = 0
            junk = clean.clone()
            junk[..., position:, :] = torch.randn_like(junk[..., position:, :]) * 100
            logits, out = model.step(tokens, torch.tensor(position), clean)
            logits_junk, out_junk = model.step(tokens, torch.tensor(position), junk)
            assert torch.equal(logits, logits_junk), position
            others = torch.arange(S) != position
            assert torch.equal(out[..., others, :], clean[..., others, :]), position
            assert torch.equal(out_junk[..., others, :], junk[..., others, :]), position
            assert torch.equal(out[..., position, :], out_junk[..., position, :]), position
            assert out[..., position, :].abs().amax() > 0, position   # the new K/V landed there


def test_invalid_config_is_one_clear_error():
    with pytest.raises(ValueError, match="not divisible by heads"):
        DecoderConfig(width=100, heads=8)
    with pytest.raises(ValueError, match="unknown decoder config keys"):
        DecoderConfig.from_dict({"embed_dim": 5, "colour": "red"})
