"""Noun lists: file formats, validation, plurals, and the offline WordNet builder."""
import json

import pytest

from novic.train.nouns import Noun, is_plural_form, load_nouns, pluralize, save_nouns, wordnet_nouns, WORDNET_DIR


def test_txt_skips_comments_blanks_and_duplicates(tmp_path):
    p = tmp_path / "n.txt"
    p.write_text("# my nouns\ndog\n\n  red   velvet cake \ncat\ndog\n")
    assert [n.noun for n in load_nouns(p)] == ["dog", "red velvet cake", "cat"]


def test_json_and_csv_fields_roundtrip(tmp_path):
    items = [{"noun": "mouse", "frequency": 4.5, "plural": "mice", "aliases": ["computer mouse"]},
             "cat", {"noun": "sheep", "plural": "sheep"}]
    (tmp_path / "n.json").write_text(json.dumps(items))
    nouns = load_nouns(tmp_path / "n.json")
    assert nouns[0] == Noun("mouse", 4.5, "mice", ["computer mouse"])
    assert nouns[1] == Noun("cat") and nouns[2].plural == "sheep"
    for ext in ("csv", "json"):
        save_nouns(tmp_path / f"out.{ext}", nouns)
        assert load_nouns(tmp_path / f"out.{ext}") == nouns
    (tmp_path / "w.json").write_text(json.dumps({"nouns": ["a b", "c"]}))
    assert [n.noun for n in load_nouns(tmp_path / "w.json")] == ["a b", "c"]


@pytest.mark.parametrize("name,text,match", [
    ("bad.csv", "word,frequency\ndog,3\n", "'noun' column"),
    ("bad2.csv", "noun,frequency\ndog,often\n", "line 2: frequency 'often'"),
    ("bad.json", "[\"dog\", {\"nouns\": 1}]", "item 1"),
    ("bad2.json", "{\"dog\": 1", "invalid JSON"),
    ("bad3.json", "[{\"noun\": \"dog\", \"colour\": \"red\"}]", "unknown field"),
    ("empty.txt", "# nothing\n", "no nouns"),
    ("n.xml", "<dog/>", "unknown noun list format"),
])
def test_bad_files_give_one_clear_error(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_nouns(tmp_path / name)
    assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_pluralize():
    irregular = {"mouse": "mice", "child": "children"}
    cases = {"dog": "dogs", "box": "boxes", "church": "churches", "cherry": "cherries",
             "toy": "toys", "computer mouse": "computer mice", "cup of tea": "cups of tea",
             "child": "children", "bus": "buses"}
    for s, p in cases.items():
        assert pluralize(s, irregular) == p


def test_plural_lemmas_are_recognised():
    singulars = {"egg", "glass", "fry", "cloth", "work", "bus", "gas", "lens", "premise"}
    for word in ["eggs", "glasses", "fries", "clothes", "public works", "premises"]:
        assert is_plural_form(word, singulars), word
    for word in ["bus", "gas", "lens", "glass", "dog", "men's", "cup of tea"]:
        assert not is_plural_form(word, singulars), word


def test_plural_only_nouns_get_no_singular_captions(tmp_path):
    from novic.train.captions import CaptionConfig, template_captions

    nouns = [Noun("eggs", plural="eggs", plural_only=True), Noun("sheep", plural="sheep"), Noun("apple")]
    caps = template_captions(nouns, ["a photo of a {}.", "a photo of many {}."],
                             CaptionConfig(multi_ratio=0.0, seed=0))
    texts = set(caps.texts)
    assert "a photo of many eggs." in texts and "a photo of an apple." in texts and "a photo of apples." in texts
    assert not any("an eggs" in t or "a eggs" in t or "eggses" in t for t in texts)
    # a noun whose plural merely looks the same keeps its singular captions
    assert "a photo of a sheep." in texts and "a photo of many sheep." in texts
    for name in ("n.json", "n.csv"):                          # the flag survives the noun files
        save_nouns(tmp_path / name, nouns)
        assert [n.plural_only for n in load_nouns(tmp_path / name)] == [True, False, False], name
needs_wordnet = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                                   reason="wordnet-base not installed")


@needs_wordnet
def test_wordnet_builder_objects_ranked_with_plurals():
    pytest.importorskip("wordfreq")
    nouns = wordnet_nouns(min_zipf=3.0)
    names = {n.noun: n for n in nouns}
    assert len(nouns) >= 5000
    for word in ["dog", "apple", "car", "chair", "book", "mountain", "pizza", "violin", "oak"]:
        assert word in names, word
    # Function-word homographs, abstract nouns and proper names are not objects.
    for word in ["in", "be", "have", "way", "idea", "happiness", "paris", "eu"]:
        assert word not in names, word
    assert names["mouse"].plural == "mice" and names["child"].plural == "children"
    assert names["dog"].plural == "dogs"
    # plural lemmas keep their form (not 'eggses'); their singular twins still inflect
    assert names["eggs"].plural == "eggs" and names["eggs"].plural_only and names["egg"].plural == "eggs"
    assert not names["egg"].plural_only
    assert names["clothes"].plural == "clothes" and names["glass"].plural == "glasses"
    freqs = [n.frequency for n in nouns]
    assert freqs == sorted(freqs, reverse=True) and min(freqs) >= 3.0
    # The threshold makes nested subsets (like FT0 / FT2).
    top = wordnet_nouns(min_zipf=4.0)
    assert 0 < len(top) < len(nouns) and {n.noun for n in top} <= set(names)
    assert len(wordnet_nouns(min_zipf=3.0, max_nouns=100)) == 100


@pytest.mark.parametrize("max_nouns", [0, -3])
def test_wordnet_max_nouns_must_be_positive(tmp_path, max_nouns):
    # 0 used to mean "no limit" and -3 "all but the last 3"; both are refused before any reading.
    with pytest.raises(ValueError, match="max_nouns must be >= 1"):
        wordnet_nouns(tmp_path, max_nouns=max_nouns)


def test_wordnet_missing_dir_is_clear(tmp_path):
    pytest.importorskip("wordfreq")
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        wordnet_nouns(tmp_path)


def test_plural_only_noun_without_a_plural_field_in_multi_noun_captions():
    """A user's {"noun": "scissors", "plural_only": true} has no `plural`: single and multi-noun
    captions must both use the noun itself (multi-noun captions made "scissorses")."""
    from novic.train.captions import CaptionConfig, template_captions

    nouns = [Noun("scissors", plural_only=True), Noun("apple"), Noun("dog")]
    caps = template_captions(nouns, ["a photo of a {}.", "a photo of many {}."],
                             CaptionConfig(multi_ratio=1.0, seed=0))
    texts = " ".join(caps.texts)
    assert "scissors" in texts and "scissorses" not in texts
    assert any("scissors" in t and ("apple" in t or "dog" in t) for t in caps.texts)   # multi-noun ones ran
