"""The noun hierarchy of a bundle (torch-free, WordNet-free) and label roll-up (granularity).

``novic-export onnx`` stores ``hierarchy.json`` in the bundle (novic.export.hierarchy builds it from
WordNet 3.0): every synset that is the sense of one of the bundle's nouns, with all its hypernym
ancestors, and an index from noun text to synset::

    {"format": "novic-hierarchy", "format_version": 1, "source": "...", "licence": "...",
     "synsets": [[offset, name, [lemma, ...], [parent index, ...]], ...],
     "index": {"dog": 12, "domestic dog": 12, ...}}

``name`` is the usual WordNet name (``dog.n.01``: first lemma + its sense number); parents are the
hypernyms (``@``) and instance hypernyms (``@i``), so a synset may have several.

Placing a label text (``Hierarchy.place``), in this order:
1. a synset name (``dog.n.01``) or an ImageNet-style id (``n02084071``) of the table;
2. the text itself in the index (lower case, spaces; then spelling variants: accents folded,
   hyphen <-> space);
3. otherwise the text becomes a child of the first of its fallback phrases found in the index
   (``fallback_phrases``): the head of an "X of Y" phrase ("cup of tea" -> "cup"), then the
   trailing sub-phrases of a compound, longest first ("brazil nut tree" -> "nut tree" -> "tree";
   the last candidate is the head noun, the last word), then that word without a plural -s/-es.
The index of a bundle holds every bundle noun WordNet knows and every lemma whose first sense is
in the table, so a user's ``--vocab`` noun and free-decoded text are placed with no WordNet at run
time, and the exporter placed the bundle's nouns with the same rules.

Rolling up (``RollUp``): a label goes to its nearest ancestor in the target list (fewest hypernym
steps; at equal distance the target listed first wins); a label with no listed ancestor, or that
cannot be placed, stays as it is. Labels of one image that reach the same target are merged: their
probabilities are summed (beam hypotheses are distinct sequences, so the sum is the probability
of the union), the merged label carries the best-ranked member's fine label and path, and the
merged labels are ordered by summed probability, ties by the rank of their best member.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from novic.errors import NovicError

HIERARCHY_FILE = "hierarchy.json"
FORMAT_NAME = "novic-hierarchy"
FORMAT_VERSION = 1
GRANULARITIES = ("fine", "basic", "coarse")   # built-in levels; any other value is a file of targets
ROLL_CACHE_SIZE = 50_000   # texts remembered per RollUp (a few MB); free decoding can produce any text
_SYNSET_NAME = re.compile(r"^(.+)\.n\.(\d\d)$")
_WNID = re.compile(r"^n(\d{8})$")


class HierarchyError(NovicError, ValueError):
    """A missing or bad hierarchy, or a bad roll-up list; one line with the fix."""


# --- text forms shared with the exporter ------------------------------------------------------
def normalize(text: str) -> str:
    """The index's key form: lower case, '_' as space, single spaces."""
    return " ".join(str(text).replace("_", " ").lower().split())


def spellings(text: str) -> list[str]:
    """`text` normalised, then variants WordNet may spell differently (order = preference)."""
    norm = normalize(text)
    folded = "".join(c for c in unicodedata.normalize("NFKD", norm) if not unicodedata.combining(c))
    out = []
    for s in (norm, folded, norm.replace("-", " "), norm.replace(" ", "-"), folded.replace("-", " ")):
        if s and s not in out:
            out.append(s)
    return out


def fallback_phrases(text: str) -> list[str]:
    """Phrases to place an unknown noun phrase under, most specific first: the head of 'X of Y',
    the trailing sub-phrases of a compound (longest first, ending with the last word), and the
    last word without a plural ending."""
    words = normalize(text).split(" ")
    out = []
    if "of" in words[1:-1]:
        words = words[:words.index("of")]
        out.append(" ".join(words))                       # 'cup of tea' -> 'cup'
    out += [" ".join(words[i:]) for i in range(1, len(words))]
    head = words[-1]
    for stem in (head[:-2] if head.endswith("es") else None, head[:-1] if head.endswith("s") else None):
        if stem and len(stem) > 2 and stem not in out:
            out.append(stem)
    return out


# --- the table ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Place:
    """Where a label text sits: on `synset` itself (exact) or as an unlisted child of it."""

    text: str
    synset: int
    exact: bool
    via: str | None = None     # the fallback phrase that placed an inexact text


