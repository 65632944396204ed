"""Host work per decoder call of a real guided beam search (torch-free).

A decoder call's wall time = the time inside onnxruntime's run (the graph: on a GPU, the replay
and the wait for it) + host work: beam search's own numpy work (novic.runtime.search) and the
session wrapper's (binding inputs, copying the candidates in and the scores out). This module
times the whole search and the time inside the onnxruntime sessions' `run` / `run_with_iobinding`
(wrapped on the session objects for the duration), so host work = wall - onnxruntime, per call.

On the CPU the same code runs as on ort-cuda: `rehearse_cuda_graphs` gives an onnxruntime CPU
session the CUDA-graph buffer logic (`_DecoderGraphs`: fixed buffers, ping-pong caches, scores
copied back) against host memory, so the host's share of the CUDA path is measured here (copies
into device memory cost a little more there than a memcpy here).
"""
from __future__ import annotations

import time

import numpy as np

RUN_METHODS = ("run", "run_with_iobinding")


def rehearse_cuda_graphs(session) -> None:
    """Make an onnxruntime CPU decoder session take the CUDA-graph code path (IOBinding into
    fixed host buffers; the replays are plain runs on the CPU)."""
    from novic.runtime.backends.ort import _DecoderGraphs

    session.iobinding = True
    session._graph_prefill, session._graph_step = session._prefill, session._step
    session._graphs = _DecoderGraphs(session)


def _ort_sessions(session) -> list:
    """The onnxruntime InferenceSessions a decoder session runs (its own and its graph replays')."""
    graphs = getattr(session, "_graphs", None)
    candidates = [*vars(session).values(), *(graphs.sessions.values() if graphs is not None else ())]
    found = {id(v): v for v in candidates if hasattr(v, "run_with_iobinding")}   # each one once
    return list(found.values())


class _Stopwatch:
    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def wrap(self, method):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def host_per_call(session, embeds, width: int = 10, trie=None, reps: int = 20) -> dict:
    """Guided (or free) beam search of `embeds` on `session`, `reps` times after a warm-up.
    -> the search with the median host work, in microseconds per decoder call: `host_us` (search +
    session wrapper), its parts `search_us` and `session_us`, `ort_us` (inside onnxruntime), and
    `calls` per search; `host_us_min` / `search_us_min`: the search with the least host work."""
    from novic.runtime.search import beam_search

    ort_clock, session_clock = _Stopwatch(), _Stopwatch()
    patched = []
    for ort_session in _ort_sessions(session):
        for name in RUN_METHODS:
            patched.append((ort_session, name, vars(ort_session).get(name)))
            setattr(ort_session, name, ort_clock.wrap(getattr(ort_session, name)))
    for name in ("prefill", "step"):
        patched.append((session, name, vars(session).get(name)))
        setattr(session, name, session_clock.wrap(getattr(session, name)))
    rows = []
    try:
        for rep in range(reps + 1):   # the first search warms up (allocates the buffers)
            ort_clock.seconds = session_clock.seconds = 0.0
            session_clock.calls = 0
            t0 = time.perf_counter()
            beam_search(session, embeds, width, trie=trie)
            wall = time.perf_counter() - t0
            if rep:
                n = session_clock.calls
                rows.append({"host_us": 1e6 * (wall - ort_clock.seconds) / n,
                             "search_us": 1e6 * (wall - session_clock.seconds) / n,
                             "session_us": 1e6 * (session_clock.seconds - ort_clock.seconds) / n,
                             "ort_us": 1e6 * ort_clock.seconds / n, "calls": n})
    finally:
        for obj, name, own in reversed(patched):   # back to the class's method or the object's own
            delattr(obj, name)
            if own is not None:
                setattr(obj, name, own)
    rows.sort(key=lambda r: r["host_us"])
    # the median search (its parts add up), and the least disturbed one's host work (a busy machine)
    return {**rows[len(rows) // 2], "host_us_min": rows[0]["host_us"], "search_us_min": rows[0]["search_us"]}
