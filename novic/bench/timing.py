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
