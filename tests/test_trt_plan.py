"""TensorRT planning without TensorRT: profiles (min <= opt <= max, buckets cover every batch
size), per-call shapes, buffer sizes and the ping-pong cache buffers (novic.runtime.trt_plan)."""
from math import prod

import pytest

from novic.config import DecoderConfig
from novic.runtime import trt_plan as tp

CFG = DecoderConfig(embed_dim=768, vocab_size=12000, max_tokens=16)   # the released shape, V ~ 12k
TOPK = 10


def decoder_signatures(cfg=CFG, topk=TOPK, cache="float16"):
    """Signatures as novic.export.decoder_onnx.io_signature writes them (docs/internals.md)."""
    kv = lambda rows: [cfg.layers, 2, rows, cfg.heads, cfg.seq_len, cfg.head_dim]  # noqa: E731
    t = lambda name, dtype, shape: {"name": name, "dtype": dtype, "shape": shape}  # noqa: E731
    scores = lambda r: [t("topk_logprobs", "float32", [r, topk]), t("topk_ids", "int64", [r, topk]),  # noqa: E731
                        t("cand_logprobs", "float32", [r, "G"])]
    prefill = {"inputs": [t("embedding", "float32", ["B", cfg.embed_dim]), t("temperature", "float32", [1]),
                          t("cand_ids", "int64", ["B", "G"])],
               "outputs": scores("B") + [t("kv_cache", cache, kv("B"))]}
    step = {"inputs": [t("tokens", "int64", ["N"]), t("position", "int64", [1]), t("beam_idx", "int64", ["N"]),
                       t("kv_cache", cache, kv("M")), t("temperature", "float32", [1]),
                       t("cand_ids", "int64", ["N", "G"])],
            "outputs": scores("N") + [t("kv_cache_out", cache, kv("N"))]}
    return prefill, step


