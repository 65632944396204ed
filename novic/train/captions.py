"""Training captions: template captions of nouns, multi-noun captions, user caption files.

A `CaptionSet` is a list of caption texts, each with one or more target nouns (indices into the
noun list) and weights (1/m for a caption that names m nouns), and a repeat count (how often the
caption occurs per epoch; used to mix user captions in at a ratio without embedding them twice).
Training samples are (caption, target, weight) triples: `CaptionSet.samples()`.

Templates contain one ``{}`` for the noun phrase. Singular/plural and a/an are derived from the
determiner in front of ``{}`` (docs/model.md "Training": 80 ImageNet-style and 18 CIFAR-style templates
in singular and plural with the right article): 'a photo of a {}.' gives 'a photo of an apple.' and
'a photo of apples.'; 'a photo of many {}.' is plural only, 'a photo of one {}.' singular only.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from novic.train.nouns import Noun

# CIFAR-style prompts (as used for CLIP zero-shot on CIFAR-10/100): 18 templates.
CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]
DETERMINERS = ("a", "an", "the", "my", "one", "many")


def imagenet_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def builtin_templates(name: str = "imagenet+cifar") -> list[str]:
    """'imagenet' (80), 'cifar' (18) or 'imagenet+cifar' (distinct union), in a fixed order."""
    parts = {"imagenet": imagenet_templates, "cifar": lambda: list(CIFAR_TEMPLATES)}
    out: list[str] = []
    for part in name.split("+"):
        if part not in parts:
            raise ValueError(f"unknown template set {part!r} (use imagenet, cifar or imagenet+cifar, "
                             f"or a .txt file with one template per line)")
        out += [t for t in parts[part]() if t not in out]
    return out


def load_templates(spec: str) -> list[str]:
    """A built-in set name or a text file with one template per line (each with one '{}')."""
    path = Path(spec)
    if not path.suffix:
        return builtin_templates(spec)
    if not path.is_file():
        raise FileNotFoundError(f"template file {path} does not exist")
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    templates = [l for l in lines if l and not l.startswith("#")]
    for t in templates:
        Template(t)  # validates
    return templates


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows (by sound, with the common exceptions)."""
    w = phrase.lower()
    if re.match(r"(uni|use|usu|ura|uro|eu|ewe|one|once|ukulele|u-)", w):
        return "a"
    if re.match(r"(hour|honest|honou?r|heir)", w):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class Template:
    """'<prefix><det> <mods>{}<suffix>': the determiner and modifiers in front of the noun."""

    text: str

    def __post_init__(self):
        if self.text.count("{}") != 1:
            raise ValueError(f"caption template {self.text!r} must contain exactly one '{{}}'")

    def parts(self):
        before, suffix = self.text.split("{}")
        words = before.split(" ")[:-1] if before.endswith(" ") else before.split(" ")
        words = [w for w in words]
        for i in range(len(words) - 1, -1, -1):
            if words[i] in DETERMINERS:
                prefix = " ".join(words[:i]) + (" " if i else "")
                mods = " ".join(words[i + 1:]) + (" " if i + 1 < len(words) else "")
                return prefix, words[i], mods, suffix
        return before, "", "", suffix

    @property
    def numbers(self) -> tuple[bool, ...]:
        """Which grammatical numbers the template allows: (plural?) values."""
        det = self.parts()[1]
        return {"one": (False,), "many": (True,)}.get(det, (False, True))

    def render(self, forms: list[str], plural: bool) -> str:
        """Fill in one or more noun forms (already singular or plural as `plural` says)."""
        prefix, det, mods, suffix = self.parts()
        phrases = []
        for i, form in enumerate(forms):
            m = mods if i == 0 else ""
            if det in ("a", "an"):
                phrases.append(m + form if plural else f"{article(m + form)} {m}{form}")
            elif det and (i == 0 or det not in ("many",)):
                phrases.append(f"{det} {m}{form}")
            else:
                phrases.append(m + form)
        if len(phrases) == 1:
            np_ = phrases[0]
        else:
            np_ = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return prefix + np_ + suffix


