"""A DecoderSession backed by the PyTorch decoder and its KV cache.

Used by the tests to check novic/runtime/search.py against the oracle; it also spells out what
the exported prefill/step graphs compute (docs/internals.md "ONNX graph I/O"): log-softmax of
logits / temperature in fp32, EOS masked at prefill, top-k in stable descending order (ties:
lower id first, like ONNX TopK), a gather of the requested candidate ids, and the cache
reordered by beam_idx before the step.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from novic.config import EOS
from novic.model.decoder import ObjectDecoder
from novic.runtime.search import StepScores


class TorchDecoderSession:
    drops_finished_rows = True   # any row count works: search may step only unfinished beams

    def __init__(self, model: ObjectDecoder, topk: int = 10):
        self.model = model.eval()
        self.config = model.cfg
        self.topk = min(int(topk), model.cfg.vocab_size)
        self.device = next(model.parameters()).device
        self.cache: torch.Tensor | None = None  # [L, 2, N, heads, Smax, hd]

    def _tensor(self, a, dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=self.device)

    def _scores(self, logits: torch.Tensor, temperature: float, cand_ids,
                forbid_eos: bool) -> StepScores:
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        if forbid_eos:
            logp[:, EOS] = float("-inf")
        top = torch.sort(logp, dim=-1, descending=True, stable=True)
        cand = logp.gather(1, self._tensor(cand_ids, torch.long))
        return StepScores(top.values[:, :self.topk].cpu().numpy(),
                          top.indices[:, :self.topk].cpu().numpy(), cand.cpu().numpy())

    @torch.no_grad()
    def prefill(self, embeds, temperature: float, cand_ids) -> StepScores:
        logits, self.cache = self.model.prefill(self._tensor(embeds, torch.float32))
        return self._scores(logits, temperature, cand_ids, forbid_eos=True)

    @torch.no_grad()
    def step(self, tokens, position: int, beam_idx, temperature: float, cand_ids) -> StepScores:
        if self.cache is None:
            raise RuntimeError("step() before prefill()")
        cache = self.cache.index_select(2, self._tensor(beam_idx, torch.long))
        logits, self.cache = self.model.step(self._tensor(tokens, torch.long),
                                             torch.tensor(position, device=self.device), cache)
        return self._scores(logits, temperature, cand_ids, forbid_eos=False)
