"""Torch-free text encoders: noun text -> tokenizer ids, as the CLIP model's tokenizer does it.

The runtime uses these to turn a user's noun list into token sequences (for guided decoding)
without torch or open_clip:
- `ClipBpeEncoder`: a pure-Python port of open_clip's `SimpleTokenizer.encode` (CLIP byte-level
  BPE), reading the same merges file (`bpe_simple_vocab_16e6.txt.gz`, copied into bundles).
  It gives exactly SimpleTokenizer's ids. With the `regex` package it uses CLIP's own
  pre-tokeniser pattern; without it, an equivalent `re` pattern that agrees on ASCII/Latin text
  (it differs only for rare numeric characters like '²' or 'Ⅻ', which `re` treats as letters).
- `SentencePieceEncoder`: wraps the `sentencepiece` package (optional) for SigLIP-style models.
Both return ids without start/end tokens; map them with `TokenTable.compact_ids`.
"""
from __future__ import annotations

import gzip
import html
import re as _re
import string
from pathlib import Path

from novic.errors import NovicError
from novic.tokens import CLEAN_MODES, END_OF_WORD, bytes_to_unicode

try:
    import regex as _regex
except ImportError:  # documented fallback, see module docstring
    _regex = None

try:
    import ftfy as _ftfy
except ImportError:  # ftfy only repairs mojibake; clean text is unaffected without it
    _ftfy = None

NUM_MERGES = 49152 - 256 - 2   # CLIP uses the first 48894 merges of the file
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
CLIP_PATTERN = _CONTRACTIONS + r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# `re` has no \p{..}: letters = word chars minus digits and '_'; punctuation = neither.
CLIP_PATTERN_RE = _CONTRACTIONS + r"|[^\W\d_]+|\d|(?:[^\s\w]|_)+"


class EncoderError(NovicError):
    """A text encoder that cannot be built (missing file or package)."""


# --- text cleaning (open_clip's clean functions, without ftfy if it is missing) -------------
def basic_clean(text: str) -> str:
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def canonicalize(text: str) -> str:
    """big_vision's canonicalisation (SigLIP): no punctuation, lower case, single spaces."""
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.lower().split())


def clean_text(text: str, mode: str) -> str:
    """The cleaning open_clip applies before tokenising: 'lower' (CLIP), 'whitespace',
    'canonicalize' (SigLIP) or 'none'."""
    if mode == "none":
        return text
    if mode not in CLEAN_MODES:
        raise ValueError(f"unknown clean mode {mode!r}, expected one of {CLEAN_MODES}")
    text = basic_clean(text)
    if mode == "canonicalize":
        return canonicalize(text)
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


# --- CLIP BPE --------------------------------------------------------------------------------
def _pairs(word: tuple) -> set:
    return set(zip(word, word[1:]))


class ClipBpeEncoder:
    """CLIP byte-level BPE from its merges file (.txt or .txt.gz)."""

    kind = "clip_bpe"

    def __init__(self, merges_path: str | Path, clean: str = "lower", use_regex: bool | None = None):
        path = Path(merges_path)
        if not path.is_file():
            raise EncoderError(f"BPE merges file not found: {path} (open_clip ships "
                               f"bpe_simple_vocab_16e6.txt.gz; bundles carry a copy)")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise EncoderError(f"cannot read BPE merges file {path}: {e}") from None
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise EncoderError(f"{path} is not CLIP's BPE merges file (expected {NUM_MERGES} "
                               f"merge lines of two symbols after a header line)")
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.pieces = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.clean = clean
        self.sot_id, self.eot_id = self.encoder[SPECIAL_TOKENS[0]], self.encoder[SPECIAL_TOKENS[1]]
        self.eos_id = self.eot_id
        self.byte_encoder = bytes_to_unicode()
        if use_regex is None:
            use_regex = _regex is not None
        if use_regex and _regex is None:
            raise EncoderError("the `regex` package is not installed (pip install regex)")
        special = "|".join(SPECIAL_TOKENS)
        if use_regex:
            self.pattern = _regex.compile(special + "|" + CLIP_PATTERN, _regex.IGNORECASE)
        else:
            self.pattern = _re.compile(special + "|" + CLIP_PATTERN_RE, _re.IGNORECASE)
        self.cache = {t: t for t in SPECIAL_TOKENS}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def piece(self, token_id: int) -> str:
        return self.pieces[token_id]

    def bpe(self, token: str) -> str:
        """One pre-token (byte-mapped) -> its BPE pieces joined by spaces (open_clip's algorithm)."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + END_OF_WORD,)
        pairs = _pairs(word)
        if not pairs:
            return token + END_OF_WORD
        while True:
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Text -> tokenizer ids (no start/end tokens), exactly like SimpleTokenizer.encode."""
        ids = []
        for token in self.pattern.findall(clean_text(text, self.clean)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(token).split(" "))
        return ids


# --- sentencepiece ---------------------------------------------------------------------------
class SentencePieceEncoder:
    """A sentencepiece model file (e.g. SigLIP's T5 vocabulary) through the `sentencepiece` package."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path, clean: str = "canonicalize"):
        try:
            import sentencepiece
        except ImportError:
            raise EncoderError("encoding sentencepiece nouns needs the `sentencepiece` package "
                               "(pip install sentencepiece)") from None
        path = Path(model_path)
        if not path.is_file():
            raise EncoderError(f"sentencepiece model not found: {path}")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise EncoderError(f"{path} is not a sentencepiece model: {e}") from None
        self.clean = clean
        self.eos_id = max(self.sp.eos_id(), 0)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(clean_text(text, self.clean), out_type=int)
