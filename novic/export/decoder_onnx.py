"""Object decoder -> two ONNX graphs, ``decoder_prefill.onnx`` and ``decoder_step.onnx``.

The graphs implement the DecoderSession contract of docs/internals.md ("ONNX graph I/O"):
temperature, log-softmax in fp32, EOS masked at the prefill, TopK with a k fixed at export,
log-probs gathered for the caller's candidate ids, and beam reordering of the KV cache by a
``beam_idx`` input, so that the host reads back O(rows x k) numbers per step and never touches
the cache.

Cache update: ping-pong, not in place. The step graph takes ``kv_cache`` and returns a new
tensor ``kv_cache_out`` in which slot ``position`` holds the new keys and values (a Concat and
a Gather along the slot axis, see ``ObjectDecoder.step``); the runtime feeds it back on the next call.
Input and output never alias, so the graph is plain ONNX that onnxruntime (CPU and CUDA) and
TensorRT run alike, and a runtime may keep two device buffers and alternate between them.
Writing in place would need TensorRT's own KV-cache update ops (not portable to onnxruntime)
or an output aliased to an input, which ONNX cannot express. The price is a few cache-sized
copies per step (beam reordering, the per-layer slices, the write), which are not small: on the
CPU at 10 rows they took about 40 % of the step's kernel time, so the step uses the plainest
copies (Gather/Slice/Concat; onnxruntime's broadcasting Where was much slower; measured with
onnxruntime on the CPU only, docs/benchmarks.md "CPU", run 4).

The graphs hold no control flow (no If/Loop/Scan): the attention mask is computed from
``position`` with comparisons, the cache reordering is a Gather. Batch (B, N, M) and the
candidate count G are dynamic.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from novic.config import EOS
from novic.model.decoder import ObjectDecoder

PREFILL_FILE = "decoder_prefill.onnx"
STEP_FILE = "decoder_step.onnx"
OPSET = 18
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


class _Scores(nn.Module):
    """logits -> (topk_logprobs, topk_ids, cand_logprobs); shared tail of both graphs."""

    def __init__(self, vocab_size: int, topk: int, mask_eos: bool):
        super().__init__()
        self.topk = topk
        bias = torch.zeros(vocab_size)
        if mask_eos:
            bias[EOS] = float("-inf")  # the first token may not be EOS
        self.register_buffer("eos_bias", bias, persistent=False)
        self.mask_eos = mask_eos

    def forward(self, logits, temperature, cand_ids):
        # Scores are fp32 whatever the graph's precision (fp16 logits are cast up first).
        logp = F.log_softmax(logits.float() / temperature.float(), dim=-1)
        if self.mask_eos:
            logp = logp + self.eos_bias
        top_logp, top_ids = torch.topk(logp, self.topk, dim=-1, largest=True, sorted=True)
        return top_logp, top_ids, torch.gather(logp, 1, cand_ids)


class PrefillGraph(nn.Module):
    """embedding [B,F], temperature [1], cand_ids [B,G] ->
    topk_logprobs [B,k], topk_ids [B,k], cand_logprobs [B,G], kv_cache [L,2,B,h,Smax,hd]."""

    def __init__(self, decoder: ObjectDecoder, topk: int):
        super().__init__()
        self.decoder = decoder
        self.scores = _Scores(decoder.cfg.vocab_size, topk, mask_eos=True)

    def forward(self, embedding, temperature, cand_ids):
        logits, cache = self.decoder.prefill(embedding)
        return (*self.scores(logits, temperature, cand_ids), cache)


class StepGraph(nn.Module):
    """tokens [N], position [1], beam_idx [N], kv_cache [L,2,M,h,Smax,hd], temperature [1],
    cand_ids [N,G] -> topk_logprobs [N,k], topk_ids [N,k], cand_logprobs [N,G], kv_cache_out."""

    def __init__(self, decoder: ObjectDecoder, topk: int):
        super().__init__()
        self.decoder = decoder
        self.scores = _Scores(decoder.cfg.vocab_size, topk, mask_eos=False)

    def forward(self, tokens, position, beam_idx, kv_cache, temperature, cand_ids):
        # Row n continues row beam_idx[n] of the previous cache (M -> N rows, e.g. B -> B*K).
        cache = kv_cache.index_select(2, beam_idx)
        logits, new_cache = self.decoder.step(tokens, position, cache)
        return (*self.scores(logits, temperature, cand_ids), new_cache)


PREFILL_INPUTS = ("embedding", "temperature", "cand_ids")
STEP_INPUTS = ("tokens", "position", "beam_idx", "kv_cache", "temperature", "cand_ids")
SCORE_OUTPUTS = ("topk_logprobs", "topk_ids", "cand_logprobs")


def io_signature(model: onnx.ModelProto) -> dict:
    """{"inputs": [{"name", "dtype", "shape"}], "outputs": [...]} from a graph; shape entries
    are ints for fixed dims and strings for symbolic ones (e.g. "B", "G")."""

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def control_flow_ops(model: onnx.ModelProto) -> set[str]:
    """Op types of control flow nodes in the graph (should be empty)."""
    return {n.op_type for n in model.graph.node if n.op_type in CONTROL_FLOW_OPS}


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes):
    with torch.no_grad(), warnings.catch_warnings():
        # One Dim object names several inputs' axes on purpose (B of embedding and cand_ids).
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                    input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    model = program.model_proto  # axes are named after the Dims (B, G, N, M)
    flow = control_flow_ops(model)
    if flow:
        raise RuntimeError(f"{path.name}: exported graph holds control flow {sorted(flow)}")
    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)  # never leave a half-written graph behind


def export_decoder(model: ObjectDecoder, out_dir, topk: int = 10, *,
                   prefill_name: str = PREFILL_FILE, step_name: str = STEP_FILE) -> dict:
    """Export the prefill and step graphs of `model` (fp32) into `out_dir`.

    Returns ``{"prefill": {"path", "files", "io"}, "step": {...}, "topk": k, "opset": n,
    "seconds": t}`` where ``io`` is :func:`io_signature` of the written graph (for the manifest)
    and ``files`` every file the graph needs (here just the graph).
    """
    cfg = model.cfg
    if not 1 <= topk <= cfg.vocab_size - 1:
        raise ValueError(f"topk={topk} must be in [1, vocab_size-1={cfg.vocab_size - 1}]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()  # no dropout in the graphs
    try:
        start = time.perf_counter()
        _export_both(model, topk, out_dir / prefill_name, out_dir / step_name)
        seconds = round(time.perf_counter() - start, 2)
    finally:
        model.train(was_training)
    result = {"topk": topk, "opset": OPSET, "seconds": seconds}
    for key, name in (("prefill", prefill_name), ("step", step_name)):
        path = out_dir / name
        result[key] = {"path": str(path), "files": [str(path)],
                       "io": io_signature(onnx.load(path, load_external_data=False))}
    return result


def _export_both(model: ObjectDecoder, topk: int, prefill_path: Path, step_path: Path) -> None:
    cfg = model.cfg

    # Example sizes are >= 2 and distinct so that the exporter keeps every dim symbolic.
    B, G, M, N = 2, 3, 2, 6
    gen = torch.Generator().manual_seed(0)
    embedding = torch.randn(B, cfg.embed_dim, generator=gen)
    temperature = torch.ones(1)
    batch, cands = torch.export.Dim("B"), torch.export.Dim("G")
    prefill = PrefillGraph(model, topk).eval()
    cand_ids = torch.randint(0, cfg.vocab_size, (B, G), generator=gen)
    _export(prefill, (embedding, temperature, cand_ids), prefill_path,
            PREFILL_INPUTS, SCORE_OUTPUTS + ("kv_cache",),
            {"embedding": {0: batch}, "temperature": None, "cand_ids": {0: batch, 1: cands}})

    rows, prev = torch.export.Dim("N"), torch.export.Dim("M")
    step = StepGraph(model, topk).eval()
    with torch.no_grad():
        cache = model.prefill(torch.randn(M, cfg.embed_dim, generator=gen))[1]
    args = (torch.randint(1, cfg.vocab_size, (N,), generator=gen),
            torch.tensor([cfg.prefix_len], dtype=torch.long),
            torch.randint(0, M, (N,), generator=gen), cache, temperature,
            torch.randint(0, cfg.vocab_size, (N, G), generator=gen))
    _export(step, args, step_path, STEP_INPUTS, SCORE_OUTPUTS + ("kv_cache_out",),
            {"tokens": {0: rows}, "position": None, "beam_idx": {0: rows},
             "kv_cache": {2: prev}, "temperature": None, "cand_ids": {0: rows, 1: cands}})