@dataclass(frozen=True)
class CaptionConfig:
    templates: str = "imagenet+cifar"       # built-in set or a .txt file (one template per line)
    variants_per_noun: int | None = None    # sample this many (template, form) captions per noun
    plural: bool = True                     # also caption plural forms
    aliases: bool = True                    # also caption aliases (target stays the noun)
    multi_ratio: float = 0.1                # multi-noun captions per single-noun caption
    max_multi: int = 3                      # up to this many nouns in a multi-noun caption
    user_captions: str | None = None        # JSONL: {"caption": ..., "nouns": [...]}
    user_ratio: float = 0.0                 # fraction of training captions drawn from that file
    seed: int = 0

    def __post_init__(self):
        if self.variants_per_noun is not None and self.variants_per_noun < 1:
            raise ValueError("captions.variants_per_noun must be >= 1 (or null for all)")
        if self.multi_ratio < 0 or self.max_multi < 2:
            raise ValueError("captions.multi_ratio must be >= 0 and captions.max_multi >= 2")
        if not 0 <= self.user_ratio < 1:
            raise ValueError(f"captions.user_ratio must be in [0, 1), got {self.user_ratio}")
        if self.user_ratio > 0 and not self.user_captions:
            raise ValueError("captions.user_ratio > 0 needs captions.user_captions (a JSONL file)")
        if self.seed < 0:
            raise ValueError(f"captions.seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionSet:
    texts: list[str]
    offsets: np.ndarray        # int64 [n+1]: targets of caption i are [offsets[i], offsets[i+1])
    targets: np.ndarray        # int32 noun indices
    weights: np.ndarray        # float32, 1/m for m targets
    repeats: np.ndarray = field(default=None)  # int32 [n]: occurrences per epoch

    def __post_init__(self):
        if self.repeats is None:
            self.repeats = np.ones(len(self.texts), np.int32)

    def __len__(self) -> int:
        return len(self.texts)

    def targets_of(self, i: int) -> list[int]:
        return self.targets[self.offsets[i]:self.offsets[i + 1]].tolist()

    def samples(self):
        """-> (caption index int64, noun index int32, weight float32), one row per target and
        repeat: what one epoch of training iterates over."""
        per_caption = np.diff(self.offsets)
        caption = np.repeat(np.arange(len(self.texts)), per_caption)
        rep = np.repeat(self.repeats, per_caption)
        return (np.repeat(caption, rep).astype(np.int64), np.repeat(self.targets, rep),
                np.repeat(self.weights, rep))

    def data_hash(self) -> str:
        """sha256 of the texts in order: the embedding cache key (targets do not matter)."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8") + b"\n")
        return h.hexdigest()

    @classmethod
    def build(cls, texts: list[str], targets: list[list[int]], repeats=None) -> "CaptionSet":
        offsets = np.zeros(len(texts) + 1, np.int64)
        offsets[1:] = np.cumsum([len(t) for t in targets])
        flat = np.array([n for t in targets for n in t], np.int32)
        weights = np.array([1.0 / len(t) for t in targets for _ in t], np.float32)
        rep = None if repeats is None else np.asarray(repeats, np.int32)
        return cls(list(texts), offsets, flat, weights, rep)

    def concat(self, other: "CaptionSet") -> "CaptionSet":
        return CaptionSet(self.texts + other.texts,
                          np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]]),
                          np.concatenate([self.targets, other.targets]),
                          np.concatenate([self.weights, other.weights]),
                          np.concatenate([self.repeats, other.repeats]))


def _forms(noun: Noun, cfg: CaptionConfig) -> list[tuple[str, bool]]:
    """(surface form, is plural) of a noun: singular, plural, aliases (singular). A plural-only
    noun ('eggs', 'scissors') has only the plural form: no 'a photo of an eggs'."""
    if noun.plural_only:
        return [(noun.plural_form, True)] + ([(a, False) for a in noun.aliases] if cfg.aliases else [])
    out = [(noun.noun, False)]
    if cfg.plural:
        out.append((noun.plural_form, True))
    if cfg.aliases:
        out += [(a, False) for a in noun.aliases]
    return out


def template_captions(nouns: list[Noun], templates: list[str], cfg: CaptionConfig) -> CaptionSet:
    """Single-noun captions (every template x form, or `variants_per_noun` of them sampled per
    noun) plus `multi_ratio` as many multi-noun captions with 2..max_multi distinct nouns."""
    rng = np.random.default_rng(cfg.seed)
    temps = [Template(t) for t in templates]
    texts, targets = [], []
    for i, noun in enumerate(nouns):
        variants = [(t, form, pl) for t in temps for form, pl in _forms(noun, cfg) if pl in t.numbers]
        if cfg.variants_per_noun and cfg.variants_per_noun < len(variants):
            pick = rng.choice(len(variants), cfg.variants_per_noun, replace=False)
            variants = [variants[j] for j in sorted(pick)]
        for t, form, pl in variants:
            texts.append(t.render([form], pl))
            targets.append([i])
    n_multi = int(round(cfg.multi_ratio * len(texts))) if len(nouns) >= 2 else 0
    for _ in range(n_multi):
        m = int(rng.integers(2, min(cfg.max_multi, len(nouns)) + 1))
        ids = rng.choice(len(nouns), m, replace=False).tolist()
        t = temps[int(rng.integers(len(temps)))]
        pl = bool(rng.choice(t.numbers))
        if True in t.numbers and any(nouns[j].plural_only for j in ids):
            pl = True   # a plural-only noun makes the phrase plural
        forms = [nouns[j].plural_form if pl else nouns[j].noun for j in ids]
        texts.append(t.render(forms, pl))
        targets.append(ids)
    return CaptionSet.build(texts, targets)


def load_user_captions(path: str | Path, nouns: list[Noun]) -> CaptionSet:
    """JSONL lines {"caption": str, "nouns": [str, ...]} (targets must be in the noun list,
    by noun or alias); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"user caption file {path} does not exist")
    index = {}
    for i, n in enumerate(nouns):
        for name in [n.noun] + n.aliases:
            index.setdefault(name, i)
    texts, targets = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {line_no}: invalid JSON ({e.msg})") from None
        caption, names = (obj.get("caption"), obj.get("nouns")) if isinstance(obj, dict) else (None, None)
        if not isinstance(caption, str) or not caption.strip() or not isinstance(names, list) \
                or not names:
            raise ValueError(f"{path} line {line_no}: expected {{\"caption\": str, \"nouns\": "
                             f"[str, ...]}} with a non-empty caption and at least one noun")
        ids = []
        for name in names:
            if name not in index:
                raise ValueError(f"{path} line {line_no}: noun {name!r} is not in the noun list "
                                 f"(add it there, or fix the caption's targets)")
            if index[name] not in ids:
                ids.append(index[name])
        texts.append(" ".join(caption.split()))
        targets.append(ids)
    if not texts:
        raise ValueError(f"{path}: no captions found")
    return CaptionSet.build(texts, targets)


def mix(base: CaptionSet, user: CaptionSet, ratio: float, seed: int = 0) -> CaptionSet:
    """Append `user` captions with repeat counts such that they make up `ratio` of the epoch's
    captions (repeated whole, plus a random remainder; or a random subset if there are many)."""
    want = int(round(ratio / (1 - ratio) * int(base.repeats.sum())))
    n = len(user)
    repeats = np.full(n, want // n, np.int32)
    extra = np.random.default_rng(seed).choice(n, want % n, replace=False)
    repeats[extra] += 1
    return base.concat(CaptionSet(user.texts, user.offsets, user.targets, user.weights, repeats))


def build_captions(nouns: list[Noun], cfg: CaptionConfig, templates: list[str] | None = None
                   ) -> CaptionSet:
    """Everything the config asks for: template captions, then user captions mixed in."""
    captions = template_captions(nouns, templates or load_templates(cfg.templates), cfg)
    if cfg.user_captions and cfg.user_ratio > 0:
        captions = mix(captions, load_user_captions(cfg.user_captions, nouns), cfg.user_ratio,
                       cfg.seed)
    return captions
