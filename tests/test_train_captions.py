"""Captions: articles, singular/plural, multi-noun weights, user captions and mixing ratio."""
import json

import numpy as np
import pytest

from novic.train.captions import (CaptionConfig, Template, article, build_captions,
                                  builtin_templates, load_user_captions, mix, template_captions)
from novic.train.nouns import Noun

NOUNS = [Noun("apple", plural="apples"), Noun("umbrella"), Noun("hour glass"), Noun("unicorn"),
         Noun("mouse", plural="mice", aliases=["computer mouse"]), Noun("box")]


def test_builtin_templates():
    imagenet, cifar = builtin_templates("imagenet"), builtin_templates("cifar")
    assert len(imagenet) == 80 and len(cifar) == 18
    both = builtin_templates()
    assert both[:80] == imagenet and set(both) == set(imagenet) | set(cifar)
    assert len(both) == len(set(both))
    with pytest.raises(ValueError, match="unknown template set"):
        builtin_templates("coco")


@pytest.mark.parametrize("word,art", [("apple", "an"), ("umbrella", "an"), ("unicorn", "a"),
                                      ("hour glass", "an"), ("dog", "a"), ("european", "a"),
                                      ("orange", "an"), ("one-armed bandit", "a")])
def test_article(word, art):
    assert article(word) == art


def test_template_rendering():
    t = Template("a photo of a {}.")
    assert t.render(["apple"], False) == "a photo of an apple."
    assert t.render(["apples"], True) == "a photo of apples."
    assert t.render(["cat", "owl"], False) == "a photo of a cat and an owl."
    assert t.render(["cat", "owl", "dog"], False) == "a photo of a cat, an owl and a dog."
    assert Template("a origami {}.").render(["crane"], False) == "an origami crane."
    assert Template("a plastic {}.").render(["owls"], True) == "plastic owls."
    assert Template("a photo of the large {}.").render(["apples"], True) == "a photo of the large apples."
    assert Template("a {} in a video game.").render(["egg"], False) == "an egg in a video game."
    assert Template("a photo of many {}.").numbers == (True,)
    assert Template("a photo of one {}.").numbers == (False,)
    with pytest.raises(ValueError, match="exactly one"):
        Template("a photo of {} and {}.")


def test_template_captions_cover_forms_and_targets():
    cfg = CaptionConfig(multi_ratio=0.0)
    caps = template_captions(NOUNS, ["a photo of a {}.", "a photo of many {}."], cfg)
    by_noun = {}
    for i, text in enumerate(caps.texts):
        assert caps.targets_of(i) == [caps.targets_of(i)[0]]
        by_noun.setdefault(NOUNS[caps.targets_of(i)[0]].noun, []).append(text)
    assert by_noun["apple"] == ["a photo of an apple.", "a photo of apples.", "a photo of many apples."]
    assert "a photo of a unicorn." in by_noun["unicorn"]
    assert "a photo of many mice." in by_noun["mouse"]
    assert "a photo of a computer mouse." in by_noun["mouse"]  # alias, target stays 'mouse'
    assert "a photo of boxes." in by_noun["box"]
    assert not any("many apple." in t for t in caps.texts)


def test_variants_per_noun_and_multi_noun_weights():
    cfg = CaptionConfig(variants_per_noun=7, multi_ratio=0.5, max_multi=3, seed=3)
    caps = template_captions(NOUNS, builtin_templates(), cfg)
    single = [i for i in range(len(caps)) if len(caps.targets_of(i)) == 1]
    assert len(single) == 7 * len(NOUNS)
    multi = [i for i in range(len(caps)) if len(caps.targets_of(i)) > 1]
    assert len(multi) == round(0.5 * len(single))
    cap, noun, weight = caps.samples()
    for i in multi:
        ids = caps.targets_of(i)
        assert 2 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        rows = cap == i
        assert np.allclose(weight[rows], 1 / len(ids)) and sorted(noun[rows]) == sorted(ids)
        assert " and " in caps.texts[i]
    # Each caption's weights sum to one: every caption counts the same in the loss.
    assert np.allclose(np.bincount(cap, weights=weight), 1.0)
    # Deterministic for a seed, different for another.
    assert template_captions(NOUNS, builtin_templates(), cfg).texts == caps.texts
    other = CaptionConfig(variants_per_noun=7, multi_ratio=0.5, seed=4)
    assert template_captions(NOUNS, builtin_templates(), other).texts != caps.texts


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_user_captions_and_ratio(tmp_path):
    rows = [{"caption": "A red apple on a table.", "nouns": ["apple"]},
            {"caption": "A mouse next to a box.", "nouns": ["computer mouse", "box"]},
            {"caption": "Umbrellas in the rain.", "nouns": ["umbrella"]}]
    write_jsonl(tmp_path / "u.jsonl", rows)
    user = load_user_captions(tmp_path / "u.jsonl", NOUNS)
    assert user.texts[1] == "A mouse next to a box." and user.targets_of(1) == [4, 5]
    assert user.weights.tolist() == [1.0, 0.5, 0.5, 1.0]
    cfg = CaptionConfig(multi_ratio=0.0, user_captions=str(tmp_path / "u.jsonl"), user_ratio=0.2)
    caps = build_captions(NOUNS, cfg, templates=["a photo of a {}."])
    base = template_captions(NOUNS, ["a photo of a {}."], CaptionConfig(multi_ratio=0.0))
    assert caps.texts[:len(base)] == base.texts and caps.texts[len(base):] == user.texts
    n_user = caps.repeats[len(base):].sum()
    assert n_user / caps.repeats.sum() == pytest.approx(0.2, abs=0.02)
    # The samples repeat user captions instead of storing them twice.
    cap, _, _ = caps.samples()
    assert len(caps) == len(base) + 3
    assert (cap >= len(base)).sum() == sum(caps.repeats[len(base) + i] * len(user.targets_of(i))
                                           for i in range(3))
    # A small ratio subsamples.
    small = mix(base, user, 1 / (len(base) + 1))
    assert small.repeats[len(base):].sum() == 1


@pytest.mark.parametrize("line,match", [("{bad json", "line 1: invalid JSON"),
                                        ('{"caption": "x"}', "line 1: expected"),
                                        ('{"caption": "a cat", "nouns": ["cat"]}', "'cat' is not in")])
def test_user_caption_errors(tmp_path, line, match):
    (tmp_path / "u.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        load_user_captions(tmp_path / "u.jsonl", NOUNS)


def test_config_errors():
    with pytest.raises(ValueError, match="user_ratio"):
        CaptionConfig(user_ratio=1.0)
    with pytest.raises(ValueError, match="needs captions.user_captions"):
        CaptionConfig(user_ratio=0.1)
