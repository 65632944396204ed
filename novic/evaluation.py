"""`novic-eval`: measure a bundle on a labelled image set (torch-free; the logic behind novic.cli.eval).

DATA is a folder of class folders (ImageFolder layout: ``DATA/golden retriever/1.jpg``; '_' in a
folder name reads as a space, an ImageNet id ``n02084071`` names its synset) or a CSV file of
``path,label`` rows (a ``path,label`` header is optional; relative paths are relative to the CSV).

Scores (docs/labels.md):
- top-1 / top-5: the true label is the first / among the first five predictions, matched
  synonym-aware: the same text, or both texts are the same synset of the bundle's noun hierarchy
  ("domestic dog" = "dog").
- hierarchy-aware, on the top-1 prediction: *correct* (same synset, a synonym or the same text),
  *close* (one hypernym step apart: the prediction is the class's parent or child, or a sibling
  sharing a parent) or *incorrect*. A label the hierarchy cannot place matches by text only.
- with a granularity, predictions and true labels are both rolled up before matching.
Images that cannot be read are error rows: listed, not scored.
"""
from __future__ import annotations

import csv
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from novic.errors import NovicError
from novic.inputs import image_files
from novic.runtime.hierarchy import Place, normalize

RELATIONS = ("correct", "close", "incorrect")


class EvalError(NovicError, ValueError):
    """A dataset that cannot be evaluated; one line naming it and the fix."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: str


# --- reading DATA ---------------------------------------------------------------------------------
def read_dataset(data: str | Path) -> list[Sample]:
    """DATA (class folders or a path,label CSV) -> samples in a stable order."""
    data = Path(data)
    if data.is_dir():
        return _read_folders(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        return _read_csv(data)
    if not data.exists():
        raise EvalError(f"{data}: not found; pass a folder of class folders or a CSV of path,label rows")
    raise EvalError(f"{data}: not a folder or a .csv file; pass a folder of class folders or a CSV of "
                    f"path,label rows")


def _read_folders(root: Path) -> list[Sample]:
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = folder.name.replace("_", " ").strip()
        samples += [Sample(f, label) for f in image_files(folder)]
    if not samples:
        raise EvalError(f"{root}: no images in class folders (expected {root}/CLASS_NAME/IMAGE.jpg); put "
                        f"each class's images in a folder named after the class, or pass a CSV of path,label")
    return samples


def _read_csv(path: Path) -> list[Sample]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvalError(f"{path}: cannot read the CSV ({exc}); save it as UTF-8 with path,label rows") from None
    samples = []
    for i, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if i == 1 and [c.lower() for c in cells[:2]] == ["path", "label"]:
            continue
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise EvalError(f"{path} line {i}: expected two cells path,label, got {len(cells)} ({row!r}); "
                            f"quote paths or labels that contain commas")
        p = Path(cells[0])
        samples.append(Sample(str(p if p.is_absolute() else path.parent / p), cells[1]))
    if not samples:
        raise EvalError(f"{path}: no path,label rows; put one image path and its label per line")
    return samples


# --- scoring ---------------------------------------------------------------------------------------
class Scorer:
    """Places labels in the bundle's hierarchy (rolled up when a RollUp is given) and compares them."""

    def __init__(self, hierarchy=None, rollup=None):
        self.hierarchy = hierarchy
        self.rollup = rollup

    def node(self, text: str, fine: str | None = None) -> Place | None:
        """Where a label sits; a rolled-up label sits on its target synset."""
        if self.hierarchy is None:
            return None
        if self.rollup is not None:
            r = self.rollup.roll(fine if fine is not None else text)
            if r.target is not None:
                return Place(r.text, self.rollup.targets[r.target], True)
        return self.hierarchy.place(fine if fine is not None else text)

    def truth(self, label: str) -> str:
        """The true label at the evaluated granularity."""
        return self.rollup.roll(label).text if self.rollup is not None else label

    def relation(self, pred_text: str, pred_node, truth_text: str, truth_node) -> str:
        if normalize(pred_text) == normalize(truth_text):
            return "correct"
        if self.hierarchy is None:
            return "incorrect"
        rel = self.hierarchy.relation_of(pred_node, truth_node)
        return "incorrect" if rel == "unknown" else rel


