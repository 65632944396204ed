"""Token table: compact token ids -> text, without torch, open_clip or a tokenizer library.

The decoder predicts "compact ids" (docs/model.md "Tokens"): the tokenizer ids that occur in the training
nouns, renumbered densely 1..V-1 in increasing tokenizer-id order, with 0 = EOS/PAD. A
`TokenTable` stores, per compact id, the token as the tokenizer spells it and its tokenizer id,
plus the rule that turns a token sequence back into text. It travels inside checkpoints and
bundles so that the runtime can detokenise with nothing but this module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from novic.errors import NovicError

KINDS = ("clip_bpe", "sentencepiece")
# Text cleaning applied before tokenisation (open_clip's names; see novic.bpe.clean_text).
CLEAN_MODES = ("lower", "whitespace", "canonicalize", "none")
DEFAULT_CLEAN = {"clip_bpe": "lower", "sentencepiece": "canonicalize"}

END_OF_WORD = "</w>"     # CLIP BPE: suffix of the last piece of a word
SP_SPACE = "\u2581"      # sentencepiece: '▁' marks a preceding space
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenTableError(NovicError, ValueError):
    """A token table that cannot be used (bad dict, unknown ids)."""


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character map (as in OpenAI's / open_clip's tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache()
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


# --- CLIP BPE detokenisation ---------------------------------------------------------------
# CLIP's pre-tokeniser splits text into words, single digits and punctuation runs and drops the
# whitespace, so "t-shirt" and "t - shirt" give the same tokens. Decoding puts a space after each
# word and then re-attaches the pieces that in noun phrases almost always touch their neighbour:
_ATTACH_BOTH = set("-_&+'’")          # "t-shirt", "r&b", "potter's" ('/' stays spaced: "a / b")
_ATTACH_LEFT = set(".,!?;:)]}%")       # "st. bernard", "(hat)"
_ATTACH_RIGHT = set("([{#$")


def _clip_words(pieces: list[str]) -> list[str]:
    """Pieces -> words: bytes between end-of-word markers, decoded as UTF-8."""
    decoder = unicode_to_bytes()
    words, buf = [], bytearray()
    for piece in pieces:
        end = piece.endswith(END_OF_WORD)
        body = piece[:-len(END_OF_WORD)] if end else piece
        buf.extend(decoder[c] for c in body)
        if end:
            words.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
    if buf:  # a sequence cut before its end-of-word marker
        words.append(buf.decode("utf-8", errors="replace"))
    return words


def _glue(left: str, right: str) -> bool:
    """Whether two adjacent CLIP words are written without a space between them."""
    if left[-1] in _ATTACH_BOTH or left[-1] in _ATTACH_RIGHT:
        return True
    if right[0] in _ATTACH_BOTH or right[0] in _ATTACH_LEFT:
        return True
    return left[-1].isdigit() and right[0].isdigit()   # digits are split one per token


def clip_detokenize(pieces: list[str]) -> str:
    words = [w for w in (w.strip() for w in _clip_words(pieces)) if w]
    out = words[:1]
    for word in words[1:]:
        out.append(word if _glue(out[-1], word) else " " + word)
    return " ".join("".join(out).split())


def sentencepiece_detokenize(pieces: list[str]) -> str:
    """'▁' -> space; byte-fallback pieces '<0xNN>' are collected and decoded as UTF-8."""
    out, buf = [], bytearray()
    for piece in pieces:
        m = _SP_BYTE.match(piece)
        if m:
            buf.append(int(m.group(1), 16))
            continue
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
        out.append(piece.replace(SP_SPACE, " "))
    if buf:
        out.append(buf.decode("utf-8", errors="replace"))
    return " ".join("".join(out).split())


# --- the table ------------------------------------------------------------------------------
@dataclass
class TokenTable:
    """Compact id -> token. `pieces[0] == ''` is EOS/PAD; `tokenizer_ids` is compact_unmap
    (entry 0: the tokenizer's EOS id, or 0); `clean` is the text cleaning the tokenizer applies
    before encoding (defaults per kind: 'lower' for CLIP BPE, 'canonicalize' for SigLIP's
    sentencepiece), so that a runtime encoder can reproduce the tokenisation of new nouns."""

    kind: str
    pieces: list[str]
    tokenizer_ids: list[int]
    clean: str = ""
    _index: dict[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.clean = self.clean or DEFAULT_CLEAN.get(self.kind, "")
        self.pieces = list(self.pieces)
        self.tokenizer_ids = [int(i) for i in self.tokenizer_ids]
        self._validate()

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def _validate(self):
        def bad(msg):
            raise TokenTableError(f"invalid token table: {msg}")

        if self.kind not in KINDS:
            bad(f"kind {self.kind!r} is not one of {KINDS}")
        if self.clean not in CLEAN_MODES:
            bad(f"clean {self.clean!r} is not one of {CLEAN_MODES}")
        if len(self.pieces) < 2:
            bad(f"needs EOS plus at least one token, got {len(self.pieces)} pieces")
        if len(self.tokenizer_ids) != len(self.pieces):
            bad(f"{len(self.pieces)} pieces but {len(self.tokenizer_ids)} tokenizer ids")
        if self.pieces[0] != "":
            bad(f"pieces[0] must be '' (EOS/PAD), got {self.pieces[0]!r}")
        for i, p in enumerate(self.pieces[1:], 1):
            if not isinstance(p, str) or not p:
                bad(f"piece {i} is {p!r}, expected a non-empty string")
        ids = self.tokenizer_ids
        if min(ids) < 0:
            bad("tokenizer ids must be >= 0")
        for i in range(2, len(ids)):
            if ids[i] <= ids[i - 1]:
                bad(f"tokenizer ids must increase with the compact id (compact {i - 1} -> "
                    f"{ids[i - 1]}, compact {i} -> {ids[i]})")
        if self.kind == "clip_bpe":
            known = unicode_to_bytes()
            for i, p in enumerate(self.pieces[1:], 1):
                body = p[:-len(END_OF_WORD)] if p.endswith(END_OF_WORD) else p
                if not body or any(c not in known for c in body):
                    bad(f"piece {i} {p!r} is not a CLIP byte-level BPE token")

    # --- ids <-> text ------------------------------------------------------------------------
    def tokens(self, ids) -> list[str]:
        """Pieces of `ids` up to (without) the first EOS."""
        out = []
        for i in ids:
            i = int(i)
            if i == 0:
                break
            if not 0 < i < len(self.pieces):
                raise TokenTableError(f"token id {i} is outside the token table (0..{len(self.pieces) - 1})")
            out.append(self.pieces[i])
        return out

    def decode(self, ids) -> str:
        """Compact ids -> text; stops at the first 0 (EOS). Whitespace is collapsed and stripped."""
        pieces = self.tokens(ids)
        if self.kind == "clip_bpe":
            return clip_detokenize(pieces)
        return sentencepiece_detokenize(pieces)

    def compact_ids(self, tokenizer_ids) -> list[int]:
        """Tokenizer ids -> compact ids. The tokenizer's EOS id maps to 0 (unless it is also a
        content token, which wins)."""
        if self._index is None:
            index = {self.tokenizer_ids[0]: 0}
            index.update((t, c) for c, t in enumerate(self.tokenizer_ids) if c > 0)
            self._index = index
        out, missing = [], []
        for t in tokenizer_ids:
            c = self._index.get(int(t))
            if c is None:
                missing.append(int(t))
            out.append(c)
        if missing:
            raise TokenTableError(
                f"tokenizer ids {sorted(set(missing))[:10]} are not in the token table: the text uses "
                f"tokens the decoder was never trained on (use nouns from the checkpoint's vocabulary)")
        return out

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, "clean": self.clean, "vocab_size": self.vocab_size,
                "pieces": list(self.pieces), "tokenizer_ids": list(self.tokenizer_ids)}

    @classmethod
    def from_dict(cls, data: dict) -> "TokenTable":
        if not isinstance(data, dict):
            raise TokenTableError(f"invalid token table: expected a dict, got {type(data).__name__}")
        missing = [k for k in ("kind", "pieces", "tokenizer_ids") if k not in data]
        if missing:
            raise TokenTableError(f"invalid token table: missing keys {missing}")
        unknown = set(data) - {"kind", "clean", "vocab_size", "pieces", "tokenizer_ids"}
        if unknown:
            raise TokenTableError(f"invalid token table: unknown keys {sorted(unknown)}")
        if not isinstance(data["pieces"], list) or not isinstance(data["tokenizer_ids"], list):
            raise TokenTableError("invalid token table: 'pieces' and 'tokenizer_ids' must be lists")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in data["tokenizer_ids"]):
            raise TokenTableError("invalid token table: 'tokenizer_ids' must be integers")
        table = cls(kind=data["kind"], pieces=data["pieces"], tokenizer_ids=data["tokenizer_ids"],
                    clean=data.get("clean", ""))
        if "vocab_size" in data and data["vocab_size"] != table.vocab_size:
            raise TokenTableError(f"invalid token table: vocab_size {data['vocab_size']} but "
                                  f"{table.vocab_size} pieces")
        return table