class Hierarchy:
    """The bundle's noun hierarchy: synsets (offset, name, lemmas, parent indices) + text index."""

    def __init__(self, offsets: list[str], names: list[str], lemmas: list[list[str]],
                 parents: list[list[int]], index: dict[str, int], source: str = ""):
        self.offsets, self.names, self.lemmas, self.parents = offsets, names, lemmas, parents
        self.index = index
        self.source = source
        self.by_name = {n: i for i, n in enumerate(names)}
        self.by_offset = {o: i for i, o in enumerate(offsets)}
        self.rollups: dict = {}     # rollup_for's cache
        self._by_lemma: dict[str, list[int]] | None = None

    @classmethod
    def from_dict(cls, data: dict, where: str = HIERARCHY_FILE) -> "Hierarchy":
        try:
            if data.get("format") != FORMAT_NAME or not isinstance(data.get("format_version"), int):
                raise ValueError(f"not a {FORMAT_NAME} file")
            if data["format_version"] > FORMAT_VERSION:
                raise ValueError(f"format_version {data['format_version']} is newer than this novic "
                                 f"supports ({FORMAT_VERSION}); upgrade novic")
            rows = data["synsets"]
            offsets, names, lemmas, parents = (list(column) for column in zip(*rows)) if rows else ([], [], [], [])
            index = data["index"]
            n = len(rows)
            ids = [p for ps in parents for p in ps] + list(index.values())
            if not all(type(i) is int and 0 <= i < n for i in ids):   # noqa: E721 (bool is no index)
                raise ValueError("a synset index is out of range or not an integer")
            if not all(type(w) is str for ws in lemmas for w in ws) or not all(type(x) is str for x in names):
                raise ValueError("a synset name or lemma is not a string")
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
            raise HierarchyError(f"{where}: invalid noun hierarchy ({exc}); re-export the bundle "
                                 f"with novic-export onnx") from None
        return cls(offsets, names, lemmas, parents, index, str(data.get("source", "")))

    @classmethod
    def load(cls, path: str | Path) -> "Hierarchy":
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HierarchyError(f"{p}: cannot read the noun hierarchy ({exc}); re-export the bundle "
                                 f"with novic-export onnx") from None
        return cls.from_dict(data, str(p))

    def __len__(self) -> int:
        return len(self.names)

    def label(self, synset: int) -> str:
        """A synset's display text: its first lemma."""
        return self.lemmas[synset][0] if self.lemmas[synset] else self.names[synset]

    def find(self, text: str) -> int | None:
        """The synset of a synset name, an 'nNNNNNNN' id, or an indexed spelling of `text`."""
        t = str(text).strip()
        if _SYNSET_NAME.match(t) and t in self.by_name:
            return self.by_name[t]
        m = _WNID.match(t)
        if m and m.group(1) in self.by_offset:
            return self.by_offset[m.group(1)]
        for s in spellings(t):
            if s in self.index:
                return self.index[s]
        return None

    def with_lemma(self, text: str) -> list[int]:
        """Synsets of the table that have `text` among their lemmas (any sense)."""
        if self._by_lemma is None:
            by_lemma: dict[str, list[int]] = {}
            for i, words in enumerate(self.lemmas):
                for w in words:
                    by_lemma.setdefault(normalize(w), []).append(i)
            self._by_lemma = by_lemma
        return list(self._by_lemma.get(normalize(text), []))

    def place(self, text: str) -> Place | None:
        """Where `text` sits (module doc: exact, then fallback phrases), or None."""
        found = self.find(text)
        if found is not None:
            return Place(text, found, True)
        for phrase in fallback_phrases(text):
            found = self.find(phrase)
            if found is not None:
                return Place(text, found, False, phrase)
        return None

    def distances(self, synset: int) -> dict[int, tuple[int, int | None]]:
        """{ancestor (or itself): (hypernym steps, the synset it was reached from)}, breadth first
        in parent order, so the first path found to an ancestor is a shortest one."""
        seen = {synset: (0, None)}
        queue = deque([synset])
        while queue:
            node = queue.popleft()
            for p in self.parents[node]:
                if p not in seen:
                    seen[p] = (seen[node][0] + 1, node)
                    queue.append(p)
        return seen

    def path(self, place: Place, target: int) -> list[str]:
        """Display texts from the label up to `target` (an ancestor of its synset)."""
        reach = self.distances(place.synset)
        chain, node = [], target
        while node is not None:
            chain.append(node)
            node = reach[node][1]
        chain.reverse()                               # place.synset ... target
        texts = [place.text] + [self.label(s) for s in (chain if not place.exact else chain[1:])]
        return [t for i, t in enumerate(texts) if i == 0 or t != texts[i - 1]]

    def relation(self, predicted: str, truth: str) -> str:
        """'correct' (same synset, a synonym, or the same text), 'close' (parent, child or sibling:
        one hypernym step apart, or sharing a parent) or 'incorrect'; 'unknown' when either text
        cannot be placed. An inexact label counts as an unlisted child of the synset it was placed
        under."""
        if normalize(predicted) == normalize(truth):
            return "correct"
        return self.relation_of(self.place(predicted), self.place(truth))

    def relation_of(self, a: Place | None, b: Place | None) -> str:
        """`relation` of two placed labels (a rolled-up label is placed on its target synset)."""
        if a is None or b is None:
            return "unknown"
        if a.exact and b.exact and a.synset == b.synset:
            return "correct"

        def node_and_parents(p: Place):   # an inexact text is an unlisted child of its synset
            return (p.synset, set(self.parents[p.synset])) if p.exact else (None, {p.synset})

        node_a, parents_a = node_and_parents(a)
        node_b, parents_b = node_and_parents(b)
        if node_a in parents_b or node_b in parents_a or parents_a & parents_b:
            return "close"
        return "incorrect"


