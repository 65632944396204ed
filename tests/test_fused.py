"""Fused onnxruntime graphs (novic.export.fused): the fusions happen, the numbers stay, the gate
keeps a bad variant out, bundles record them and the runtime picks them where it should."""
import collections
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_runtime import runtime_bundle  # noqa: E402,F401  (fixture)

pytest.importorskip("onnxruntime")

from novic.export.decoder_onnx import io_signature  # noqa: E402


@pytest.fixture(scope="module")
def runtime_fused(runtime_bundle):   # noqa: F811
    """The runtime fixture's plain fp32 graphs with fused fp32 and fp16 variants beside them."""
    from novic.export.fused import fuse_file
    from novic.runtime.bundle import Bundle

    bundle = Bundle.open(runtime_bundle.bundle)
    scratch = Path(runtime_bundle.root) / "fused-test"   # fused here, not in the shared bundle
    scratch.mkdir(exist_ok=True)
    out = {}
    for role in ("image_encoder", "decoder_prefill", "decoder_step"):
        plain = bundle.artifact_path(role, "fp32")
        out[role, "plain"] = str(plain)
        shutil.copyfile(plain, scratch / plain.name)
        for precision in ("fp32", "fp16"):
            out[role, precision] = fuse_file(scratch / plain.name, role, precision)
    return bundle, out


def ops(path) -> collections.Counter:
    return collections.Counter((n.domain or "ai.onnx", n.op_type) for n in onnx.load(path).graph.node)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fusions_happen(runtime_fused, precision):
    """Every attention of the ViT becomes MultiHeadAttention, every residual + LayerNorm pair a
    SkipLayerNormalization, the GELUs Gelu/BiasGelu: if a fusion silently stops matching (a new
    torch exporter, another tower), this fails."""
    bundle, out = runtime_fused
    plain_enc, enc = ops(out["image_encoder", "plain"]), ops(out["image_encoder", precision]["path"])
    ms = "com.microsoft"
    layers = plain_enc["ai.onnx", "Softmax"]
    assert layers == 2
    assert enc[ms, "MultiHeadAttention"] == layers and enc["ai.onnx", "Softmax"] == 0
    assert enc[ms, "BiasGelu"] == layers and enc["ai.onnx", "Erf"] == 0
    # two LayerNorms per block (one fused with the residual before it except the first), ln_post
    assert enc[ms, "SkipLayerNormalization"] == 2 * layers
    assert enc["ai.onnx", "LayerNormalization"] == plain_enc["ai.onnx", "LayerNormalization"] - 2 * layers
    for role in ("decoder_prefill", "decoder_step"):
        dec, plain = ops(out[role, precision]["path"]), ops(out[role, "plain"])
        cfg_layers = bundle.decoder_config.layers
        # every self-attention (prefill: over the prefix; step: over the fixed-slot cache) fused
        assert plain["ai.onnx", "Softmax"] == cfg_layers
        assert dec[ms, "MultiHeadAttention"] == cfg_layers and dec["ai.onnx", "Softmax"] == 0
        assert sum(dec.values()) < sum(plain.values())
        # the decoder's LayerNorms have no bias; all but the first (after the embedding sum) and
        # the final one (after a slice) sit on a residual Add
        assert dec[ms, "SkipLayerNormalization"] == 2 * cfg_layers - 1
        assert dec[ms, "Gelu"] == cfg_layers and dec["ai.onnx", "Erf"] == 0
        # the step contract is untouched: in-graph scores, fixed cache, beam reorder
        for op in ("TopK", "LogSoftmax", "GatherElements"):
            assert dec["ai.onnx", op] == plain["ai.onnx", op] == 1
        model = onnx.load(out[role, precision]["path"])
        io = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        cache = "kv_cache" if role == "decoder_prefill" else "kv_cache_out"
        assert io[cache] == (onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT)
        assert io["topk_logprobs"] == onnx.TensorProto.FLOAT
        if precision == "fp32":   # the step contract's inputs and outputs: names, types, shapes
            assert io_signature(model) == io_signature(onnx.load(out[role, "plain"]))


