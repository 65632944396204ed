"""Run both sides of a benchmark, each in its own process (own threads, own peak memory), on the
same bundle/checkpoint, and report ratios. `python -m novic.bench.compare SIDE JSON_ARGS OUT`
is the per-side entry point."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from novic.bench.timing import OUTLIER_FACTOR, spread_warning


def run_side(side: str, args: dict, timeout: float = 3600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "novic.bench.compare", side, json.dumps(args), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"benchmark side {side!r} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def ratios(ours: dict, base: dict) -> dict:
    """baseline time / our time (> 1 means we are faster), per measurement."""
    r = {k: base[k]["p50_ms"] / ours[k]["p50_ms"] for k in ("single", "encoder", "decoder")}
    for b, m in ours["throughput"].items():
        if b in base["throughput"]:
            r[f"throughput@{b}"] = m["img_per_s"] / base["throughput"][b]["img_per_s"]
    return r


def step_flatness(steps: list[float]) -> float:
    """Last-position step time relative to the first (1.0 = perfectly flat)."""
    return steps[-1] / steps[0] if steps and steps[0] > 0 else float("nan")


def phase_cell(ph: dict) -> str:
    """measure.phases() as one table cell."""
    return (f"preprocess {ph['preprocess_ms']:.1f}, encoder {ph['encoder_ms']:.1f}, prefill {ph['prefill_ms']:.2f}, "
            f"first step {ph['first_step_ms']:.2f}, {ph['steps'] - 1:.0f} later steps {ph['later_steps_ms']:.2f}, "
            f"host search {ph['host_search_ms']:.2f} ms")


def spread_cell(m: dict) -> str:
    """p90 of a measurement with its outlier count, flagged when p90 is far above the median."""
    outliers = f" ({m['outliers']}/{m['runs']})" if "outliers" in m else ""
    flag = " **outliers**" if spread_warning("", m) else ""
    return f"{m['p90_ms']:.1f} ms{outliers}{flag}"


def spread_warnings(result: dict) -> list[str]:
    """One line per measurement of either side whose p90 is far above its median."""
    lines = []
    for side, name in (("baseline", "original-style"), ("ours", "novic")):
        for key in ("single", "encoder", "decoder"):
            line = spread_warning(f"{name} {key}", result[side][key])
            if line:
                lines.append(line)
    return lines


def table(result: dict) -> str:
    ours, base, r = result["ours"], result["baseline"], result["ratios"]
    lines = [f"| measurement | original-style ({base['device']}) | novic ({ours['backend']}, {ours['precision']}) | speed-up |",
             "|---|---|---|---|"]
    for key, label in (("single", "end-to-end, 1 image, p50"), ("encoder", "encoder only, 1 image, p50"),
                       ("decoder", "decoder only, beam 10 guided, p50")):
        lines.append(f"| {label} | {base[key]['p50_ms']:.1f} ms | {ours[key]['p50_ms']:.1f} ms | {r[key]:.1f}x |")
    lines.append(f"| end-to-end, 1 image, p90 (runs over {OUTLIER_FACTOR:g}x the median) | {spread_cell(base['single'])} | "
                 f"{spread_cell(ours['single'])} | |")
    for b in ours["throughput"]:
        if b in base["throughput"]:
            lines.append(f"| throughput, batch {b} | {base['throughput'][b]['img_per_s']:.1f} img/s | "
                         f"{ours['throughput'][b]['img_per_s']:.1f} img/s | {r[f'throughput@{b}']:.1f}x |")
    steps = ours["step_ms_by_position"]
    lines.append(f"| decoder step time, first -> last position | (recomputes all) | {steps[0]:.2f} -> "
                 f"{steps[-1]:.2f} ms ({step_flatness(steps):.2f}x) | |")
    if "phases" in ours:
        lines.append(f"| one image, by phase (medians) | | {phase_cell(ours['phases'])} | |")
    mem = f"{base['peak_rss_mb']:.0f} MB RSS" + (f", {base['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in base else "")
    lines.append(f"| peak memory | {mem} | {ours['peak_rss_mb']:.0f} MB RSS | |")
    if ours.get("cuda_graphs") or ours.get("cuda_graph_error"):
        lines.append(f"| CUDA graphs for the step | | {'on' if ours.get('cuda_graphs') else 'off: ' + str(ours.get('cuda_graph_error'))} | |")
    if ours.get("encoder_cuda_graphs") or ours.get("encoder_cuda_graph_error"):
        lines.append(f"| CUDA graphs for the encoder (<= 32 images) | | {'on' if ours.get('encoder_cuda_graphs') else 'off: ' + str(ours.get('encoder_cuda_graph_error'))} | |")
    same = sum(a == b for a, b in zip(ours["labels"], base["labels"]))
    lines.append(f"| top-1 labels equal on the photos | | {same}/{len(ours['labels'])} | |")
    return "\n".join(lines)


def compare(config: str, workdir: str, backend: str = "ort-cpu", device: str = "cpu",
            precision: str | None = None, batches=(1, 8), reps: int = 10, budget_s: float = 30.0,
            threads: int | None = None, console=None, baseline: dict | None = None) -> dict:
    """`baseline`: a previous result's baseline side to reuse (same config, device, batches)."""
    from novic.bench.setup import CONFIGS, build

    paths = build(CONFIGS[config], Path(workdir) / config, console=console)
    common = dict(batches=list(batches), reps=reps, budget_s=budget_s)
    ours = run_side("ours", dict(bundle=paths["bundle"], backend=backend, precision=precision,
                                 threads=threads, **common))
    base = baseline or run_side("baseline", dict(checkpoint=paths["checkpoint"], device=device, **common))
    result = {"config": config, "note": CONFIGS[config].note, "ours": ours, "baseline": base,
              "ratios": ratios(ours, base),
              "export": json.loads(Path(paths["info"]).read_text())}
    result["markdown"] = table(result)
    result["warnings"] = spread_warnings(result)
    return result


def _side_main(argv: list[str]) -> None:
    side, args, out = argv[0], json.loads(argv[1]), Path(argv[2])
    if side == "ours":
        from novic.bench.measure import run
        if args.pop("ort_spinning", False):   # onnxruntime's default busy-waiting threads, which novic turns off
            import novic.runtime.backends.ort as ort_backend
            ort_backend.make_session.__kwdefaults__["spinning"] = True
        if args.pop("all_rows", False):   # step finished beams too, as before search dropped them
            import novic.runtime.backends.ort as ort_backend
            ort_backend.OrtDecoderSession.drops_finished_rows = False
        if args.get("backend", "").startswith("ort-cuda") or args.get("backend") == "trt":
            args["sync"] = None
        result = run(**args)
    elif side in ("baseline", "peer"):   # peer: the best plain-PyTorch deployment (peer.py)
        import torch
        if args.get("device", "cpu") == "cpu" and os.environ.get("NOVIC_BENCH_THREADS"):
            torch.set_num_threads(int(os.environ["NOVIC_BENCH_THREADS"]))
        if side == "peer":
            from novic.bench.peer import run
        else:
            from novic.bench.baseline import run
        result = run(**args)
    else:
        raise SystemExit(f"unknown side {side!r}")
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    _side_main(sys.argv[1:])
