"""The NOVIC object decoder: CLIP embedding -> noun tokens (docs/model.md "The object decoder").

One module serves training (teacher forcing), the reference decoders and export:
- ``forward(embeds, tokens)``: the whole sequence at once (training, oracle);
- ``prefill(embeds)`` + ``step(tokens, position, cache)``: incremental decoding with a
  fixed-size KV cache ``[layers, 2, N, heads, Smax, head_dim]`` (export, fast decoding).
Attention is written with explicit Q/K/V projections and an explicit mask so that the three
paths compute the same thing and export to plain ONNX ops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from novic.config import DecoderConfig


def attention_mask(seq_len: int, prefix_len: int, device=None) -> torch.Tensor:
    """Boolean [S, S], True where query i may attend key j: causal, prefix block bidirectional."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) | ((i < prefix_len) & (j < prefix_len))


class SelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.out_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.attn_dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # [N, S, H] -> [N, heads, S, hd]
        n, s, _ = x.shape
        return x.view(n, s, self.heads, self.head_dim).transpose(1, 2)

    def qkv(self, h: torch.Tensor):  # [N, S, H] -> q, k, v [N, heads, S, hd]
        return self.split_heads(self.q_proj(h)), self.split_heads(self.k_proj(h)), self.split_heads(self.v_proj(h))

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:  # [N, heads, S, hd] -> [N, S, H] (projected)
        n, _, s, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(n, s, self.heads * self.head_dim))

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """q [N,h,Sq,hd], k/v [N,h,Sk,hd], mask bool broadcastable to [N,h,Sq,Sk] -> [N,Sq,H]."""
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = self.attn_dropout(scores.softmax(dim=-1))
        return self.merge_heads(weights @ v)

    def attend_step(self, q, k_new, v_new, cache_k, cache_v, cached) -> torch.Tensor:
        """One new token per row (inference): q/k_new/v_new [N,h,1,hd] attend over the cache's
        slots `cached` (bool [1,1,1,Smax]) plus the token's own key and value, which join here
        instead of being written into the cache first (the step writes them all at its end)."""
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = ((q @ cache_k.transpose(-1, -2)) * scale).masked_fill(~cached, float("-inf"))
        own = (q @ k_new.transpose(-1, -2)) * scale   # [N,h,1,1]: a MatMul like the cached scores
        weights = torch.cat([scores, own], dim=-1).softmax(dim=-1)
        return self.merge_heads(weights[..., :-1] @ cache_v + weights[..., -1:] * v_new)


class DecoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer, no biases, exact GELU."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps, bias=False)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps, bias=False)
        self.linear1 = nn.Linear(cfg.width, cfg.ffn_width, bias=False)
        self.linear2 = nn.Linear(cfg.ffn_width, cfg.width, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def feed_forward(self, x):
        return self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(self.norm2(x))))))

    def forward(self, x, mask, with_kv: bool = False):
        """x [N,S,H] -> x (and this layer's K/V [N,h,S,hd] with_kv, for the prefill's cache)."""
        q, k, v = self.attn.qkv(self.norm1(x))
        x = x + self.dropout(self.attn.attend(q, k, v, mask))
        x = x + self.feed_forward(x)
        return (x, k, v) if with_kv else x

    def forward_step(self, x, cache_k, cache_v, cached):
        """x [N,1,H], one new token per row -> x and the token's K/V [N,h,1,hd] (inference)."""
        q, k, v = self.attn.qkv(self.norm1(x))
        x = x + self.attn.attend_step(q, k, v, cache_k, cache_v, cached)
        return x + self.feed_forward(x), k, v


class ObjectDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.prefix_proj = nn.Linear(cfg.embed_dim, cfg.prefix_len * cfg.width, bias=False)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.seq_len, cfg.width))
        # Also the output head (weight tying); embeddings are not scaled by sqrt(H).
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps, bias=False)
        self.register_buffer("mask", attention_mask(cfg.seq_len, cfg.prefix_len), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif "norm" in name:
                nn.init.ones_(p)

    def prefix(self, embeds: torch.Tensor) -> torch.Tensor:
        """[N, F] CLIP embeddings (any norm) -> [N, P, H] prefix vectors."""
        embeds = F.normalize(embeds.float(), dim=-1)
        return self.prefix_proj(embeds).view(-1, self.cfg.prefix_len, self.cfg.width)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.token_embedding.weight)

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. tokens [N, T] (T <= Cmax-1, the targets shifted right) ->
        logits [N, T+1, V]; output j predicts target token j (output 0 at position P-1)."""
        P = self.cfg.prefix_len
        x = torch.cat([self.prefix(embeds), self.token_embedding(tokens)], dim=1)
        S = x.shape[1]
        x = self.embed_dropout(x + self.pos_embedding[:S])
        for layer in self.layers:
            x = layer(x, self.mask[:S, :S])
        return self.logits(x[:, P - 1:])

    # --- incremental decoding with a fixed-size KV cache -------------------------------
    def prefill(self, embeds: torch.Tensor):
        """-> logits [N, V] for the first token, cache [L, 2, N, heads, Smax, hd]."""
        cfg = self.cfg
        P, S = cfg.prefix_len, cfg.seq_len
        x = self.prefix(embeds) + self.pos_embedding[:P]
        mask = self.mask[:P, :P]
        keys, values = [], []
        pad = (0, 0, 0, S - P)  # zero slots P..Smax-1 of the cache
        for layer in self.layers:
            x, k, v = layer(x, mask, with_kv=True)
            keys.append(F.pad(k, pad))
            values.append(F.pad(v, pad))
        cache = torch.stack([torch.stack(keys), torch.stack(values)], dim=1)
        return self.logits(x[:, -1]), cache

    def step(self, tokens: torch.Tensor, position: torch.Tensor, cache: torch.Tensor):
        """tokens [N] at `position` (0-d or [1] int tensor, P <= position < Smax),
        cache [L, 2, N, heads, Smax, hd] -> logits [N, V] for the next token, updated cache.
        The cache is not modified in place (a new tensor is returned); only slot `position`
        changes, and slots from `position` on are never read. Inference only (no attention
        dropout)."""
        S = self.cfg.seq_len
        position = position.reshape(1)
        x = (self.token_embedding(tokens) + self.pos_embedding[position])[:, None, :]
        slots = torch.arange(S, device=tokens.device)
        cached = (slots < position)[None, None, None, :]   # [1,1,1,Smax]: the slots written so far
        layers, _, rows, heads, _, head_dim = cache.shape
        per_layer = cache.reshape(layers * 2, rows, heads, S, head_dim).unbind(0)   # K0, V0, K1, V1, ...
        new = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer.forward_step(x, per_layer[2 * i], per_layer[2 * i + 1], cached)
            new += [k, v]
        # Write every layer's new K/V into slot `position` at once: append them as slot Smax, then
        # take each slot from where it lives. Two plain copies; a Where per layer (broadcast over
        # the cache) made guided decoding 1.2-1.45x slower with onnxruntime on the CPU
        # (docs/benchmarks.md, "CPU", run 4; not yet measured on a GPU).
        new = torch.stack(new).reshape(layers, 2, rows, heads, 1, head_dim)
        take = torch.where(slots == position, S, slots)
        new_cache = torch.cat([cache, new], dim=4).index_select(4, take)
        return self.logits(x[:, 0]), new_cache
