"""WordNet 3.0 noun database reader (torch-free, no WordNet library): shared by ``novic-train nouns``
(object-noun lists) and ``novic-export onnx`` (the noun hierarchy stored in a bundle).

The database is Debian's ``wordnet-base`` package, installed under /usr/share/wordnet. Licence:
WordNet 3.0 (Princeton University), a permissive BSD-style licence that allows use, copying and
redistribution with its copyright notice (the header of every data file; docs/training.md lists
the data licences). Files read here:

- ``data.noun``: one synset per line, addressed by its byte offset (the synset id): lexicographer
  file, lemmas, pointers (``@`` hypernym, ``@i`` instance hypernym, ...);
- ``index.noun``: lemma -> its synsets in WordNet's sense order (most frequent sense first);
- ``noun.exc``: irregular plurals; ``cntlist.rev``: SemCor sense tag counts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from novic.errors import option

WORDNET_DIR = Path("/usr/share/wordnet")
PHYSICAL_ENTITY = "00001930"    # physical_entity.n.01 in WordNet 3.0
EXCLUDED_ROOTS = ("00029677",)  # process.n.06 (physical processes are not objects)
NAME_LEXFILES = ("14", "15", "18")  # noun.group, noun.location, noun.person


def wordnet_available(wordnet_dir: str | Path = WORDNET_DIR) -> bool:
    d = Path(wordnet_dir)
    return (d / "data.noun").is_file() and (d / "index.noun").is_file()


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"WordNet database not found at {path}: install Debian's "
                             f"wordnet-base (apt-get install wordnet-base) or "
                             f"{option('pass wordnet_dir', 'pass --wordnet-dir DIR')}")


@dataclass(frozen=True)
class Synset:
    """One noun synset as data.noun lists it (lemmas with '_' turned into spaces, case kept)."""

    offset: str                     # 8 digits, the synset id
    lexfile: str                    # lexicographer file number, "05" = noun.animal
    words: tuple[str, ...]
    hypernyms: tuple[str, ...]      # '@' pointers
    instance_of: tuple[str, ...]    # '@i' pointers (named individuals: cities, people, ...)


@lru_cache(maxsize=2)  # parsing takes ~1 s; results are read-only
def read_noun_synsets(wordnet_dir: str | Path = WORDNET_DIR) -> dict[str, Synset]:
    """Parse data.noun -> {offset: Synset}."""
    path = Path(wordnet_dir) / "data.noun"
    if not path.is_file():
        raise _missing(path)
    synsets: dict[str, Synset] = {}
    with path.open(encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, n_words = fields[0], int(fields[3], 16)
            words = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
            k = 4 + 2 * n_words
            ptrs = [fields[k + 1 + 4 * i: k + 5 + 4 * i] for i in range(int(fields[k]))]
            synsets[offset] = Synset(offset, fields[1], tuple(words),
                                     tuple(p[1] for p in ptrs if p[0] == "@" and p[2] == "n"),
                                     tuple(p[1] for p in ptrs if p[0] == "@i" and p[2] == "n"))
    return synsets


@lru_cache(maxsize=2)
def read_wordnet_nouns(wordnet_dir: str | Path = WORDNET_DIR):
    """data.noun -> (lemmas {offset: [lemma]}, hypernyms {offset: [offset]}).
    Instance hypernyms (@i: named individuals such as cities and people) are not followed, and
    capitalised names of people, places and groups (lexicographer files 14, 15, 18) are left out."""
    lemmas: dict[str, list[str]] = {}
    hypernyms: dict[str, list[str]] = {}
    for offset, s in read_noun_synsets(wordnet_dir).items():
        words = [w for w in s.words if not w[:1].isupper()] if s.lexfile in NAME_LEXFILES else list(s.words)
        lemmas[offset] = [w for w in words if not (len(w) > 1 and w.isupper())]  # acronyms
        hypernyms[offset] = list(s.hypernyms)
    return lemmas, hypernyms


def physical_synsets(hypernyms: dict[str, list[str]], root: str = PHYSICAL_ENTITY,
                     excluded: tuple[str, ...] = EXCLUDED_ROOTS) -> set[str]:
    """Synsets with `root` among their hypernym ancestors, skipping the `excluded` subtrees."""
    children: dict[str, list[str]] = {}
    for child, parents in hypernyms.items():
        for p in parents:
            children.setdefault(p, []).append(child)
    keep, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node in keep or node in excluded:
            continue
        keep.add(node)
        stack.extend(children.get(node, []))
    return keep


@lru_cache(maxsize=2)
def read_sense_index(wordnet_dir: str | Path = WORDNET_DIR):
    """-> (senses {lemma: [offset, ...]} in WordNet's sense order, tag counts
    {lemma: {(pos, sense_number): count}}) from index.noun and cntlist.rev (SemCor tag counts).
    Lemmas are lower case with spaces (index.noun's own spelling)."""
    wordnet_dir = Path(wordnet_dir)
    if not (wordnet_dir / "index.noun").is_file():
        raise _missing(wordnet_dir / "index.noun")
    senses: dict[str, list[str]] = {}
    for line in (wordnet_dir / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        f = line.split()
        n_synsets, n_ptr = int(f[2]), int(f[3])
        senses[f[0].replace("_", " ")] = f[6 + n_ptr: 6 + n_ptr + n_synsets]
    counts: dict[str, dict[tuple[str, int], int]] = {}
    cntlist = wordnet_dir / "cntlist.rev"
    if cntlist.is_file():
        for line in cntlist.read_text(encoding="latin-1").splitlines():
            key, number, count = line.split()
            lemma, rest = key.split("%", 1)
            pos = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}[rest[0]]
            counts.setdefault(lemma.replace("_", " "), {})[(pos, int(number))] = int(count)
    return senses, counts


@lru_cache(maxsize=2)
def read_irregular_plurals(wordnet_dir: str | Path = WORDNET_DIR) -> dict[str, str]:
    """singular -> plural from WordNet's noun.exc (which lists plural -> singular)."""
    out: dict[str, str] = {}
    for line in (Path(wordnet_dir) / "noun.exc").read_text(encoding="latin-1").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] != parts[1]:
            out.setdefault(parts[1].replace("_", " "), parts[0].replace("_", " "))
    return out