# --- roll-up -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rolled:
    text: str                 # the rolled-up label (the fine label when nothing is listed above it)
    fine: str
    path: tuple[str, ...]     # fine label ... rolled-up label
    target: int | None        # index into RollUp.targets, or None when it stays fine


def read_targets(path: str | Path) -> list[str]:
    """One target per line (a noun, a synset name like dog.n.01, or an id like n02084071);
    '#' starts a comment; blank lines are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise HierarchyError(f"{p}: roll-up list not found; pass a text file with one target label "
                             f"per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HierarchyError(f"{p}: cannot read the roll-up list ({exc}); save it as UTF-8 text, one "
                             f"label per line") from None
    items = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    items = list(dict.fromkeys(i for i in items if i))
    if not items:
        raise HierarchyError(f"{p}: the roll-up list has no labels; put one target label per line")
    return items


def builtin_targets(level: str) -> list[str]:
    """The shipped anchor list of a level ('basic', 'coarse'): novic/runtime/granularity/LEVEL.txt."""
    ref = resources.files("novic.runtime") / "granularity" / f"{level}.txt"
    with resources.as_file(ref) as p:
        return read_targets(p)


class RollUp:
    """Maps labels to the nearest listed ancestor in a hierarchy (see the module doc)."""

    def __init__(self, hierarchy: Hierarchy, targets: list[str], name: str, builtin: bool = False):
        self.hierarchy = hierarchy
        self.name = name
        self.builtin = builtin      # a shipped list: anchors outside this bundle's nouns are expected
        self.targets: list[int] = []
        self.display: dict[int, str] = {}
        self.unknown: list[str] = []
        for t in targets:
            found = hierarchy.find(t)
            # a plain noun whose primary sense is not in the table may still name one of its
            # ancestors in another sense ('plant' the organism, not the factory): take those
            senses = [found] if found is not None else hierarchy.with_lemma(t)
            if not senses:
                self.unknown.append(t)      # not an ancestor of anything this bundle names
            shown = t.strip()
            for s in senses:
                if s not in self.display:
                    self.targets.append(s)
                    self.display[s] = hierarchy.label(s) if (_SYNSET_NAME.match(shown) or _WNID.match(shown)) \
                        else shown
        self._rank = {s: i for i, s in enumerate(self.targets)}
        self._cache: dict[str, Rolled] = {}

    def unknown_summary(self, limit: int = 5) -> str | None:
        if not self.unknown or self.builtin:
            return None
        shown = ", ".join(repr(u) for u in self.unknown[:limit])
        more = f" and {len(self.unknown) - limit} more" if len(self.unknown) > limit else ""
        return (f"{len(self.unknown)} label(s) of {self.name} are not in this bundle's noun hierarchy and never "
                f"match: {shown}{more}")

    def roll(self, text: str) -> Rolled:
        hit = self._cache.get(text)
        if hit is None:
            if len(self._cache) >= ROLL_CACHE_SIZE:   # free decoding in a long-lived service: any text
                self._cache.clear()
            hit = self._cache[text] = self._roll(text)
        return hit

    def _roll(self, text: str) -> Rolled:
        h = self.hierarchy
        place = h.place(text)
        if place is None:
            return Rolled(text, text, (text,), None)
        reach = h.distances(place.synset)
        listed = [(steps, self._rank[s], s) for s, (steps, _) in reach.items() if s in self._rank]
        if not listed:
            return Rolled(text, text, (text,), None)
        _, rank, target = min(listed)
        if place.exact and target == place.synset:
            return Rolled(self.display[target], text, (text,) if normalize(text) == normalize(self.display[target])
                          else (text, self.display[target]), rank)
        path = h.path(place, target)
        path[-1] = self.display[target]
        return Rolled(self.display[target], text, tuple(path), rank)

    def merge(self, labels) -> list[tuple[Rolled, float]]:
        """[(text, prob)] in rank order -> [(Rolled of the best member, summed prob)], ordered by
        summed prob, ties by the best member's rank."""
        groups: dict[tuple, list] = {}
        for rank, (text, prob) in enumerate(labels):
            r = self.roll(text)
            key = ("target", r.target) if r.target is not None else ("fine", r.fine)
            if key in groups:
                groups[key][1] += prob
            else:
                groups[key] = [r, prob, rank]
        ordered = sorted(groups.values(), key=lambda g: (-g[1], g[2]))
        return [(r, p) for r, p, _ in ordered]


