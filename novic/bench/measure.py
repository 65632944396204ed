"""Measure our runtime on a bundle (torch-free): end-to-end latency, batched throughput,
encoder-only latency, decoder-only search time and per-step time against position."""
from __future__ import annotations

import time

import numpy as np

from novic.bench.timing import gpu_memory_mb, measure, peak_rss_mb


def sample_images(n: int = 4, seed: int = 0):
    """Decoded RGB photos in memory: scikit-image's free photos if installed, else noise."""
    from PIL import Image
    try:
        from skimage import data
        photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    except ImportError:
        rng = np.random.default_rng(seed)
        photos = [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(4)]
    return [Image.fromarray(photos[i % len(photos)]) for i in range(n)]


def jpeg_bytes(images, quality: int = 90) -> list[bytes]:
    """The photos as JPEG files in memory (what a service receives)."""
    import io

    out = []
    for image in images:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def step_times(session, embed_dim: int, width: int, reps: int) -> list[float]:
    """Median ms of one decoder step at each position (1 image x `width` beams, free search)."""
    cfg = session.config
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((1, embed_dim)).astype(np.float32)
    dummy = np.zeros((width, 1), dtype=np.int64)
    per_position = [[] for _ in range(cfg.max_new_tokens - 1)]
    for _ in range(reps):
        session.prefill(embed, 1.0, np.zeros((1, 1), dtype=np.int64))
        beam_idx = np.zeros(width, dtype=np.int64)
        for j in range(cfg.max_new_tokens - 1):
            tokens = rng.integers(1, cfg.vocab_size, size=width)
            t0 = time.perf_counter()
            session.step(tokens, cfg.prefix_len + j, beam_idx, 1.0, dummy)
            per_position[j].append((time.perf_counter() - t0) * 1e3)
            beam_idx = np.arange(width, dtype=np.int64)
    return [float(np.median(t)) for t in per_position]


def phases(clf, image, reps: int = 10, beam_width: int = 10) -> dict:
    """Where one image's time goes: median ms of preprocessing, the encoder, the decoder prefill,
    the first step (it reads the prefill's cache), the later steps (summed) and the host's share
    of the search (decoding minus prefill and steps), plus the number of steps; beam search
    guided by the bundle's nouns, as in `run`. The decoder's methods are timed by wrapping them
    on the session object for the duration (every backend returns host arrays, so each call has
    finished when it returns)."""
    session, vocab = clf.decoder, clf.vocabulary(None)
    calls: list[tuple[str, float]] = []

    def timed(name):
        method = getattr(session, name)

        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                calls.append((name, (time.perf_counter() - t) * 1e3))
        return call

    rows = []
    own = {name: vars(session)[name] for name in ("prefill", "step") if name in vars(session)}
    session.prefill, session.step = timed("prefill"), timed("step")
    try:
        for rep in range(reps + 1):    # the first round warms up
            calls.clear()
            t0 = time.perf_counter()
            pixels, _ = clf.preprocessor.load_batch([image])
            t1 = time.perf_counter()
            embeds = clf.embed(pixels)
            t2 = time.perf_counter()
            clf.decode(embeds, vocab, beam_width, 1.0, 0.0)
            t3 = time.perf_counter()
            steps = [ms for name, ms in calls if name == "step"]
            prefill = sum(ms for name, ms in calls if name == "prefill")
            decode = (t3 - t2) * 1e3
            if rep:
                rows.append({"preprocess_ms": (t1 - t0) * 1e3, "encoder_ms": (t2 - t1) * 1e3,
                             "prefill_ms": prefill, "first_step_ms": steps[0] if steps else 0.0,
                             "later_steps_ms": sum(steps[1:]), "host_search_ms": decode - prefill - sum(steps),
                             "steps": len(steps)})
    finally:   # back to what the session had: its class's methods or its own wrappers
        del session.prefill, session.step
        for name, method in own.items():
            setattr(session, name, method)
    return {key: float(np.median([r[key] for r in rows])) for key in rows[0]}


def run(bundle: str, backend: str = "auto", precision: str | None = None, batches=(1, 8, 32, 256),
        reps: int = 10, budget_s: float = 30.0, beam_width: int = 10, threads: int | None = None,
        sync=None, fused: bool | None = None) -> dict:
    from novic.bench.hostwork import host_per_call
    from novic.runtime.classifier import Classifier

    t0 = time.perf_counter()
    clf = Classifier.load(bundle, backend=backend, precision=precision, threads=threads, fused=fused)
    out = {"backend": clf.backend, "precision": clf.precision, "variant": clf.variant, "reason": clf.backend_reason,
           "load_s": time.perf_counter() - t0}
    images = sample_images(max(batches))
    vocab = clf.vocabulary(None)
    opts = dict(topk=5, guided=True, beam_width=beam_width)

    labels = [r.top.text if r.top else r.error for r in clf.classify(images[:4], **opts, batch_size=4)]
    out["labels"] = labels
    out["single"] = measure(lambda: clf.classify(images[:1], **opts, batch_size=1), reps=reps,
                            budget_s=budget_s, sync=sync)
    # Throughput from three starting points: decoded photos (PIL, as the baseline is timed),
    # preprocessed pixels (the engine alone) and JPEG bytes (decoding and preprocessing included;
    # a stream of two batches, so that loading the second overlaps the first's encoding/decoding).
    pixels = clf.preprocessor.batch(images)
    jpegs = jpeg_bytes(images) * 2
    names = [str(i) for i in range(len(images))]
    runs = {"throughput": (1, lambda b: clf.classify(images[:b], **opts, batch_size=b)),
            "throughput_pixels": (1, lambda b: clf.classify_pixels(pixels[:b], names[:b], **opts)),
            "throughput_jpeg": (2, lambda b: clf.classify(jpegs[:2 * b], **opts, batch_size=b))}
    for key, (batches_per_call, classify) in runs.items():
        out[key] = {}
        for b in batches:
            m = measure(lambda: classify(b), warmup=1, reps=max(3, reps // 2), budget_s=budget_s, sync=sync)
            out[key][str(b)] = {**m, "img_per_s": batches_per_call * b / (m["p50_ms"] / 1e3)}
    pixels, _ = clf.preprocessor.load_batch(images[:1])
    out["encoder"] = measure(lambda: clf.embed(pixels), reps=reps, budget_s=budget_s, sync=sync)
    embeds = clf.embed(pixels)
    out["decoder"] = measure(lambda: clf.decode(embeds, vocab, beam_width, 1.0, 0.0), reps=reps,
                             budget_s=budget_s, sync=sync)
    out["host_per_call"] = host_per_call(clf.decoder, embeds, beam_width, vocab.trie, reps=max(3, reps // 2))
    out["step_ms_by_position"] = step_times(clf.decoder, clf.config.embed_dim, beam_width,
                                            reps=max(3, reps // 2))
    out["phases"] = phases(clf, images[0], reps=max(3, reps // 2), beam_width=beam_width)
    out["peak_rss_mb"] = peak_rss_mb()
    out["gpu_mb"] = gpu_memory_mb()
    # After measuring: a capture that failed during the runs switched the graphs off.
    out.update(cuda_graphs=clf.decoder.cuda_graphs, cuda_graph_error=clf.decoder.cuda_graph_error,
               encoder_cuda_graphs=clf.encoder.cuda_graphs, encoder_cuda_graph_error=clf.encoder.cuda_graph_error)
    return out
