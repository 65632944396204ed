"""A strong PyTorch peer: the best plain-PyTorch deployment of the same weights, timed beside novic.

The original-style baseline (baseline.py) reproduces the original release's costs on purpose. This
peer is what a careful PyTorch user would deploy instead, so that novic's lead is measured against
something fast, not only against something slow:
- the open_clip image tower in fp16 on CUDA (its attention runs through PyTorch's fused
  scaled-dot-product kernels in eval mode), fp32 on the CPU;
- our decoder (novic.model.decoder) with a static KV cache: one preallocated buffer that every
  prefill and step writes in place, so that `torch.compile(mode="reduce-overhead")` can replay
  each call as a CUDA graph (one per row count; the position and the beam order are tensors, so
  they do not recompile);
- the same guided beam search as novic (novic.runtime.search over this session), so that the
  labels must be the same and only the engine differs.

`compile_mode=None` runs eagerly: that is how the tests check on the CPU that the peer gives
novic's labels (tests/test_peer.py). `run()` is the benchmark side (novic.bench.compare "peer").
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from novic.config import EOS
from novic.model.decoder import ObjectDecoder
from novic.runtime.search import StepScores

COMPILE_MODES = ("reduce-overhead", "max-autotune", "default")


class StaticCacheDecoder(torch.nn.Module):
    """The decoder's prefill and step over one KV-cache buffer for up to `max_rows` sequences,
    updated in place: the addresses never change, which is what a CUDA-graph replay needs."""

    def __init__(self, model: ObjectDecoder, max_rows: int):
        super().__init__()
        self.model = model.eval()
        p = next(model.parameters())
        self.register_buffer("cache", torch.zeros(model.cfg.cache_shape(max_rows), dtype=p.dtype, device=p.device),
                             persistent=False)

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        logits, cache = self.model.prefill(embeds)
        self.cache[:, :, :embeds.shape[0]].copy_(cache)
        return logits.float()

    def step(self, tokens: torch.Tensor, position: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor:
        # index_select makes a new tensor (the beams in their new order) before the cache is
        # overwritten, so one buffer serves as both source and destination.
        logits, cache = self.model.step(tokens, position, self.cache.index_select(2, beam_idx))
        self.cache[:, :, :tokens.shape[0]].copy_(cache)
        return logits.float()


class PeerDecoderSession:
    """A DecoderSession (novic.runtime.search) over `StaticCacheDecoder`, optionally compiled.

    Every call gets every row (the graphs are keyed by row count, as on ort-cuda). Scores are
    computed as the exported graphs do (fp32 log-softmax of logits / temperature, EOS masked at
    the prefill, stable descending top-k, a gather of the candidates) and only they come back."""

    drops_finished_rows = False

    def __init__(self, model: ObjectDecoder, max_rows: int, topk: int = 10, compile_mode: str | None = None):
        self.config = model.cfg
        self.topk = min(int(topk), model.cfg.vocab_size)
        self.core = StaticCacheDecoder(model, max_rows)
        self.device = self.core.cache.device
        self.compile_mode = compile_mode
        self._prefill, self._step = self.core.prefill, self.core.step
        if compile_mode is not None:
            if compile_mode not in COMPILE_MODES:
                raise ValueError(f"compile_mode must be None or one of {COMPILE_MODES}, got {compile_mode!r}")
            import torch._dynamo

            # one graph per row count (prefill: B, steps: B x K) and batch size measured
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._prefill = torch.compile(self.core.prefill, mode=compile_mode, dynamic=False)
            self._step = torch.compile(self.core.step, mode=compile_mode, dynamic=False)
        self._prefilled = False

    def _tensor(self, a, dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype).to(self.device, non_blocking=True)

    def _begin(self) -> None:
        if self.compile_mode is not None and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()   # the previous call's outputs are consumed

    def _scores(self, logits, temperature: float, cand_ids, forbid_eos: bool) -> StepScores:
        logp = F.log_softmax(logits / temperature, dim=-1)
        if forbid_eos:
            logp[:, EOS] = float("-inf")
        top = torch.sort(logp, dim=-1, descending=True, stable=True)
        k = self.topk
        values = torch.cat([top.values[:, :k], logp.gather(1, self._tensor(cand_ids, torch.long))], 1).cpu().numpy()
        return StepScores(values[:, :k], top.indices[:, :k].cpu().numpy(), values[:, k:])

    @torch.inference_mode()
    def prefill(self, embeds, temperature: float, cand_ids) -> StepScores:
        self._begin()
        embeds = embeds if isinstance(embeds, torch.Tensor) else self._tensor(embeds, torch.float32)
        logits = self._prefill(embeds)
        self._prefilled = True
        return self._scores(logits, temperature, cand_ids, forbid_eos=True)

    @torch.inference_mode()
    def step(self, tokens, position: int, beam_idx, temperature: float, cand_ids) -> StepScores:
        if not self._prefilled:
            raise RuntimeError("step() before prefill()")
        self._begin()
        logits = self._step(self._tensor(tokens, torch.long), self._tensor([position], torch.long),
                            self._tensor(beam_idx, torch.long))
        return self._scores(logits, temperature, cand_ids, forbid_eos=False)


class PeerPipeline:
    """Preprocessed pixels -> labels with the peer: open_clip encoder (fp16 on CUDA) + the peer
    decoder session + novic's guided beam search."""

    def __init__(self, checkpoint, device: str = "cpu", max_batch: int = 256, beam_width: int = 10,
                 compile_mode: str | None = None):
        from novic.model.checkpoint import load_checkpoint
        from novic.model.embedder import Embedder
        from novic.runtime.trie import TokenTrie

        ckpt = load_checkpoint(checkpoint)
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        embedder = Embedder.load(ckpt.embedder, device=device, text=False)
        self.visual = embedder.model.visual.to(self.dtype).eval()
        self.decoder = PeerDecoderSession(ckpt.build_model(device=device), max_batch * beam_width,
                                          topk=max(10, beam_width), compile_mode=compile_mode)
        self.trie = TokenTrie([[t for t in seq if t != EOS] for seq in ckpt.noun_tokens])
        self.table = ckpt.token_table
        self.beam_width = beam_width

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).to(self.device, self.dtype, non_blocking=True)
        return F.normalize(self.visual(x).float(), dim=-1).cpu().numpy()

    def decode(self, embeds: np.ndarray):
        from novic.runtime.search import beam_search

        return beam_search(self.decoder, embeds, self.beam_width, trie=self.trie)

    def labels(self, pixels: np.ndarray) -> list[list[str]]:
        """-> per image, its labels best first (as `Classifier` names them: the token table's text)."""
        return [[self.table.decode(h.tokens) for h in hyps] for hyps in self.decode(self.embed(pixels))]


