"""Measure the original-style PyTorch pipeline (novic.model.original) on the same weights."""
from __future__ import annotations

import time

import torch

from novic.bench.measure import sample_images
from novic.bench.timing import measure, peak_rss_mb


def run(checkpoint: str, device: str = "cpu", batches=(1, 8, 32, 256), reps: int = 10,
        budget_s: float = 30.0, beam_width: int = 10) -> dict:
    from novic.model.checkpoint import load_checkpoint
    from novic.model.embedder import Embedder
    from novic.model.original import OriginalPipeline

    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    embedder = Embedder.load(ckpt.embedder, device=device, text=False)
    transform = embedder.image_transform()
    pipe = OriginalPipeline(embedder.model, ckpt.build_model(), ckpt.noun_tokens, device=device)
    out = {"device": device, "load_s": time.perf_counter() - t0}
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    if sync:
        torch.cuda.reset_peak_memory_stats()
    images = sample_images(max(batches))
    table = ckpt.token_table

    def classify(batch):  # decoded PIL images -> labels, as the original: transform, encode, decode
        pixels = torch.stack([transform(im) for im in batch])
        return [[table.decode(h.tokens) for h in hyps[:5]] for hyps in pipe.classify(pixels, beam_width)]

    out["labels"] = [r[0] if r else None for r in classify(images[:4])]
    out["single"] = measure(lambda: classify(images[:1]), reps=reps, budget_s=budget_s, sync=sync)
    out["throughput"] = {}
    for b in batches:
        m = measure(lambda: classify(images[:b]), warmup=1, reps=max(3, reps // 2), budget_s=budget_s,
                    sync=sync)
        out["throughput"][str(b)] = {**m, "img_per_s": b / (m["p50_ms"] / 1e3)}
    pixels = torch.stack([transform(images[0])])
    out["encoder"] = measure(lambda: pipe.encode(pixels), reps=reps, budget_s=budget_s, sync=sync)
    embeds = pipe.encode(pixels)
    from novic.model.original import original_beam_search
    out["decoder"] = measure(lambda: original_beam_search(pipe.decoder, embeds, pipe.noun_matrix, beam_width),
                             reps=reps, budget_s=budget_s, sync=sync)
    out["peak_rss_mb"] = peak_rss_mb()
    if sync:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
