"""From a training config to tensors: embedder, nouns -> token vocabulary, captions, cached
embeddings, training samples and evaluation sets."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from novic.train.cache import EmbeddingCache, build_cache
from novic.train.captions import CaptionSet, build_captions, load_templates, template_captions
from novic.train.config import EmbedderConfig, TrainConfig
from novic.train.nouns import Noun, load_nouns, wordnet_nouns


def load_embedder(cfg: EmbedderConfig, device="cpu"):
    """The text embedder named by the config (see novic.train.cache.TextEmbedder)."""
    cfg = cfg.checked()
    if cfg.type == "sentence_transformers":
        from novic.train.st_embedder import SentenceTransformerEmbedder
        return SentenceTransformerEmbedder(cfg.model, device=device)
    from novic.model.embedder import Embedder, EmbedderSpec
    return Embedder.load(EmbedderSpec(cfg.model, cfg.pretrained, cfg.config_file), device)


def output_tokenizer(embedder):
    """Decoder output tokens: the CLIP model's own tokenizer, or CLIP BPE for other embedders."""
    tok = getattr(embedder, "tokenizer", None)
    if tok is not None and type(tok).__name__ in ("SimpleTokenizer", "HFTokenizer", "SigLipTokenizer"):
        return tok
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def load_noun_list(cfg: TrainConfig) -> list[Noun]:
    d = cfg.data
    if d.nouns:
        return load_nouns(d.nouns)
    return wordnet_nouns(d.wordnet_dir, min_zipf=d.wordnet_min_zipf, max_nouns=d.wordnet_max_nouns)


@dataclass
class EvalSet:
    name: str
    embeds: np.ndarray     # float32 [n, F] clean unit embeddings
    nouns: np.ndarray      # int64 [n] target noun per row (single-target captions only)
    noised: bool


@dataclass
class TrainData:
    nouns: list[Noun]
    vocab: object                   # novic.model.tokenizer.NounVocab
    captions: CaptionSet
    cache: EmbeddingCache
    sample_caption: np.ndarray      # int64 [S]
    sample_noun: np.ndarray         # int64 [S]
    sample_weight: np.ndarray       # float32 [S]
    noun_tokens: torch.Tensor       # int64 [num_nouns, Cmax], EOS-padded
    noun_lengths: np.ndarray        # int64 [num_nouns]: content tokens + the first EOS
    eval_sets: list[EvalSet]

    @property
    def dim(self) -> int:
        return self.cache.dim

    @property
    def max_tokens(self) -> int:
        return self.noun_tokens.shape[1]


def _pad_tokens(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out


def prepare_data(cfg: TrainConfig, embedder, build: bool = True, barrier=lambda: None) -> TrainData:
    """`build`: this process computes missing cache shards (rank 0); the others wait at `barrier`
    and then open the finished cache."""
    from novic.model.tokenizer import build_noun_vocab

    nouns = load_noun_list(cfg)
    vocab = build_noun_vocab(output_tokenizer(embedder), [n.noun for n in nouns])
    captions = build_captions(nouns, cfg.captions)

    def cached(caps: CaptionSet) -> EmbeddingCache:
        if build:
            cache = build_cache(cfg.data.cache_root, embedder, caps.texts, caps.data_hash(),
                                shard_size=cfg.data.shard_size, batch_size=cfg.embedder.batch_size,
                                progress=cfg.progress)
        barrier()
        if not build:
            from novic.train.cache import cache_dir
            cache = EmbeddingCache(cache_dir(cfg.data.cache_root, embedder, caps.data_hash()))
        return cache

    cache = cached(captions)
    cap, noun, weight = captions.samples()
    rng = np.random.default_rng(cfg.seed + 7)
    single = np.flatnonzero(weight == 1.0)
    pick = np.sort(rng.choice(single, min(cfg.data.eval_samples, len(single)), replace=False))
    eval_sets = [EvalSet("train_noised", cache.get(cap[pick]), noun[pick].astype(np.int64), True)]
    if cfg.data.eval_templates:
        held = template_captions(nouns, load_templates(cfg.data.eval_templates),
                                 replace(cfg.captions, multi_ratio=0.0, seed=cfg.captions.seed + 1))
        rows = np.sort(rng.choice(len(held), min(cfg.data.eval_samples, len(held)), replace=False))
        # embed only the evaluated captions (all templates x forms x nouns can be 10-100x more)
        held = CaptionSet.build([held.texts[i] for i in rows],
                                [held.targets[held.offsets[i]:held.offsets[i + 1]].tolist() for i in rows])
        held_cache = cached(held)
        everything = np.arange(len(held))
        targets = held.targets[held.offsets[:-1]].astype(np.int64)
        eval_sets += [EvalSet("heldout_clean", held_cache.get(everything), targets, False),
                      EvalSet("heldout_noised", held_cache.get(everything), targets, True)]
    lengths = np.array([len(t) for t in vocab.noun_tokens], np.int64)
    return TrainData(nouns, vocab, captions, cache, cap, noun.astype(np.int64), weight,
                     _pad_tokens(vocab.noun_tokens), lengths, eval_sets)