def logprob_of(prob: float) -> float:
    return math.log(prob) if prob > 0 else float("-inf")


def rollup_for(bundle, granularity) -> RollUp | None:
    """The RollUp of a `granularity` over `bundle`'s hierarchy (cached per bundle): None or 'fine'
    -> None (labels as decoded); 'basic' / 'coarse' -> the shipped lists; a path -> a file of
    target labels (read_targets); a list/tuple of labels."""
    if granularity is None or granularity == "fine":
        return None
    if isinstance(granularity, (list, tuple)):
        if not granularity or not all(isinstance(t, str) for t in granularity):
            raise HierarchyError("granularity as a list must hold target labels as strings, at least one")
        key, load = ("list", tuple(granularity)), lambda: list(granularity)
        name = f"the list of {len(granularity)} labels"
    elif isinstance(granularity, str) and granularity in GRANULARITIES:
        key, load, name = ("builtin", granularity), lambda: builtin_targets(granularity), f"'{granularity}'"
    elif isinstance(granularity, (str, Path)) or hasattr(granularity, "__fspath__"):
        p = Path(granularity)
        if not p.is_file():
            raise HierarchyError(f"granularity {str(granularity)!r} is neither fine, basic, coarse nor a file of "
                                 f"target labels; pass one of those")
        st = p.stat()
        key, load, name = ("file", str(p.resolve()), st.st_mtime_ns, st.st_size), lambda: read_targets(p), str(p)
    else:
        raise HierarchyError(f"granularity must be fine, basic, coarse, a file path or a list of labels; "
                             f"got {type(granularity).__name__}")
    cache = bundle.hierarchy.rollups
    if key not in cache:
        rollup = RollUp(bundle.hierarchy, load(), name, builtin=key[0] == "builtin")
        if not rollup.targets:
            raise HierarchyError(f"none of the labels of {name} is in this bundle's noun hierarchy "
                                 f"(e.g. {rollup.unknown[0]!r}); use nouns, synset names (dog.n.01) or "
                                 f"ancestors of the bundle's nouns")
        cache[key] = rollup
    return cache[key]


def roll_up_result(result, rollup: RollUp, topk: int):
    """A classifier Result with its labels rolled up and merged, the top `topk` kept."""
    if not result.labels:
        return result
    label_type = type(result.labels[0])
    merged = rollup.merge([(label.text, label.prob) for label in result.labels])[:topk]
    result.labels = [label_type(r.text, logprob_of(p), p, fine=r.fine, path=r.path) for r, p in merged]
    return result


def roll_up_results(results, rollup: RollUp, topk: int):
    for result in results:
        yield roll_up_result(result, rollup, topk)