def run(checkpoint: str, bundle: str, device: str = "cuda", batches=(1, 8, 32, 256), reps: int = 10,
        budget_s: float = 30.0, beam_width: int = 10, compile_mode: str | None = "reduce-overhead") -> dict:
    """The peer's side of a benchmark: from preprocessed pixels (novic's own preprocessing of the
    same photos), one image end to end, the encoder alone, the decoder alone, throughput per batch."""
    from novic.bench.measure import sample_images
    from novic.bench.timing import measure, peak_rss_mb
    from novic.runtime.bundle import Bundle
    from novic.runtime.preprocess import Preprocessor

    t0 = time.perf_counter()
    pipe = PeerPipeline(checkpoint, device, max_batch=max(batches), beam_width=beam_width, compile_mode=compile_mode)
    preprocessor = Preprocessor(Bundle.open(bundle).preprocess_config)
    pixels = preprocessor.batch(sample_images(max(batches)))
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else None
    if sync:
        torch.cuda.reset_peak_memory_stats()
    out = {"device": device, "compile_mode": compile_mode, "dtype": str(pipe.dtype).replace("torch.", ""),
           "load_s": time.perf_counter() - t0}
    out["warmup_s"] = {}
    for b in batches:   # compiles (and captures) each batch size's graphs once, before any timing
        t0 = time.perf_counter()
        labels = pipe.labels(pixels[:b])
        out["warmup_s"][str(b)] = time.perf_counter() - t0
    out["labels"] = [row[0] if row else None for row in labels[:4]]
    out["single"] = measure(lambda: pipe.labels(pixels[:1]), reps=reps, budget_s=budget_s, sync=sync)
    out["encoder"] = measure(lambda: pipe.embed(pixels[:1]), reps=reps, budget_s=budget_s, sync=sync)
    embeds = pipe.embed(pixels[:1])
    out["decoder"] = measure(lambda: pipe.decode(embeds), reps=reps, budget_s=budget_s, sync=sync)
    out["throughput"] = {}
    for b in batches:
        m = measure(lambda: pipe.labels(pixels[:b]), warmup=1, reps=max(3, reps // 2), budget_s=budget_s, sync=sync)
        out["throughput"][str(b)] = {**m, "img_per_s": b / (m["p50_ms"] / 1e3)}
    out["peak_rss_mb"] = peak_rss_mb()
    if compile_mode is not None:   # calls torch.compile ran without CUDA graphs, and why (its log says)
        from torch._dynamo.utils import counters
        out["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    if sync:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
