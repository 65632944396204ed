"""Build the bundle's noun hierarchy (``hierarchy.json``, read by novic.runtime.hierarchy) from WordNet.

Each noun gets one sense, its *primary* one: the first WordNet sense (WordNet orders senses by
frequency) that is a physical entity (objects, organisms, food, ...), else the first sense; a
person sense tagged at most once in SemCor (WordNet's sense-tagged corpus) gives way to a later
physical sense that is not a person. This is what an image label most likely means ("mouse" the
animal, "table" the furniture, "tiger" the cat rather than "a fierce person", "man" the adult
male), but it is a rule, not a disambiguation: "cake" gets WordNet's first physical sense, a block
of soap or wax.
A noun WordNet does not know is placed with the runtime's fallback (novic.runtime.hierarchy:
head of "X of Y", trailing sub-phrases, plural -s) so that the runtime recomputes the same place.

The table keeps every placed synset and all its ancestors (hypernyms and instance hypernyms), and an
index: each noun WordNet knows -> its synset, plus every lemma of a kept synset whose primary sense
is that synset (so that a user's vocabulary and free-decoded text find their synonyms and
ancestors at run time without WordNet).
"""
from __future__ import annotations

import json
from pathlib import Path

from novic.runtime.hierarchy import FORMAT_NAME, FORMAT_VERSION, HIERARCHY_FILE, fallback_phrases, spellings
from novic.wordnet import (WORDNET_DIR, physical_synsets, read_noun_synsets, read_sense_index,
                           wordnet_available)

PERSON_LEXFILE = "18"   # noun.person
SOURCE = "WordNet 3.0 (Princeton University), Debian package wordnet-base"
LICENCE = ("WordNet 3.0 license: permission to use, copy, modify and distribute this software and database "
           "for any purpose, provided the copyright notice appears in all copies. "
           "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.")


class WordNetSenses:
    """Primary senses and synset names from a parsed WordNet."""

    def __init__(self, wordnet_dir: str | Path = WORDNET_DIR):
        self.synsets = read_noun_synsets(wordnet_dir)
        self.senses, self.counts = read_sense_index(wordnet_dir)
        hypernyms = {o: list(s.hypernyms) + list(s.instance_of) for o, s in self.synsets.items()}
        self.physical = physical_synsets(hypernyms)

    def primary(self, lemma: str) -> str | None:
        """The primary sense (see module doc) of a lemma in index spelling, or None."""
        offsets = self.senses.get(lemma)
        if not offsets:
            return None
        counts = self.counts.get(lemma, {})
        physical = [(i, o) for i, o in enumerate(offsets) if o in self.physical]
        for k, (i, o) in enumerate(physical):
            rare_person = self.synsets[o].lexfile == PERSON_LEXFILE and counts.get(("n", i + 1), 0) <= 1
            if not rare_person or not any(self.synsets[q].lexfile != PERSON_LEXFILE for _, q in physical[k + 1:]):
                return o
        return offsets[0]

    def lookup(self, text: str) -> str | None:
        """The primary sense of the first spelling of `text` WordNet knows."""
        for s in spellings(text):
            found = self.primary(s)
            if found is not None:
                return found
        return None

    def name(self, offset: str) -> str:
        """WordNet's usual synset name: first lemma + its sense number, 'dog.n.01'."""
        lemma = self.synsets[offset].words[0].lower()
        senses = self.senses.get(lemma, [])
        number = senses.index(offset) + 1 if offset in senses else 0
        return f"{lemma.replace(' ', '_')}.n.{number:02d}"

    def parents(self, offset: str) -> tuple[str, ...]:
        s = self.synsets[offset]
        return s.hypernyms + s.instance_of


def build_hierarchy(nouns, wordnet_dir: str | Path = WORDNET_DIR) -> dict:
    """The hierarchy.json data for `nouns` (texts)."""
    wn = WordNetSenses(wordnet_dir)
    exact: dict[str, str] = {}
    placed: set[str] = set()
    for noun in nouns:
        offset = wn.lookup(noun)
        if offset is not None:
            exact[spellings(noun)[0]] = offset
            placed.add(offset)
            continue
        for phrase in fallback_phrases(noun):   # the runtime finds this phrase in the index
            offset = wn.lookup(phrase)
            if offset is not None:
                placed.add(offset)
                break
    kept, stack = [], sorted(placed)
    seen = set()
    while stack:
        o = stack.pop()
        if o not in seen:
            seen.add(o)
            kept.append(o)
            stack.extend(wn.parents(o))
    kept.sort()
    row = {o: i for i, o in enumerate(kept)}
    index: dict[str, int] = {}
    for o in kept:
        for lemma in wn.synsets[o].words:
            key = spellings(lemma)[0]
            if key not in index and wn.primary(key) == o:
                index[key] = row[o]
    for key, o in exact.items():
        index[key] = row[o]
    rows = [[o, wn.name(o), list(wn.synsets[o].words), [row[p] for p in wn.parents(o)]] for o in kept]
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "source": SOURCE, "licence": LICENCE,
            "synsets": rows, "index": dict(sorted(index.items()))}


def write_hierarchy(root: Path, nouns, wordnet_dir: str | Path = WORDNET_DIR, warn=None) -> dict | None:
    """Write root/hierarchy.json for `nouns` -> {"file", "synsets", "nouns_placed", "source"} for the
    manifest (the caller adds the hash), or None with one warning line (via `warn`) when WordNet is
    not installed or there are no nouns."""
    if not nouns:
        return None
    if not wordnet_available(wordnet_dir):
        if warn:
            warn(f"WordNet not found at {wordnet_dir}: the bundle gets no noun hierarchy, so granularity "
                 f"(--granularity, --roll-up) and hierarchy-aware novic-eval will not work with it; install "
                 f"wordnet-base (apt-get install wordnet-base) and re-export to have them")
        return None
    data = build_hierarchy(nouns, wordnet_dir)
    path = Path(root) / HIERARCHY_FILE
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    placed = sum(1 for n in nouns if spellings(n)[0] in data["index"])
    return {"file": HIERARCHY_FILE, "synsets": len(data["synsets"]), "nouns_in_wordnet": placed,
            "source": SOURCE}
