"""CPU comparison in rounds: the original-style baseline and several variants of ours, each in its
own process, taking turns (round 1: baseline, ours..., round 2: ...), so that a change in the
machine's load hits all of them. Reports the median over rounds of each side's p50 and the ratios
baseline / ours of those medians.

    python bench/cpu_rounds.py --config paper --rounds 3 --reps 5 [--variants fp32,int8,fp32-spinning]

Variants: `fp32`, `int8` (needs an int8 encoder in the bundle: novic-export calib),
`<precision>-spinning` (onnxruntime's default busy-waiting threads, which novic turns off),
`<precision>-allrows` (the decoder steps finished beams too, as before search dropped them),
`<precision>-fused` / `<precision>-plain` (the bundle's fused onnxruntime graphs, or not), and
`<variant>@<bundle dir>` (another bundle of the same weights, e.g. one exported by older code;
a relative dir is taken under --workdir):

    python bench/cpu_rounds.py --variants fp32,fp32@paper-old/bundle
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from novic.bench.compare import phase_cell, run_side, step_flatness
from novic.bench.setup import CONFIGS, build

def parse_variant(variant: str) -> tuple[str, str, str]:
    """`<precision>[-spinning|-allrows|-fused|-plain][@<bundle dir>]` -> (precision, modifier, bundle dir or "")."""
    kind, _, other = variant.partition("@")
    precision, _, how = kind.partition("-")
    return precision, how, other


def variant_bundle(variant: str, workdir: str, main_bundle: str, weights: str) -> Path:
    """The bundle a variant runs on, checked before any round: it opens, holds the variant's
    precision, and was exported from the main bundle's checkpoint (sha256 `weights`)."""
    from novic.errors import first_line
    from novic.runtime.bundle import Bundle

    precision, _, other = parse_variant(variant)
    path = Path(workdir) / other if other else Path(main_bundle)
    try:
        bundle = Bundle.open(path, verify=False)
        bundle.artifact("image_encoder", precision, "fused" if parse_variant(variant)[1] == "fused" else "plain")
    except Exception as exc:  # noqa: BLE001 - any reason: one line, before minutes of baseline
        raise SystemExit(f"variant {variant}: {first_line(exc)}")
    if bundle.manifest.get("export", {}).get("checkpoint_sha256") != weights:
        raise SystemExit(f"variant {variant}: {path} was exported from other weights than {main_bundle}")
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--variants", default="fp32,int8,fp32-spinning")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    paths = build(CONFIGS[a.config], Path(a.workdir) / a.config)
    common = dict(batches=[int(b) for b in a.batches.split(",")], reps=a.reps, budget_s=30.0)
    variants = a.variants.split(",")
    from novic.runtime.bundle import Bundle
    weights = Bundle.open(paths["bundle"], verify=False).manifest["export"]["checkpoint_sha256"]
    bundles = {v: str(variant_bundle(v, a.workdir, paths["bundle"], weights)) for v in variants}
    runs = {"baseline": [], **{v: [] for v in variants}}
    for r in range(a.rounds):
        load = os.getloadavg()[0]
        runs["baseline"].append(run_side("baseline", dict(checkpoint=paths["checkpoint"], device="cpu", **common)))
        for v in variants:
            precision, how, _ = parse_variant(v)
            runs[v].append(run_side("ours", dict(bundle=bundles[v], backend="ort-cpu", precision=precision,
                                                 ort_spinning=how == "spinning", all_rows=how == "allrows",
                                                 fused={"fused": True, "plain": False}.get(how), **common)))
        print(f"round {r + 1}/{a.rounds} done (load {load:.2f} -> {os.getloadavg()[0]:.2f})", file=sys.stderr)

    def med(name, key):
        return statistics.median(x[key]["p50_ms"] for x in runs[name])

    def thr(name, b):
        return statistics.median(x["throughput"][b]["img_per_s"] for x in runs[name])

    head = "| measurement (median of per-round p50) | original-style | " + " | ".join(f"novic {v}" for v in variants) + " |"
    lines = [head, "|---" * (2 + len(variants)) + "|"]
    for key, label in (("single", "end-to-end, 1 image"), ("encoder", "encoder only, 1 image"),
                       ("decoder", "decoder only, beam 10 guided")):
        base = med("baseline", key)
        cells = [f"{med(v, key):.1f} ms ({base / med(v, key):.2f}x)" for v in variants]
        lines.append(f"| {label} | {base:.1f} ms | " + " | ".join(cells) + " |")
    for b in common["batches"]:
        base = thr("baseline", str(b))
        cells = [f"{thr(v, str(b)):.2f} img/s ({thr(v, str(b)) / base:.2f}x)" for v in variants]
        lines.append(f"| throughput, batch {b} | {base:.2f} img/s | " + " | ".join(cells) + " |")
    cells = []
    for v in variants:
        steps = [statistics.median(s) for s in zip(*(x["step_ms_by_position"] for x in runs[v]))]
        cells.append(f"{steps[0]:.2f} -> {steps[-1]:.2f} ms ({step_flatness(steps):.2f}x; range "
                     f"{min(steps):.2f}-{max(steps):.2f})")
    lines.append("| decoder step, first -> last position | (recomputes all) | " + " | ".join(cells) + " |")
    cells = []
    for v in variants:   # medians over rounds of each phase's per-round median
        cells.append(phase_cell({k: statistics.median(x["phases"][k] for x in runs[v]) for k in runs[v][0]["phases"]}))
    lines.append("| one image, by phase | | " + " | ".join(cells) + " |")
    same = [sum(p == q for p, q in zip(runs[v][0]["labels"], runs["baseline"][0]["labels"])) for v in variants]
    lines.append("| top-1 labels equal to the baseline on the photos | | "
                 + " | ".join(f"{s}/{len(runs['baseline'][0]['labels'])}" for s in same) + " |")
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
