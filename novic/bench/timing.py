"""Timing helpers shared by both sides of a benchmark (torch-free)."""
from __future__ import annotations

import resource
import statistics
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
    times.sort()
    return {"p50_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "min_ms": times[0], "runs": len(times)}


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