def evaluate(clf, samples: list[Sample], *, granularity=None, guided: bool = True, vocab=None,
             beam_width: int = 10, batch_size: int = 32, k: int = 5, progress=None) -> dict:
    """Classify `samples` with a Classifier and score them -> the report dict (see write_report)."""
    from novic.runtime.hierarchy import rollup_for

    k = min(k, beam_width)
    rollup = rollup_for(clf.bundle, granularity)
    hierarchy = clf.bundle.hierarchy if clf.bundle.has_hierarchy else None
    scorer = Scorer(hierarchy, rollup)
    notes = []
    if hierarchy is None:
        notes.append(f"{clf.bundle.path} has no noun hierarchy: labels match by text only and the "
                     f"hierarchy-aware score is left out; re-export with novic-export onnx where wordnet-base "
                     f"is installed to have them")
    classes = list(dict.fromkeys(s.label for s in samples))
    truth_nodes = {c: scorer.node(c) for c in classes}
    unknown = [c for c in classes if hierarchy is not None and hierarchy.place(c) is None]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        notes.append(f"{len(unknown)} class name(s) are not nouns the bundle's hierarchy knows, so they match "
                     f"by exact text only: {shown}")

    t0 = time.perf_counter()
    rows, errors = [], []
    results = clf.iter_classify([s.path for s in samples], topk=k, guided=guided, vocab=vocab,
                                beam_width=beam_width, batch_size=batch_size, granularity=granularity)
    for sample, result in zip(samples, results):
        if progress is not None:
            progress()
        if result.error is not None or not result.labels:
            errors.append({"path": sample.path, "label": sample.label,
                           "error": result.error or "no label predicted"})
            continue
        truth = scorer.truth(sample.label)
        preds = result.labels
        nodes = [scorer.node(label.text, label.fine) for label in preds]
        rels = [scorer.relation(label.text, node, truth, truth_nodes[sample.label])
                for label, node in zip(preds, nodes)]
        rows.append({"path": sample.path, "label": sample.label, "truth": truth,
                     "predictions": [label.text for label in preds], "top1": rels[0] == "correct",
                     "topk": "correct" in rels, "relation": rels[0]})
    seconds = time.perf_counter() - t0
    return _report(rows, errors, classes, k, seconds, notes, hierarchy is not None, clf, granularity)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _report(rows, errors, classes, k, seconds, notes, has_hierarchy, clf, granularity) -> dict:
    n = len(rows)
    per_class = []
    for c in classes:
        mine = [r for r in rows if r["label"] == c]
        m = len(mine)
        entry = {"class": c, "images": m, "errors": sum(1 for e in errors if e["label"] == c),
                 "top1": _rate(sum(r["top1"] for r in mine), m), f"top{k}": _rate(sum(r["topk"] for r in mine), m),
                 "most_predicted": Counter(r["predictions"][0] for r in mine).most_common(1)[0][0] if mine else None}
        if has_hierarchy:
            entry.update({rel: _rate(sum(r["relation"] == rel for r in mine), m) for rel in RELATIONS})
        per_class.append(entry)
    confusions = Counter((r["label"], r["predictions"][0]) for r in rows if not r["top1"])
    return {
        "bundle": str(clf.bundle.path), "backend": clf.backend, "precision": clf.precision,
        "granularity": str(granularity or "fine"), "k": k,
        "images": n + len(errors), "scored": n, "failed": len(errors),
        "top1": _rate(sum(r["top1"] for r in rows), n), f"top{k}": _rate(sum(r["topk"] for r in rows), n),
        "hierarchy": {rel: _rate(sum(r["relation"] == rel for r in rows), n) for rel in RELATIONS}
        if has_hierarchy else None,
        "throughput": {"seconds": round(seconds, 3), "images_per_second": round((n + len(errors)) / seconds, 2)
                       if seconds > 0 else None},
        "per_class": per_class,
        "confusions": [{"class": c, "predicted": p, "count": cnt} for (c, p), cnt in confusions.most_common(20)],
        "errors": errors, "notes": notes, "rows": rows,
    }


# --- writing -----------------------------------------------------------------------------------------
def percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def markdown(report: dict, data: str) -> str:
    k = report["k"]
    h = report["hierarchy"]
    lines = [f"# novic-eval: {data}", "",
             f"Bundle `{report['bundle']}` on {report['backend']} ({report['precision']}), granularity "
             f"{report['granularity']}.", "",
             f"- images: {report['images']} ({report['scored']} scored, {report['failed']} failed)",
             f"- top-1: {percent(report['top1'])}, top-{k}: {percent(report[f'top{k}'])}"]
    if h is not None:
        lines.append(f"- top-1 by the hierarchy: correct {percent(h['correct'])}, close {percent(h['close'])}, "
                     f"incorrect {percent(h['incorrect'])}")
    t = report["throughput"]
    lines.append(f"- throughput: {t['images_per_second']} images/s ({t['seconds']} s)")
    lines += [f"- note: {note}" for note in report["notes"]]
    cols = ["class", "images", "top-1", f"top-{k}"] + (["correct", "close", "incorrect"] if h is not None else []) \
        + ["most predicted", "errors"]
    lines += ["", "## Per class", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in report["per_class"]:
        cells = [c["class"], str(c["images"]), percent(c["top1"]), percent(c[f"top{k}"])]
        if h is not None:
            cells += [percent(c[rel]) for rel in RELATIONS]
        cells += [c["most_predicted"] or "-", str(c["errors"])]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    if report["confusions"]:
        lines += ["", "## Most frequent confusions (top-1)", "", "| class | predicted | count |", "|---|---|---|"]
        lines += [f"| {c['class']} | {c['predicted']} | {c['count']} |" for c in report["confusions"]]
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- `{e['path']}`: {e['error']}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def write_chart(report: dict, path: Path) -> str | None:
    """A bar chart of per-class top-1 accuracy (PNG), or the line saying why not (no matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no per-class chart: pip install 'novic[eval]'"
    from novic.atomic import atomic_path

    classes = [c for c in report["per_class"] if c["top1"] is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(classes) + 1.5), 4.0))
    ax.bar([c["class"] for c in classes], [100 * c["top1"] for c in classes])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"novic-eval: per-class top-1 ({report['granularity']})")
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return None


def write_report(report: dict, out_dir: Path, data: str) -> tuple[list[Path], str | None]:
    """eval.json, eval.md and per_class.png in `out_dir` (each written atomically) -> (paths, the
    line saying why the chart was skipped, or None)."""
    from novic.atomic import write_bytes_atomic, write_json_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "eval.json", out_dir / "eval.md"]
    write_json_atomic(paths[0], {"data": data, **report})
    write_bytes_atomic(paths[1], markdown(report, data).encode("utf-8"))
    skipped = write_chart(report, out_dir / "per_class.png")
    if skipped is None:
        paths.append(out_dir / "per_class.png")
    return paths, skipped
