"""Noun vocabularies: read user noun lists, or build an object-noun list offline from WordNet.

A noun list is a list of `Noun` (noun, frequency, plural, aliases, plural_only). Files:
- ``.txt``: one noun per line (blank lines and lines starting with '#' are skipped);
- ``.json``: a list of strings or of objects {"noun", "frequency"?, "plural"?, "aliases"?,
  "plural_only"?} (or such a list under the key "nouns");
- ``.csv``: a header with a ``noun`` column and optional ``frequency``, ``plural``, ``aliases``
  (aliases separated by ``;``), ``plural_only`` (true/false).
Duplicates are dropped (first one kept); the order of the file is kept.

`wordnet_nouns()` reads the WordNet 3.0 database (Debian package ``wordnet-base``, installed under
/usr/share/wordnet; parsed by novic.wordnet), keeps the lemmas of noun synsets
below ``physical_entity`` (objects, organisms, food, artefacts, substances, natural formations;
not processes), and ranks them by the English word frequencies of the ``wordfreq`` package.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from novic.atomic import write_bytes_atomic
from novic.wordnet import (WORDNET_DIR, physical_synsets, read_irregular_plurals, read_sense_index,  # noqa: F401
                           read_wordnet_nouns)



@dataclass
class Noun:
    noun: str
    frequency: float | None = None  # any monotone popularity score (wordfreq Zipf for WordNet)
    plural: str | None = None
    aliases: list[str] = field(default_factory=list)  # other surface forms with the same target
    plural_only: bool = False  # the noun is itself plural ('eggs', 'scissors'): no singular captions

    @property
    def plural_form(self) -> str:
        """The plural captions use: the noun itself when it is plural-only, else its plural."""
        return self.noun if self.plural_only else (self.plural or pluralize(self.noun))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, [], False)}


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _noun_from_obj(obj, where: str) -> Noun:
    if isinstance(obj, str):
        obj = {"noun": obj}
    if not isinstance(obj, dict) or not _clean(obj.get("noun", "")):
        raise ValueError(f"{where}: expected a noun string or an object with a non-empty 'noun'")
    unknown = set(obj) - {"noun", "frequency", "plural", "aliases", "plural_only"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} "
                         f"(allowed: noun, frequency, plural, aliases, plural_only)")
    plural_only = obj.get("plural_only", False)
    if isinstance(plural_only, str):   # CSV cells
        plural_only = plural_only.strip().lower() in ("1", "true", "yes")
    if not isinstance(plural_only, bool):
        raise ValueError(f"{where}: plural_only {plural_only!r} must be true or false")
    freq = obj.get("frequency")
    if freq not in (None, ""):
        try:
            freq = float(freq)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: frequency {freq!r} is not a number") from None
    else:
        freq = None
    aliases = obj.get("aliases") or []
    if isinstance(aliases, str):
        aliases = aliases.split(";")
    return Noun(_clean(obj["noun"]), freq, _clean(obj.get("plural") or "") or None,
                [a for a in map(_clean, aliases) if a], plural_only)


def load_nouns(path: str | Path) -> list[Noun]:
    """Read a noun list (.txt, .json or .csv); raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noun list {path} does not exist")
    suffix = path.suffix.lower()
    nouns: list[Noun] = []
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        if isinstance(data, dict):
            data = data.get("nouns")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of nouns (or {{\"nouns\": [...]}})")
        nouns = [_noun_from_obj(obj, f"{path} item {i}") for i, obj in enumerate(data)]
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "noun" not in reader.fieldnames:
                raise ValueError(f"{path}: CSV needs a header row with a 'noun' column")
            nouns = [_noun_from_obj({k: v for k, v in row.items() if k and v not in (None, "")},
                                    f"{path} line {i + 2}") for i, row in enumerate(reader)]
    elif suffix in (".txt", ""):
        for line in path.read_text(encoding="utf-8").splitlines():
            line = _clean(line)
            if line and not line.startswith("#"):
                nouns.append(Noun(line))
    else:
        raise ValueError(f"{path}: unknown noun list format {suffix!r} (use .txt, .json or .csv)")
    seen, unique = set(), []
    for n in nouns:
        if n.noun not in seen:
            seen.add(n.noun)
            unique.append(n)
    if not unique:
        raise ValueError(f"{path}: no nouns found")
    return unique


def save_nouns(path: str | Path, nouns: list[Noun]) -> None:
    """Write a noun list as .json (all fields), .csv or .txt (nouns only)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps([n.to_dict() for n in nouns], indent=0, ensure_ascii=False) + "\n"
    elif suffix == ".csv":
        out = io.StringIO(newline="")
        w = csv.writer(out)
        w.writerow(["noun", "frequency", "plural", "aliases", "plural_only"])
        for n in nouns:
            w.writerow([n.noun, "" if n.frequency is None else n.frequency, n.plural or "",
                        ";".join(n.aliases), "true" if n.plural_only else ""])
        text = out.getvalue()
    else:
        text = "".join(n.noun + "\n" for n in nouns)
    write_bytes_atomic(path, text.encode("utf-8"))


# --- plurals ---------------------------------------------------------------------------------
def _plural_word(word: str, irregular: dict[str, str]) -> str:
    low = word.lower()
    if low in irregular:
        return irregular[low]
    if re.search(r"(s|x|z|ch|sh)$", low):
        return word + "es"
    if re.search(r"[^aeiou]y$", low):
        return word[:-1] + "ies"
    return word + "s"


def _head(words: list[str]) -> int:
    """Index of the head word: the word before ' of ' ('cup of tea'), else the last."""
    return words.index("of") - 1 if "of" in words[1:] else len(words) - 1


def is_plural_form(noun: str, singulars: set[str]) -> bool:
    """Whether a lemma is already plural ('eggs', 'glasses', 'fries', 'clothes'): its head word ends
    in s and drops to a word of `singulars` (WordNet's noun lemmas) by -s, -es or -ies -> -y.
    Such lemmas (WordNet lists 'eggs', 'works', 'arms' as nouns of their own) keep their form
    as their plural instead of getting 'eggses'."""
    words = noun.split(" ")
    head = words[_head(words)]
    if not head.endswith("s") or head.endswith(("ss", "us", "is", "'s")) or len(head) < 4:
        return False
    stems = [head[:-1], head[:-2] if head.endswith("es") else None,
             head[:-3] + "y" if head.endswith("ies") else None]
    return any(stem and stem in singulars for stem in stems)


def pluralize(noun: str, irregular: dict[str, str] | None = None) -> str:
    """English plural of a (possibly multi-word) noun: the head word is inflected, which is the
    word before ' of ' ('cup of tea' -> 'cups of tea') or else the last word."""
    irregular = irregular or {}
    words = noun.split(" ")
    head = _head(words)
    words[head] = _plural_word(words[head], irregular)
    return " ".join(words)


# --- WordNet (novic.wordnet reads the database) -------------------------------------------------
def is_object_noun(lemma: str, senses: dict, counts: dict, physical: set[str]) -> bool:
    """Mostly used as a noun (SemCor tag counts, 0.5 per untagged noun sense), and a physical
    meaning is one of its first two senses or carries >= 30 % of its noun uses. This drops
    homographs of function words ('in' = indium, 'be' = beryllium) and abstract nouns ('way')."""
    offsets = senses.get(lemma, [])
    parts = re.split(r"[ -]", lemma)
    if len(lemma) < 3 and lemma not in ("ox", "ax"):  # abbreviations: 're', 'co', 'tv'
        return False
    if not offsets or any(p in FUNCTION_WORDS for p in parts if p not in ("of", "the", "and")) \
            or parts[0] in FUNCTION_WORDS or parts[-1] in FUNCTION_WORDS:
        return False
    c = counts.get(lemma, {})
    noun = [c.get(("n", i + 1), 0) + 0.5 for i in range(len(offsets))]
    other = sum(v for (pos, _), v in c.items() if pos != "n")
    if sum(noun) < other:
        return False
    phys = sum(w for w, o in zip(noun, offsets) if o in physical)
    return any(o in physical for o in offsets[:2]) or phys >= 0.3 * sum(noun)


FUNCTION_WORDS = frozenset("""a an the he she it we you they me him her us them his hers its our
ours your yours their theirs this that these those who whom whose what which in on at by for from
to of off out up down over under as or and but nor so if then than there here be am is are was were
been being have has had do does did can could may might must shall should will would no not yes
one two three four five six seven eight nine ten all any some nothing something anything everything
how why when where don't know go make take set call read show""".split())


def wordnet_nouns(wordnet_dir: str | Path = WORDNET_DIR, min_zipf: float = 1.0,
                  max_nouns: int | None = None, max_words: int = 4) -> list[Noun]:
    """Object nouns from WordNet, most frequent first.

    min_zipf: wordfreq Zipf frequency threshold (1.0 keeps nearly everything wordfreq knows; 3.0
    keeps the common nouns, like the paper's FT2 subset). Nouns are lower-cased (CLIP tokenisers
    lower-case too); named individuals (instance synsets) are not included."""
    if max_nouns is not None and max_nouns < 1:
        raise ValueError(f"max_nouns must be >= 1 (or None for all), got {max_nouns}")
    try:
        from wordfreq import zipf_frequency
    except ImportError:
        raise ImportError("building a WordNet vocabulary needs wordfreq: pip install wordfreq") from None
    wordnet_dir = Path(wordnet_dir)
    lemmas, hypernyms = read_wordnet_nouns(wordnet_dir)
    senses, counts = read_sense_index(wordnet_dir)
    irregular = read_irregular_plurals(wordnet_dir)
    physical = physical_synsets(hypernyms)
    singulars = {lemma.lower() for group in lemmas.values() for lemma in group}
    names = set()
    for offset in physical:
        for lemma in lemmas[offset]:
            lemma = lemma.lower()
            if len(lemma.split()) <= max_words and re.fullmatch(r"[a-z][a-z' .-]*[a-z.]", lemma):
                names.add(lemma)
    nouns = []
    for name in names:
        if not is_object_noun(name, senses, counts, physical):
            continue
        # wordfreq estimates a phrase from its words (1/f = sum 1/f_i), which overrates phrases of
        # common words ('after part'); one Zipf unit per extra word puts them in line.
        freq = round(zipf_frequency(name, "en") - (len(re.split(r"[ -]", name)) - 1), 2)
        if freq >= min_zipf and freq > 0:
            if is_plural_form(name, singulars):
                nouns.append(Noun(name, freq, name, plural_only=True))
            else:
                nouns.append(Noun(name, freq, irregular.get(name) or pluralize(name, irregular)))
    nouns.sort(key=lambda n: (-n.frequency, n.noun))
    return nouns if max_nouns is None else nouns[:max_nouns]