def test_fused_step_keeps_the_step_contract(runtime_fused):
    """The fused fp32 step against the plain one, graph call by graph call, at every position of
    the cache: same top-k ids, same candidate log-probs (within fp32 round-off), the beam reorder
    done in the graph, and kv_cache_out changed in slot `position` only (the slots after it are
    the reordered input, bit for bit)."""
    import onnxruntime as ort

    bundle, out = runtime_fused
    cfg = bundle.decoder_config
    sessions = {v: ort.InferenceSession(p, providers=["CPUExecutionProvider"])
                for v, p in (("plain", out["decoder_step", "plain"]), ("fused", out["decoder_step", "fp32"]["path"]))}
    prefill = ort.InferenceSession(out["decoder_prefill", "plain"], providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    rows, prev = 7, 3
    embeds = rng.standard_normal((prev, cfg.embed_dim)).astype(np.float32)
    one = np.ones(1, np.float32)
    cache = prefill.run(None, {"embedding": embeds, "temperature": one,
                               "cand_ids": np.zeros((prev, 1), np.int64)})[3]
    for position in range(cfg.prefix_len, cfg.seq_len):
        feeds = {"tokens": rng.integers(1, cfg.vocab_size, rows), "position": np.array([position]),
                 "beam_idx": rng.integers(0, len(cache[0, 0]), rows), "kv_cache": cache, "temperature": one,
                 "cand_ids": rng.integers(0, cfg.vocab_size, (rows, 4))}
        (top_p, ids_p, cand_p, cache_p), (top_f, ids_f, cand_f, cache_f) = (
            s.run(None, feeds) for s in (sessions["plain"], sessions["fused"]))
        assert (ids_f == ids_p).all() and np.abs(top_f - top_p).max() < 1e-5 and np.abs(cand_f - cand_p).max() < 1e-5
        reordered = cache[:, :, feeds["beam_idx"]]
        assert cache_f.shape == cache_p.shape == reordered.shape
        assert np.array_equal(np.delete(cache_f, position, axis=4), np.delete(reordered, position, axis=4))
        assert np.abs(cache_f[..., position, :] - cache_p[..., position, :]).max() < 1e-5
        cache = cache_f   # ping-pong: the next step reads what this one wrote


def test_fused_decoder_gates_pass(runtime_bundle, runtime_fused):   # noqa: F811
    """The export gate (novic.export.fused_gate, 100 embeddings, beam 5) on the fused decoder
    graphs: fp32 identical tokens, fp16 within its thresholds."""
    from novic.export.fused_gate import gate_decoder

    bundle, out = runtime_fused
    plain = (out["decoder_prefill", "plain"], out["decoder_step", "plain"])
    reference: dict = {}
    for precision in ("fp32", "fp16"):
        gate = gate_decoder(plain, (out["decoder_prefill", precision]["path"], out["decoder_step", precision]["path"]),
                            bundle.decoder_config, precision, noun_tokens=bundle.noun_tokens, width=5,
                            reference=reference)
        assert gate.passed, gate.line(f"decoder {precision}")
        if precision == "fp32":
            assert all(v == 1.0 for k, v in gate.numbers.items() if k != "max_abs_logprob_err")


def test_fused_encoder_matches_plain_and_open_clip(runtime_fused, tmp_path):
    import torch
    import torch.nn.functional as F

    from novic.export.encoder_onnx import export_encoder
    from novic.export.fused import fuse_file
    from novic.model.embedder import Embedder, tiny_spec
    from novic.runtime.backends.ort import OrtImageEncoder

    _, out = runtime_fused
    rng = np.random.default_rng(3)
    pixels = rng.standard_normal((5, 3, 64, 64)).astype(np.float32)
    cos = lambda a, b: np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # noqa: E731
    plain = OrtImageEncoder(out["image_encoder", "plain"])(pixels)
    fused32 = OrtImageEncoder(out["image_encoder", "fp32"]["path"])(pixels)
    fused16 = OrtImageEncoder(out["image_encoder", "fp16"]["path"])(pixels)   # CPU: no graph optimisations
    assert np.abs(fused32 - plain).max() < 1e-5 and cos(fused32, plain).min() > 0.99999
    assert cos(fused16, plain).min() > 0.999
    assert OrtImageEncoder(out["image_encoder", "fp32"]["path"])(pixels[:1]).shape == (1, 32)

    # against open_clip itself: a tower whose weights this test holds
    model = Embedder.load(tiny_spec()).model.eval()
    with torch.no_grad():
        oracle = F.normalize(model.visual(torch.from_numpy(pixels)).float(), dim=-1).numpy()
    fused = OrtImageEncoder(fuse_file(export_encoder(model, tmp_path)["path"], "image_encoder")["path"])(pixels)
    assert cos(fused, oracle).min() > 0.99999 and np.abs(fused - oracle).max() < 1e-4


def test_fused_decoder_tokens_match_the_pytorch_oracle(runtime_bundle, runtime_fused):   # noqa: F811
    """Exact greedy, beam and guided-beam tokens of the fused fp32 graphs on 150 random
    embeddings against the PyTorch decoder; fused fp16 agrees on the best hypothesis."""
    from novic.model.checkpoint import load_checkpoint
    from novic.model.session import TorchDecoderSession
    from novic.runtime import search
    from novic.runtime.backends.ort import OrtDecoderSession
    from novic.runtime.trie import TokenTrie

    bundle, out = runtime_fused
    model = load_checkpoint(runtime_bundle.checkpoint).build_model()
    cfg = bundle.decoder_config
    trie = TokenTrie(bundle.noun_tokens)
    rng = np.random.default_rng(7)
    embeds = rng.standard_normal((150, cfg.embed_dim)).astype(np.float32)

    def decode(session):
        return {"greedy": [h.tokens for h in search.greedy(session, embeds)],
                "beam": [[h.tokens for h in hs] for hs in search.beam_search(session, embeds, width=5)],
                "guided": [[h.tokens for h in hs] for hs in search.beam_search(session, embeds, width=5, trie=trie)]}

    oracle = decode(TorchDecoderSession(model, topk=bundle.graph_topk))
    # the lists exercise beams that finish at different steps (rows drop out of the step batch)
    assert any(len({len(h) for h in hyps}) > 1 for hyps in oracle["beam"])
    assert any(len({len(h) for h in hyps}) > 1 for hyps in oracle["guided"])
    fused32 = decode(OrtDecoderSession(out["decoder_prefill", "fp32"]["path"], out["decoder_step", "fp32"]["path"], cfg))
    assert fused32 == oracle
    plain = decode(OrtDecoderSession(out["decoder_prefill", "plain"], out["decoder_step", "plain"], cfg))
    assert plain == oracle
    fused16 = decode(OrtDecoderSession(out["decoder_prefill", "fp16"]["path"], out["decoder_step", "fp16"]["path"], cfg))
    for kind in ("greedy", "beam", "guided"):
        best = np.mean([(a[0] if kind != "greedy" else a) == (b[0] if kind != "greedy" else b)
                        for a, b in zip(fused16[kind], oracle[kind])])
        assert best >= 0.98, kind


def test_failing_gate_keeps_the_variant_out(runtime_bundle, tmp_path, monkeypatch):   # noqa: F811
    """A fused encoder whose numbers are off (a weight perturbed after fusion) fails its gate: it
    is deleted, reported in one line, recorded as failed; the decoder variant still goes in."""
    from novic.export import fused
    from novic.runtime.bundle import Bundle

    bundle = Bundle.open(runtime_bundle.bundle)
    export = {}
    for role in ("image_encoder", "decoder_prefill", "decoder_step"):
        dst = tmp_path / bundle.artifact(role).file
        shutil.copyfile(bundle.artifact_path(role), dst)
        export[role] = {"path": str(dst), "files": [str(dst)]}
    real = fused.fuse_model

    def off_by_a_bit(model, role):
        model = real(model, role)
        if role == "image_encoder":
            weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
            arr = onnx.numpy_helper.to_array(weight)
            arr = arr + np.random.default_rng(0).standard_normal(arr.shape) * 0.05 * arr.std()
            weight.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), weight.name))
        return model

    monkeypatch.setattr(fused, "fuse_model", off_by_a_bit)
    lines = []
    kept, summary = fused.export_fused(export["image_encoder"],
                                       {"prefill": export["decoder_prefill"], "step": export["decoder_step"]},
                                       bundle.decoder_config, fp16=False, noun_tokens=bundle.noun_tokens,
                                       width=5, say=lines.append)
    assert summary["image encoder fp32"].startswith("fail: cosine") and summary["decoder fp32"] == "pass"
    assert [role for _, role, _ in kept] == ["decoder_prefill", "decoder_step"]
    assert not (tmp_path / "image_encoder.fused.onnx").exists()
    [line] = [x for x in lines if x.startswith("fused image encoder")]
    assert "FAIL (cosine" in line and "not written" in line and "\n" not in line
    assert all(e["gate"]["greedy"] == 1.0 for e, _, _ in kept)