ENCODER_SIG = {"inputs": [{"name": "pixels", "dtype": "float32", "shape": ["B", 3, 224, 224]}],
               "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["B", 768]}]}


def check_profiles(plan: tp.GraphPlan):
    """min <= opt <= max everywhere, contiguous batch ranges covering 1..max bucket."""
    lo = 1
    for p in plan.profiles:
        assert p.lo == lo and p.bucket >= p.lo
        for name, (mn, opt, mx) in p.shapes.items():
            assert len(mn) == len(opt) == len(mx)
            assert all(a <= b <= c for a, b, c in zip(mn, opt, mx)), (name, mn, opt, mx)
            assert all(d >= 1 for d in mn), (name, mn)
        lo = p.bucket + 1
    assert lo - 1 == plan.max_batch
    assert [p.bucket for p in plan.profiles] == list(plan.buckets)


def test_buckets():
    assert tp.normalize_buckets("32, 1,8,8,256") == (1, 8, 32, 256)
    with pytest.raises(tp.PlanError, match="comma-separated"):
        tp.normalize_buckets("1,x")
    with pytest.raises(tp.PlanError):
        tp.normalize_buckets([0, 4])
    assert tp.row_buckets((1, 8, 32, 256), 10) == (10, 80, 320, 2560)
    b = (1, 8, 32, 256)
    assert [tp.bucket_for(n, b) for n in (1, 2, 8, 9, 33, 256)] == [1, 8, 8, 32, 256, 256]
    with pytest.raises(tp.PlanError, match="largest bucket 256"):
        tp.bucket_for(257, b)


def test_encoder_profiles_and_shapes():
    plan = tp.plan_encoder(ENCODER_SIG, (1, 8, 32, 256))
    check_profiles(plan)
    p = plan.profiles[2]
    assert p.shapes["pixels"] == ((9, 3, 224, 224), (32, 3, 224, 224), (32, 3, 224, 224))
    assert plan.shapes(8) == {"pixels": (8, 3, 224, 224), "embedding": (8, 768)}
    bufs = tp.plan_encoder_buffers(plan)
    assert bufs["pixels"].nbytes == 256 * 3 * 224 * 224 * 4
    assert bufs["embedding"].nbytes == 256 * 768 * 4
    # every batch size maps to the smallest covering profile
    for n in range(1, 257):
        i = plan.profile_index(n)
        assert plan.profiles[i].lo <= n <= plan.profiles[i].bucket


def test_encoder_signature_problems():
    fixed = {"inputs": [{"name": "pixels", "dtype": "float32", "shape": [4, 3, 224, 224]}],
             "outputs": ENCODER_SIG["outputs"]}
    with pytest.raises(tp.PlanError, match="dynamic"):
        tp.plan_encoder(fixed)
    dyn_hw = {"inputs": [{"name": "pixels", "dtype": "float32", "shape": ["B", 3, "H", "W"]}],
              "outputs": ENCODER_SIG["outputs"]}
    with pytest.raises(tp.PlanError, match="image_size"):
        tp.plan_encoder(dyn_hw)
    assert tp.plan_encoder(dyn_hw, image_size=(256, 256)).shapes(1)["pixels"] == (1, 3, 256, 256)
    with pytest.raises(tp.PlanError, match="preprocessing says 256"):
        tp.plan_encoder(ENCODER_SIG, image_size=256)


def test_decoder_profiles():
    pre_sig, step_sig = decoder_signatures()
    params = tp.PlanParams()
    pre = tp.plan_graph(tp.PREFILL, pre_sig, CFG, TOPK, params)
    step = tp.plan_graph(tp.STEP, step_sig, CFG, TOPK, params)
    check_profiles(pre)
    check_profiles(step)
    assert pre.buckets == (1, 8, 32, 256) and step.buckets == (10, 80, 320, 2560)
    # Prefill: B in (prev, bucket], G in [1, V] (the trie root may need every first token).
    p = pre.profiles[1]
    assert p.shapes["embedding"] == ((2, 768), (8, 768), (8, 768))
    assert p.shapes["cand_ids"] == ((2, 1), (8, tp.OPT_CANDS), (8, CFG.vocab_size))
    assert p.shapes["temperature"] == ((1,), (1,), (1,))
    # Step: N in (prev, bucket]; the previous rows M in [1, max rows] independently of N.
    s = step.profiles[0]
    L, h, S, hd = CFG.layers, CFG.heads, CFG.seq_len, CFG.head_dim
    assert s.shapes["tokens"] == ((1,), (10,), (10,))
    assert s.shapes["kv_cache"] == ((L, 2, 1, h, S, hd), (L, 2, 10, h, S, hd), (L, 2, 2560, h, S, hd))
    assert s.shapes["cand_ids"][2] == (10, tp.STEP_MAX_CANDS)
    assert set(s.shapes) == {"tokens", "position", "beam_idx", "kv_cache", "temperature", "cand_ids"}
    # Per-call shapes: step 1 after a prefill of 8 images reads 8 rows and writes 80.
    shapes = step.shapes(80, M=8, G=5)
    assert shapes["kv_cache"] == (L, 2, 8, h, S, hd) and shapes["kv_cache_out"] == (L, 2, 80, h, S, hd)
    assert shapes["cand_logprobs"] == (80, 5) and shapes["topk_ids"] == (80, TOPK)
    with pytest.raises(tp.PlanError, match="outside the planned range"):
        step.shapes(80, M=8, G=tp.STEP_MAX_CANDS + 1)
    with pytest.raises(tp.PlanError, match="largest bucket"):
        step.shapes(2561, M=8)


def test_buckets_cover_requested_batch_sizes():
    pre_sig, step_sig = decoder_signatures()
    for buckets, width in (((1, 8, 32, 256), 10), ((1, 4), 3), ((16,), 1)):
        params = tp.PlanParams(buckets=tp.normalize_buckets(buckets), beam_width=width)
        pre = tp.plan_graph(tp.PREFILL, pre_sig, CFG, TOPK, params)
        step = tp.plan_graph(tp.STEP, step_sig, CFG, TOPK, params)
        for images in range(1, max(buckets) + 1):
            assert pre.bucket_for(images) >= images
            for beams in (1, width):   # greedy and beam search
                rows = images * beams
                assert step.bucket_for(rows) >= rows
                p = step.profiles[step.profile_index(rows)]
                assert p.lo <= rows <= p.bucket
                # the previous call's rows (a prefill bucket, or the same step bucket) are allowed
                m_lo, _, m_hi = step.ranges["M"]
                assert m_lo <= pre.bucket_for(images) <= m_hi and m_lo <= step.bucket_for(rows) <= m_hi


def test_buffer_plan_sizes_and_ping_pong():
    pre_sig, step_sig = decoder_signatures(cache="float16")
    params = tp.PlanParams()
    pre = tp.plan_graph(tp.PREFILL, pre_sig, CFG, TOPK, params)
    step = tp.plan_graph(tp.STEP, step_sig, CFG, TOPK, params)
    plan = tp.plan_decoder_buffers(pre, step)
    b = plan.buffers
    rows, L, h, S, hd = 2560, CFG.layers, CFG.heads, CFG.seq_len, CFG.head_dim
    kv_bytes = L * 2 * rows * h * S * hd * 2
    assert b[tp.KV_A].nbytes == b[tp.KV_B].nbytes == kv_bytes
    assert b[tp.KV_A].dtype == "float16" and not b[tp.KV_A].host
    assert b["tokens"].nbytes == rows * 8 and b["beam_idx"].nbytes == rows * 8
    assert b["topk_logprobs"].nbytes == rows * TOPK * 4 and b["topk_ids"].nbytes == rows * TOPK * 8
    # cand_ids is shared: the larger of prefill (256 x V) and step (2560 x 1024) int64
    assert b["cand_ids"].nbytes == max(256 * CFG.vocab_size, rows * tp.STEP_MAX_CANDS) * 8
    assert b["embedding"].nbytes == 256 * 768 * 4
    for name, buf in b.items():
        assert buf.nbytes == prod(buf.shape) * tp.ITEMSIZE[buf.dtype], name
    assert plan.total_bytes == sum(x.nbytes for x in b.values())
    # Only scores are read back; the cache never has a host mirror.
    assert set(plan.host_outputs) == {"topk_logprobs", "topk_ids", "cand_logprobs"}
    # Ping-pong: the prefill writes A; each step reads what the previous call wrote and writes the
    # other buffer, never the one it reads.
    assert plan.prefill_bindings["kv_cache"] == tp.KV_A
    written = tp.KV_A
    for t in range(1, 16):
        binding = plan.step_bindings(t)
        assert binding["kv_cache"] == written
        assert binding["kv_cache_out"] != binding["kv_cache"]
        written = binding["kv_cache_out"]
    assert tp.KV_A != tp.KV_B
    with pytest.raises(tp.PlanError):
        plan.cache_pair(0)


def test_signature_mismatches_are_named():
    pre_sig, step_sig = decoder_signatures()
    other = DecoderConfig(embed_dim=512, vocab_size=12000, max_tokens=16)
    with pytest.raises(tp.PlanError, match="'embedding' axis 1 is 768, the config says 512"):
        tp.plan_graph(tp.PREFILL, pre_sig, other, TOPK, tp.PlanParams())
    bad = {"inputs": [i for i in step_sig["inputs"] if i["name"] != "beam_idx"], "outputs": step_sig["outputs"]}
    with pytest.raises(tp.PlanError, match="no input 'beam_idx'"):
        tp.plan_graph(tp.STEP, bad, CFG, TOPK, tp.PlanParams())
    fixed = {"inputs": [dict(i, shape=[4] if i["name"] == "tokens" else i["shape"]) for i in step_sig["inputs"]],
             "outputs": step_sig["outputs"]}
    with pytest.raises(tp.PlanError, match="must be dynamic"):
        tp.plan_graph(tp.STEP, fixed, CFG, TOPK, tp.PlanParams())
    with pytest.raises(tp.PlanError, match="disagree on the cache dtype"):
        p32, _ = decoder_signatures(cache="float32")
        _, s16 = decoder_signatures(cache="float16")
        tp.plan_decoder_buffers(tp.plan_graph(tp.PREFILL, p32, CFG, TOPK, tp.PlanParams()),
                                tp.plan_graph(tp.STEP, s16, CFG, TOPK, tp.PlanParams()))


def test_params_round_trip_and_profile_dicts():
    params = tp.PlanParams(buckets=(1, 4), beam_width=3, step_max_cands=77)
    assert tp.PlanParams.from_dict(params.to_dict()) == params
    _, step_sig = decoder_signatures()
    step = tp.plan_graph(tp.STEP, step_sig, CFG, TOPK, params)
    d = step.profiles[1].to_dict()
    assert d["bucket"] == 12 and d["min_batch"] == 4 and d["shapes"]["cand_ids"][2] == [12, 77]
    assert "profile 1: N in [4, 12]" in tp.describe(step)
    assert tp.image_size_from_preprocess({"size": [384, 384]}) == (384, 384)
    assert tp.image_size_from_preprocess({}) is None
