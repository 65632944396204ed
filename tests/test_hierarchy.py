"""The bundle's noun hierarchy (export + runtime) and label roll-up (granularity)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
from typer.testing import CliRunner  # noqa: E402

from fixtures_runtime import classifier, runtime_bundle  # noqa: E402,F401  (fixtures)
from novic.runtime.hierarchy import Hierarchy, RollUp, fallback_phrases  # noqa: E402
from novic.wordnet import WORDNET_DIR  # noqa: E402

needs_wordnet = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="wordnet-base not installed")


# --- a direct WordNet lookup, independent of novic.wordnet: seek to a synset by its byte offset --------
class DirectWordNet:
    def __init__(self, d=WORDNET_DIR):
        self.data = open(d / "data.noun", "rb")
        self.index = {}
        for line in open(d / "index.noun", encoding="latin-1"):
            if not line.startswith(" "):
                f = line.split()
                self.index[f[0]] = f[-int(f[2]):]
        self.counts = {}
        for line in open(d / "cntlist.rev", encoding="latin-1"):
            key, number, count = line.split()
            if "%1:" in key:
                self.counts[(key.split("%")[0], int(number))] = int(count)

    def synset(self, offset: str):
        self.data.seek(int(offset))
        f = self.data.readline().decode("latin-1").split(" | ")[0].split()
        assert f[0] == offset
        n = int(f[3], 16)
        k = 4 + 2 * n
        ptrs = [f[k + 1 + 4 * i: k + 5 + 4 * i] for i in range(int(f[k]))]
        return f[1], [p[1] for p in ptrs if p[0] in ("@", "@i")]

    def ancestors(self, offset: str) -> set:
        seen, stack = set(), [offset]
        while stack:
            o = stack.pop()
            if o not in seen:
                seen.add(o)
                stack += self.synset(o)[1]
        return seen

    def physical(self, offset: str) -> bool:   # a path up to physical_entity that avoids process.n.06
        if offset == "00029677":
            return False
        return offset == "00001930" or any(self.physical(p) for p in self.synset(offset)[1])

    def primary(self, lemma: str) -> str:
        key = lemma.replace(" ", "_")
        offsets = self.index[key]
        phys = [(i, o) for i, o in enumerate(offsets) if self.physical(o)]
        for k, (i, o) in enumerate(phys):
            person = self.synset(o)[0] == "18"
            rare = person and self.counts.get((key, i + 1), 0) <= 1
            if not rare or all(self.synset(q)[0] == "18" for _, q in phys[k + 1:]):
                return o
        return offsets[0]


@needs_wordnet
def test_hierarchy_equals_direct_wordnet_lookup_for_1000_nouns():
    from novic.export.hierarchy import build_hierarchy

    direct = DirectWordNet()
    lemmas = sorted(direct.index)
    nouns = [lemmas[i].replace("_", " ") for i in range(0, len(lemmas), len(lemmas) // 1000)][:1000]
    assert len(nouns) == 1000
    h = Hierarchy.from_dict(json.loads(json.dumps(build_hierarchy(nouns))))   # through JSON, as stored
    for noun in nouns:
        found = h.find(noun)
        assert found is not None, noun
        want = direct.primary(noun)
        assert h.offsets[found] == want, noun
        ours = {h.offsets[a] for a in h.distances(found)}
        assert ours == direct.ancestors(want), noun
        assert sorted(h.offsets[p] for p in h.parents[found]) == sorted(direct.synset(want)[1]), noun


@needs_wordnet
def test_primary_senses_of_everyday_nouns():
    from novic.export.hierarchy import WordNetSenses

    wn = WordNetSenses()
    assert {w: wn.name(wn.primary(w)) for w in ("dog", "table", "tiger", "man", "mouse")} == {
        "dog": "dog.n.01", "table": "table.n.02", "tiger": "tiger.n.02", "man": "man.n.01", "mouse": "mouse.n.01"}


# --- a hand-made hierarchy: roll-up rules without WordNet ------------------------------------------
def _toy() -> Hierarchy:
    #            entity(0)
    #      animal(1)      food(4)
    #  dog(2)  cat(3)    cake(5)   hot dog(6): food and (oddly) animal, to test ties
    rows = [("entity", []), ("animal", [0]), ("dog", [1]), ("cat", [1]), ("food", [0]), ("cake", [4]),
            ("hot dog", [4, 1])]
    return Hierarchy([f"{i:08d}" for i in range(len(rows))], [f"{n.replace(' ', '_')}.n.01" for n, _ in rows],
                     [[n] for n, _ in rows], [p for _, p in rows], {n: i for i, (n, _) in enumerate(rows)})


def test_rollup_sums_probabilities_and_orders_by_sum_then_rank():
    roll = RollUp(_toy(), ["animal", "food"], "test")
    merged = roll.merge([("cake", 0.3), ("dog", 0.25), ("xyzzy", 0.2), ("cat", 0.15), ("cake", 0.0)])
    assert [(r.text, r.fine, round(p, 6)) for r, p in merged] == [
        ("animal", "dog", 0.4), ("food", "cake", 0.3), ("xyzzy", "xyzzy", 0.2)]
    assert merged[0][0].path == ("dog", "animal")
    # equal sums: the group whose best member ranks first comes first
    tie = roll.merge([("cat", 0.2), ("cake", 0.2)])
    assert [r.text for r, _ in tie] == ["animal", "food"]
    tie = roll.merge([("cake", 0.2), ("cat", 0.2)])
    assert [r.text for r, _ in tie] == ["food", "animal"]


def test_rollup_nearest_ancestor_then_list_order():
    h = _toy()
    assert RollUp(h, ["animal", "food"], "t").roll("hot dog").text == "animal"   # both 1 step: first listed
    assert RollUp(h, ["food", "animal"], "t").roll("hot dog").text == "food"
    assert RollUp(h, ["entity", "dog"], "t").roll("dog").text == "dog"           # itself: 0 steps
    r = RollUp(h, ["entity"], "t").roll("dog")
    assert (r.text, r.path) == ("entity", ("dog", "animal", "entity"))
    unknown = RollUp(h, ["animal", "unicorn"], "my.txt")
    assert unknown.unknown == ["unicorn"] and "unicorn" in unknown.unknown_summary()


def test_rollup_cache_stays_bounded_and_answers_the_same(monkeypatch):
    """Free decoding in a long-lived service rolls up arbitrary texts: the cache must not grow
    without end, and a text rolled again after the cache was emptied rolls up the same way."""
    import novic.runtime.hierarchy as hierarchy

    monkeypatch.setattr(hierarchy, "ROLL_CACHE_SIZE", 3)
    roll = RollUp(_toy(), ["animal", "food"], "t")
    first = roll.roll("hot dog")
    for i in range(20):
        roll.roll(f"made-up thing {i}")
        assert len(roll._cache) <= 3
    assert roll.roll("hot dog") == first


def test_fallback_phrases_and_placement():
    assert fallback_phrases("brazil nut tree") == ["nut tree", "tree"]
    assert fallback_phrases("cup of tea") == ["cup"]
    assert fallback_phrases("dogs") == ["dog"]
    h = _toy()
    p = h.place("chocolate cake")
    assert (p.exact, h.names[p.synset], p.via) == (False, "cake.n.01", "cake")
    assert h.place("Hot_Dog").exact and h.place("00000002") is None and h.names[h.find("n00000002")] == "dog.n.01"
    assert h.relation("dog", "animal") == "close" and h.relation("dog", "cat") == "close"
    assert h.relation("chocolate cake", "cake") == "close" and h.relation("dog", "cake") == "incorrect"
    assert h.relation("dog", "xyzzy") == "unknown" and h.relation("Dog", "dog") == "correct"


# --- the exported bundle ----------------------------------------------------------------------------
@needs_wordnet
def test_bundle_carries_a_hashed_hierarchy(runtime_bundle):
    from novic.runtime.bundle import Bundle, sha256_file

    b = Bundle.open(runtime_bundle.bundle)
    entry = b.manifest["hierarchy"]
    assert entry["file"] == "hierarchy.json" and entry["sha256"] == sha256_file(runtime_bundle.bundle / "hierarchy.json")
    assert "hierarchy.json" in b.verify()
    h = b.hierarchy
    assert h.names[h.find("espresso")] == "espresso.n.01" and h.relation("espresso", "coffee") == "close"
    assert h.relation("adult female", "woman") == "correct"          # a synonym, from the index
    brazil = h.place("brazil nut tree")                               # not in WordNet: under 'nut tree'
    assert (brazil.exact, brazil.via) == (False, "nut tree") and h.relation("brazil nut tree", "nut tree") == "close"


@needs_wordnet
def test_tampered_hierarchy_is_refused(runtime_bundle, tmp_path):
    from novic.runtime.bundle import Bundle, BundleError

    copy = tmp_path / "b"
    shutil.copytree(runtime_bundle.bundle, copy)
    data = (copy / "hierarchy.json").read_bytes()
    (copy / "hierarchy.json").write_bytes(data.replace(b'"dog"', b'"cog"', 1))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Bundle.open(copy).hierarchy   # noqa: B018


def test_export_without_wordnet_skips_with_one_warning(runtime_bundle, tmp_path):
    import io

    from rich.console import Console

    from novic.export.bundle import export_bundle
    from novic.runtime.bundle import Bundle

    log = io.StringIO()
    export_bundle(runtime_bundle.checkpoint, tmp_path / "b", fp16=False, wordnet_dir=tmp_path / "no-wordnet",
                  console=Console(file=log, width=400))
    warnings = [line for line in log.getvalue().splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "wordnet-base" in warnings[0] and "re-export" in warnings[0]
    b = Bundle.open(tmp_path / "b", verify="eager")
    assert b.manifest["hierarchy"] is None and not b.has_hierarchy
    assert not (tmp_path / "b" / "hierarchy.json").exists()


def _old_bundle(runtime_bundle, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(runtime_bundle.bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m.pop("hierarchy", None)
    (copy / "manifest.json").write_text(json.dumps(m))
    (copy / "hierarchy.json").unlink(missing_ok=True)
    return copy


def test_old_bundle_loads_and_says_granularity_needs_a_reexport(runtime_bundle, tmp_path):
    from novic.cli.run import app
    from novic.runtime.bundle import BundleError
    from novic.runtime.classifier import Classifier

    old = _old_bundle(runtime_bundle, tmp_path)
    img = Image.fromarray(np.full((40, 40, 3), 90, np.uint8))
    with Classifier.load(old, backend="ort-cpu") as clf:
        assert clf.classify([img], topk=2)[0].ok
        with pytest.raises(BundleError, match="no noun hierarchy.*re-export"):
            clf.classify([img], granularity="coarse")
    img.save(tmp_path / "a.png")
    out = CliRunner().invoke(app, ["--bundle", str(old), "--granularity", "basic", str(tmp_path / "a.png")])
    assert out.exit_code == 2 and "no noun hierarchy" in out.output and "Traceback" not in out.output


def _images(n=6):
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (48 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


@needs_wordnet
@pytest.mark.parametrize("level", ["basic", "coarse"])
def test_classify_granularity_sums_the_beam(classifier, level):
    from novic.runtime.hierarchy import rollup_for

    images = _images()
    fine = classifier.classify(images, topk=10, beam_width=10)
    rolled = classifier.classify(images, topk=10, beam_width=10, granularity=level)
    roll = rollup_for(classifier.bundle, level)
    for f, r in zip(fine, rolled):
        want: dict = {}
        for label in f.labels:
            t = roll.roll(label.text).text
            want[t] = want.get(t, 0.0) + label.prob
        assert {l.text: l.prob for l in r.labels} == pytest.approx(want, rel=1e-9)
        probs = [l.prob for l in r.labels]
        assert probs == sorted(probs, reverse=True)
        assert all(math.isclose(l.logprob, math.log(l.prob)) for l in r.labels)
        best = r.labels[0]
        assert best.fine in [l.text for l in f.labels] and best.path[0] == best.fine and best.path[-1] == best.text
        assert r.to_dict()["labels"][0].keys() == {"text", "logprob", "prob", "fine", "path"}
    assert fine[0].to_dict()["labels"][0].keys() == {"text", "logprob", "prob"}   # fine: today's output


@needs_wordnet
def test_novic_run_granularity_and_roll_up_json(runtime_bundle, tmp_path):
    from novic.cli.run import app

    _images(1)[0].save(tmp_path / "a.png")
    targets = tmp_path / "targets.txt"
    targets.write_text("# mine\nperson\nplant\nunicorn\n")
    out = CliRunner().invoke(app, ["--bundle", str(runtime_bundle.bundle), "--json", "-q", "--topk", "5",
                                   "--roll-up", str(targets), str(tmp_path / "a.png")])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.splitlines() if line.startswith("{")]
    labels = rows[0]["labels"]
    assert all({"text", "fine", "path"} <= l.keys() for l in labels)
    assert {"person", "plant"} & {l["text"] for l in labels}
    for l in labels:
        assert l["path"][0] == l["fine"] and l["path"][-1] == l["text"]
    assert "unicorn" in out.output    # the one warning line about an unknown target
    bad = CliRunner().invoke(app, ["--bundle", str(runtime_bundle.bundle), "--granularity", "medium",
                                   str(tmp_path / "a.png")])
    assert bad.exit_code == 2 and "use fine, basic or coarse" in bad.output


@pytest.mark.parametrize("data, why", [
    ({}, "not a novic-hierarchy file"),
    ({"format": "novic-hierarchy", "format_version": 9, "synsets": [], "index": {}}, "upgrade novic"),
    ({"format": "novic-hierarchy", "format_version": 1, "synsets": [["0", "a.n.01", ["a"], [5]]], "index": {}},
     "out of range"),
    ({"format": "novic-hierarchy", "format_version": 1, "synsets": [["0", "a.n.01", ["a"]]], "index": {}}, "invalid"),
    ({"format": "novic-hierarchy", "format_version": 1, "synsets": [], "index": {"a": True}}, "not an integer"),
])
def test_invalid_hierarchy_is_one_clear_error(data, why):
    from novic.runtime.hierarchy import HierarchyError

    with pytest.raises(HierarchyError, match=why) as info:
        Hierarchy.from_dict(data, "b/hierarchy.json")
    assert str(info.value).startswith("b/hierarchy.json: ") and "\n" not in str(info.value)
