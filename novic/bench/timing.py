"""Timing helpers shared by both sides of a benchmark (torch-free)."""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time


def measure(fn, *, warmup: int = 2, reps: int = 10, budget_s: float = 60.0, sync=None) -> dict:
    """Run fn() `warmup` times, then up to `reps` times (stopping early after budget_s, min 3).
    Returns median/p90/min in milliseconds and the number of timed runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def interleaved(fns: dict, reps: int) -> dict:
    """Median ms of each function of `fns`, called in turn `reps` times after one warm-up call
    each: an A/B in one process, so that the machine's load hits every side alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# A run more than this many times the median was disturbed (another process, a page-fault storm, a
# first-touch allocation), not the code being measured: it is counted, and flagged in reports.
OUTLIER_FACTOR = 2.0


def summarize(times_ms) -> dict:
    """Median/p90/min/max of run times (ms), their spread and the outliers (> OUTLIER_FACTOR x median)."""
    times = sorted(times_ms)
    p50 = statistics.median(times)
    return {"p50_ms": p50, "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "min_ms": times[0], "max_ms": times[-1], "runs": len(times),
            "mad_ms": statistics.median(abs(t - p50) for t in times),   # median absolute deviation
            "outliers": sum(t > OUTLIER_FACTOR * p50 for t in times)}


def spread_warning(name: str, m: dict) -> str | None:
    """One line when a measurement's p90 is over OUTLIER_FACTOR x its median, else None."""
    p50, p90 = m.get("p50_ms"), m.get("p90_ms")
    if not p50 or not p90 or p90 <= OUTLIER_FACTOR * p50:
        return None
    outliers = m.get("outliers")
    counted = f"{outliers} of {m['runs']} runs took over {OUTLIER_FACTOR:g}x the median" if outliers is not None \
        else "some runs were much slower than the median"
    return (f"{name}: p90 {p90:.1f} ms is {p90 / p50:.1f}x the median {p50:.1f} ms ({counted}): the machine "
            f"was disturbed during those runs; compare medians, or rerun on a quiet machine with more --reps")


def peak_rss_mb() -> float:
    """Peak resident memory of this process. Linux: VmHWM (ru_maxrss survives exec, so a child
    process would report its parent's peak); elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory this process (or `pid`) holds, from nvidia-smi (what onnxruntime's arenas took);
    None without an NVIDIA GPU."""
    pid = os.getpid() if pid is None else pid
    try:
        rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(row.split(",")[1]) for row in rows if row.split(",")[0].strip() == str(pid)]
    return sum(used) if used else None
