"""Noun vocabulary -> compact token table, from the CLIP model's own tokenizer.

`build_noun_vocab(tokenizer, nouns)` tokenises every noun (no start/end tokens, no padding),
keeps the tokenizer ids that occur, renumbers them densely 1..V-1 in increasing tokenizer-id
order (0 = EOS/PAD, docs/model.md "Tokens") and returns the `TokenTable` plus each noun's
compact sequence ending in EOS. Accepted tokenizers:
- open_clip `SimpleTokenizer` (CLIP byte-level BPE),
- open_clip `HFTokenizer` / `SigLipTokenizer` over a sentencepiece vocabulary (SigLIP family),
- `sentencepiece.SentencePieceProcessor`, and the torch-free encoders of `novic.bpe`.
"""
from __future__ import annotations

from dataclasses import dataclass

from novic.bpe import clean_text
from novic.config import EOS
from novic.errors import NovicError
from novic.tokens import SP_SPACE, TokenTable


class TokenizerError(NovicError, ValueError):
    """A tokenizer we cannot build a token table from, or a noun it cannot tokenise."""


class _Source:
    """What a token table needs from a tokenizer."""

    def __init__(self, kind, clean, eos_id, encode, piece):
        self.kind, self.clean, self.eos_id, self.encode, self.piece = kind, clean, eos_id, encode, piece


def _clean_name(fn) -> str:
    # open_clip's clean functions are named _clean_lower / _clean_whitespace / _clean_canonicalize
    name = getattr(fn, "__name__", "")
    return name[len("_clean_"):] if name.startswith("_clean_") else "none"


def token_source(tokenizer, clean: str | None = None) -> _Source:
    """Adapt a supported tokenizer; `clean` overrides its text cleaning (for raw sentencepiece)."""
    from novic.bpe import ClipBpeEncoder, SentencePieceEncoder

    if isinstance(tokenizer, (ClipBpeEncoder, SentencePieceEncoder)):
        return _Source(tokenizer.kind, clean or tokenizer.clean, tokenizer.eos_id,
                       tokenizer.encode, tokenizer.piece)
    name = type(tokenizer).__name__
    if name == "SimpleTokenizer":  # open_clip CLIP BPE; encode() applies its own cleaning
        if clean:
            raise TokenizerError("SimpleTokenizer applies its own cleaning; do not pass clean=")
        return _Source("clip_bpe", _clean_name(tokenizer.clean_fn), tokenizer.eot_token_id,
                       tokenizer.encode, tokenizer.decoder.__getitem__)
    if name == "SentencePieceProcessor":
        mode = clean or "none"
        return _Source("sentencepiece", mode, max(tokenizer.eos_id(), 0),
                       lambda text: tokenizer.encode(clean_text(text, mode), out_type=int),
                       tokenizer.id_to_piece)
    if name in ("HFTokenizer", "SigLipTokenizer"):
        hf = tokenizer.tokenizer
        if not any(p.startswith(SP_SPACE) for p in hf.get_vocab()):
            raise TokenizerError(f"{type(hf).__name__} is not a sentencepiece vocabulary; token "
                                 f"tables support CLIP BPE and sentencepiece tokenizers only")
        mode = clean or (_clean_name(tokenizer.clean_fn) if name == "HFTokenizer" else "canonicalize")
        return _Source("sentencepiece", mode, hf.eos_token_id or 0,
                       lambda text: hf.encode(clean_text(text, mode), add_special_tokens=False),
                       lambda i: hf.convert_ids_to_tokens(i))
    raise TokenizerError(f"unsupported tokenizer {name}: expected open_clip's SimpleTokenizer or "
                         f"HFTokenizer, or a sentencepiece model")


@dataclass
class NounVocab:
    """Token table + compact sequence (ending in EOS) of every noun, in the given order."""

    table: TokenTable
    nouns: list[str]
    noun_tokens: list[list[int]]

    @property
    def max_tokens(self) -> int:
        """Cmax: the longest noun sequence including its EOS."""
        return max(len(t) for t in self.noun_tokens)


def build_noun_vocab(tokenizer, nouns: list[str], clean: str | None = None) -> NounVocab:
    src = token_source(tokenizer, clean)
    encoded = []
    for noun in nouns:
        ids = [int(i) for i in src.encode(noun)]
        if not ids:
            raise TokenizerError(f"noun {noun!r} tokenises to nothing (after {src.clean!r} cleaning); "
                                 f"remove it from the noun list")
        encoded.append(ids)
    used = sorted({i for ids in encoded for i in ids})
    table = TokenTable(kind=src.kind, pieces=[""] + [src.piece(i) for i in used],
                       tokenizer_ids=[src.eos_id] + used, clean=src.clean)
    compact = {t: c for c, t in enumerate(used, 1)}
    noun_tokens = [[compact[i] for i in ids] + [EOS] for ids in encoded]
    return NounVocab(table=table, nouns=list(nouns), noun_tokens=noun_tokens)


def encode_nouns(tokenizer, table: TokenTable, nouns: list[str]) -> list[list[int]]:
    """Compact sequences (+ EOS) of `nouns` in an existing table; an error names any noun that
    needs a token outside the table."""
    src = token_source(tokenizer, table.clean if type(tokenizer).__name__ != "SimpleTokenizer" else None)
    out = []
    for noun in nouns:
        ids = src.encode(noun)
        if not ids:
            raise TokenizerError(f"noun {noun!r} tokenises to nothing; remove it from the noun list")
        try:
            out.append(table.compact_ids(ids) + [EOS])
        except ValueError as e:
            raise TokenizerError(f"noun {noun!r}: {e}") from None
    return out