def strip_fused(src: Path, dst: Path) -> Path:
    """A copy of the bundle as written before fused variants existed."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for a in [a for a in manifest["artifacts"] if a.get("variant")]:
        (dst / a["file"]).unlink()
        manifest["artifacts"].remove(a)
    manifest["export"].pop("fused_gates", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_bundle_runtime_and_selection(runtime_bundle, tmp_path):   # noqa: F811
    from novic.runtime.backends.select import Probe, select_backend, select_for_bundle
    from novic.runtime.bundle import Bundle
    from novic.runtime.classifier import Classifier, ClassifierError

    b = Bundle.open(runtime_bundle.bundle, verify="eager")   # every hash, the fused graphs' too
    fused = [a for a in b.artifacts if a.variant == "fused" and a.pixels == "float32-nchw"]
    assert {(a.role, a.precision) for a in fused} == {(r, "fp32") for r in ("image_encoder", "decoder_prefill",
                                                                             "decoder_step")}
    assert all(a.extra["gate"] and a.file.endswith(".fused.onnx") for a in fused)
    gpu = Probe(gpu_name="NVIDIA H100", compute_capability="9.0", ort_version="1.23.0",
                ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    cpu = Probe(ort_version="1.32.0", ort_providers=("CPUExecutionProvider",))
    from novic.runtime.opening import ort_variants

    choice = select_backend((), ("fp32", "fp16"), facts=gpu)
    assert (choice.backend, choice.precision) == ("ort-cuda", "fp16")
    # fused or plain is decided for the precision that is loaded, not for the backend's default
    assert ort_variants(b, "fp32", "ort-cuda", None) == ("fused", "fused")
    assert ort_variants(b, "fp16", "ort-cuda", None) == ("plain", "plain")      # no fused fp16
    assert ort_variants(b, "fp32", "ort-cpu", None) == ("plain", "plain")       # CPU: not faster (benchmarks.md)
    assert ort_variants(b, "fp32", "ort-cuda", False) == ("plain", "plain")
    assert select_for_bundle(b, "auto", facts=cpu).backend == "ort-cpu"

    images = [np.full((64, 64, 3), v, np.uint8) for v in (0, 90, 200)]

    def labels(clf):
        return [[label.text for label in r.labels] for r in clf.classify(images)]

    with Classifier.load(b, "ort-cpu", fused=True) as clf:
        assert clf.variant == "fused" and "fp32 fused" in clf.describe()
        fused_labels = labels(clf)
    with Classifier.load(b, "ort-cpu") as clf:
        assert clf.variant == "plain" and labels(clf) == fused_labels

    old = Bundle.open(strip_fused(runtime_bundle.bundle, tmp_path / "old"), verify="eager")
    assert old.fused_precisions() == [] and select_for_bundle(old, "ort-cpu", facts=cpu).backend == "ort-cpu"
    with Classifier.load(old, "ort-cpu") as clf:
        assert clf.variant == "plain" and labels(clf) == fused_labels
    with pytest.raises(ClassifierError, match="no fused fp32 graphs in this bundle"):
        Classifier.load(old, "ort-cpu", fused=True)


def test_fused_follows_the_loaded_precision(runtime_bundle, monkeypatch):   # noqa: F811
    """ort-cuda picks its default precision (fp16 here) but the caller loads fp32: the fused fp32
    graphs are taken and the reason names them; fused=True where no fused graph can exist (int8/fp8,
    TensorRT) is one line, not ignored. Run with CPU sessions standing in for CUDA ones."""
    from novic.runtime.backends import ort
    from novic.runtime.backends import select
    from novic.runtime.bundle import Bundle
    from novic.runtime.classifier import Classifier, ClassifierError

    b = Bundle.open(runtime_bundle.bundle)
    backend = {"name": "ort-cuda", "precision": "fp16"}
    monkeypatch.setattr(select, "select_for_bundle", lambda bundle, requested: select.Choice(
        backend["name"], f"{backend['name']}: stand-in", backend["precision"]))
    for cls in ("OrtImageEncoder", "OrtDecoderSession"):
        real = getattr(ort, cls)
        monkeypatch.setattr(ort, cls, lambda *a, _real=real, **kw: _real(*a, **{**kw, "provider": "cpu"}))
    with Classifier.load(b, "ort-cuda", precision="fp32", threads=1, jpeg_decoder="pillow") as clf:
        assert (clf.precision, clf.variant) == ("fp32", "fused")
        # ort-cuda also takes the fused encoder's uint8-input twin (novic.export.u8)
        assert clf.backend_reason == "ort-cuda: stand-in; fused fp32 graphs; uint8 pixels into the encoder"
        assert clf.encoder.takes_uint8 and clf.classify_one(np.zeros((40, 50, 3), np.uint8)).ok
    with Classifier.load(b, "ort-cuda", precision="fp32", threads=1, fused=False, jpeg_decoder="pillow") as clf:
        assert clf.variant == "plain" and clf.backend_reason == "ort-cuda: stand-in"
    with pytest.raises(ClassifierError, match=r"^fused=True: there are no fused int8 graphs"):
        Classifier.load(b, "ort-cuda", precision="int8", fused=True, jpeg_decoder="pillow")
    backend.update(name="trt")
    with pytest.raises(ClassifierError, match=r"^fused=True: fused graphs are onnxruntime's"):
        Classifier.load(b, "trt", fused=True, jpeg_decoder="pillow")


def test_calib_derives_from_the_plain_fp32_encoder(runtime_bundle, tmp_path):   # noqa: F811
    """A manifest listing the fused fp32 encoder first: the quantised entry copies the plain one's I/O."""
    from novic.calib.run import add_artifact

    root = tmp_path / "b"
    shutil.copytree(runtime_bundle.bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    arts = manifest["artifacts"]
    fused = next(a for a in arts if a["role"] == "image_encoder" and a.get("variant") == "fused")
    plain = next(a for a in arts if a["role"] == "image_encoder" and a["precision"] == "fp32" and "variant" not in a)
    fused["inputs"] = [{"name": "fused-marker"}]
    manifest["artifacts"] = [fused] + [a for a in arts if a is not fused]
    (root / "manifest.json").write_text(json.dumps(manifest))
    src = tmp_path / "enc.int8.onnx"
    shutil.copy(root / plain["file"], src)
    entry = add_artifact(root, src, role="image_encoder", precision="int8", name="image_encoder.int8.onnx")
    assert entry["inputs"] == plain["inputs"] != fused["inputs"]
