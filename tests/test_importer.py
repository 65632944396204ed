"""Import of original NOVIC checkpoints (`*.train`, release zips) without the real files.

The original format is rebuilt here from docs/model.md ("The released checkpoints"): a torch.save dict with cfg_flat,
target_config (compact maps), model_state_dict of a decoder written *in this file* with
torch.nn.TransformerEncoder (pre-LN, no bias, exact GELU, the prefix-bidirectional causal mask,
tied head, final LayerNorm), '' placeholders in target_nouns and fake optimizer/scheduler/AMP
state. That independent forward pass and a plain beam search over it are the oracle for the
imported ObjectDecoder.
"""
from __future__ import annotations

import builtins
import functools
import math
import pickle
import re
import shlex
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from novic.config import EOS
from novic.model.checkpoint import load_checkpoint
from novic.model.importer import NOT_ORIGINAL, CheckpointImportError, import_checkpoint, parse_embedder_spec, read_original
from novic.model.reference import beam_search
from novic.runtime.trie import TokenTrie

NOUNS = ["cat", "tabby cat", "dog", "hot dog", "red velvet cake", "cake", "brazil nut tree", "nut", "tree",
         "t-shirt", "shirt", "sea lion", "lion", "golden retriever", "retriever", "apple", "apple tree",
         "pine apple", "pineapple", "fire truck", "truck", "ice cream", "ice", "cream cheese", "cheese",
         "violin", "viola", "cello", "bicycle", "motorcycle", "sailboat", "boat", "whale shark", "shark",
         "dragonfly", "butterfly", "great white shark fin soup", "stop sign", "traffic light", "coffee mug", "mug", "teapot", "tea"]
N_INVALID = 2
VOCAB_SIZE = 49408          # CLIP BPE
SOT, EOT = 49406, 49407


# --- the original architecture, written independently from docs/model.md ----------------------------
class _EmbedMLP(nn.Module):
    def __init__(self, F_, P, H):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(F_, P * H, bias=False))


class _PosEmbedding(nn.Module):
    def __init__(self, S, H):
        super().__init__()
        self.embedding = nn.Embedding(S, H)


class OriginalDecoder(nn.Module):
    """docs/model.md "The object decoder", with the original's module names (so state_dict keys match)."""

    def __init__(self, F_, V, Cmax, P=4, H=512, layers=6, heads=8, ffn=128):
        super().__init__()
        self.P, self.H, self.S = P, H, P + Cmax - 1
        self.embed_mlp = _EmbedMLP(F_, P, H)
        self.pos_embedding = _PosEmbedding(self.S, H)
        layer = nn.TransformerEncoderLayer(d_model=H, nhead=heads, dim_feedforward=ffn, dropout=0.0,
                                           activation="gelu", layer_norm_eps=1e-5, batch_first=True,
                                           norm_first=True, bias=False)
        self.transformer = nn.TransformerEncoder(layer, num_layers=layers, norm=nn.LayerNorm(H, eps=1e-5, bias=False),
                                                 enable_nested_tensor=False)
        self.logits_linear = nn.Linear(H, V, bias=False)
        mask = torch.full((self.S, self.S), float("-inf")).triu(1)
        mask[:P, :P] = 0.0                      # the prefix block is bidirectional
        self.register_buffer("causality_mask", mask)

    def forward(self, embeds, tokens):
        """embeds [N,F], tokens [N,T] (targets shifted right) -> logits [N,T+1,V]."""
        n = embeds.shape[0]
        prefix = self.embed_mlp.mlp(F.normalize(embeds, dim=-1)).view(n, self.P, self.H)
        x = torch.cat([prefix, F.embedding(tokens, self.logits_linear.weight)], dim=1)
        S = x.shape[1]
        x = x + self.pos_embedding.embedding.weight[:S]
        x = self.transformer(x, mask=self.causality_mask[:S, :S])
        return self.logits_linear(x[:, self.P - 1:])


def randomize(model: nn.Module, seed: int):
    """Weights spread enough that logits are peaked (clear beam orderings) and norms are not 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.1 if "logits_linear" in name else 0.06
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


# --- writing the original file format -----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    import open_clip

    from novic.model import embedder as emb

    emb._register_config("novic-tiny-clip.json")
    return open_clip.get_tokenizer("novic-tiny-clip")


def target_config_for(nouns, tokenizer):
    """What the original's create_target_config builds for an open_clip CLIP BPE model (dict form)."""
    ids = set()
    longest = 0
    for noun in nouns:
        seq = [SOT] + tokenizer.encode(noun) + [EOT]
        ids.update(seq)
        longest = max(longest, len(seq))
    ids -= {EOT, SOT, EOT}        # end (= pad) and start tokens are not content
    unmap = [EOT] + sorted(ids)   # entry 0: the pad token (= end token for CLIP)
    cmap = torch.full((VOCAB_SIZE,), -1, dtype=torch.int64)
    cmap[torch.tensor(unmap[1:])] = torch.arange(1, len(unmap))
    cmap[EOT] = 0
    return {"vocab_size": len(unmap), "token_dtype": torch.int64, "mask_dtype": torch.bool,
            "start_token_id": None, "end_token_id": 0, "pad_token_id": 0, "compact_ids": True,
            "compact_map": cmap, "compact_unmap": torch.tensor(unmap, dtype=torch.int64),
            "fixed_token_length": False, "token_length": longest - 1, "use_masks": False}


def make_original(tmp_path: Path, *, seed=0, H=512, layers=6, heads=8, ffn=128, P=4, F_=32,
                  embedder_spec="openclip:novic-tiny-clip", name="ovod_chunk0433_20240610_105233.train",
                  extra_cfg=None, mutate=None, target_config=None):
    """Write an original-format .train from random weights; returns (path, OriginalDecoder, dict)."""
    tc = target_config or target_config_for(NOUNS, tiny_tokenizer())
    model = OriginalDecoder(F_, tc["vocab_size"], tc["token_length"], P=P, H=H, layers=layers, heads=heads, ffn=ffn)
    randomize(model, seed)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Fake training state, as the original saves it next to the weights (about 3x their size):
    # AdamW's state_dict layout, filled by hand (a real optimizer step costs seconds on 2 cores).
    params = list(model.parameters())
    opt_state = {"state": {i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(p),
                               "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 1.5e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                                   "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
                                   "differentiable": False, "fused": None, "params": list(range(len(params)))}]}
    sched_state = {"T_max": 100, "eta_min": 0.0, "base_lrs": [1.5e-3], "last_epoch": 433, "_step_count": 434,
                   "_get_lr_called_within_step": False, "_last_lr": [1e-5]}
    cfg_flat = {"action": "train", "embedder_spec": embedder_spec, "lr_scale": 1.5e-3, "batch_size": 8192,
                "noise_scheme": "GaussElemUniformAngle", "amp": True, "determ": False, "max_chunks": 433,
                "vocab_path": "/data/nouns.json", "embed_dtype": "float32"}
    cfg_flat.update(extra_cfg or {})
    raw = {
        "cfg_flat": cfg_flat,
        "target_config": tc,
        "model_state_dict": state,
        "target_nouns": [""] * N_INVALID + list(NOUNS),
        "num_invalid_target_nouns": N_INVALID,
        "optimizer_state_dict": opt_state,
        "scheduler_state_dict": sched_state,
        "amp_scaler_state_dict": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 2000, "_growth_tracker": 17},
        "train_state": {"chunk_id": 434, "batch_id": 123456, "ewa_train_loss": 1.234},
    }
    if mutate:
        mutate(raw)
    path = tmp_path / name
    torch.save(raw, path)
    return path, model, raw


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orig")
    path, model, raw = make_original(tmp, H=128, ffn=32)   # released depth/heads/P, narrower (2-core CI)
    return path, model, raw


@pytest.fixture(scope="module")
def imported(original, tmp_path_factory):
    path, _, _ = original
    out = tmp_path_factory.mktemp("ckpt") / "imported.safetensors"
    result = import_checkpoint(path, out)
    return result, out


# --- a plain beam search over the independent forward pass ---------------------------------------------
def plain_beam_search(model: OriginalDecoder, embed, width, nouns_tokens, max_new):
    """internals.md "Decoding semantics", written the obvious way (lists, sets, Python sort)."""
    seqs_all = [tuple(t) for t in nouns_tokens]

    def allowed(seq):
        nxt = {s[len(seq)] for s in seqs_all if len(s) > len(seq) and s[:len(seq)] == tuple(seq)}
        if tuple(seq) in seqs_all:
            nxt.add(EOS)
        return nxt

    beams = [([], 0.0, False)]   # (tokens, score, finished)
    for t in range(max_new):
        width_t = max(len(b[0]) for b in beams)
        toks = torch.tensor([b[0] + [EOS] * (width_t - len(b[0])) for b in beams], dtype=torch.long)
        toks = toks.reshape(len(beams), width_t)
        with torch.no_grad():
            logits = model(embed.expand(len(beams), -1), toks)[:, -1]
        logp = F.log_softmax(logits.float(), dim=-1)
        cands = []
        for bi, (seq, score, done) in enumerate(beams):
            if done:
                cands.append((score, bi, EOS))
                continue
            ok = allowed(seq)
            for tok in range(logp.shape[1]):
                lp = float(logp[bi, tok])
                if (t == 0 and tok == EOS) or tok not in ok:
                    lp = -math.inf
                cands.append((float(torch.tensor(score, dtype=torch.float32) + lp), bi, tok))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        new = []
        for score, bi, tok in cands[:width]:
            seq, _, done = beams[bi]
            new.append((seq if done or tok == EOS else seq + [tok], score, done or tok == EOS))
        beams = new
        if all(b[2] for b in beams):
            break
    out = [(tuple(s), sc) for s, sc, _ in beams if sc != -math.inf]
    return sorted(out, key=lambda x: -x[1])


# --- tests ---------------------------------------------------------------------------------------------
def test_config_recovered_from_shapes_and_target_config(original, imported):
    _, model, raw = original
    result, _ = imported
    cfg = result.checkpoint.config
    tc = raw["target_config"]
    assert (cfg.embed_dim, cfg.prefix_len, cfg.width, cfg.layers, cfg.heads, cfg.ffn_width) == (32, 4, 128, 6, 8, 32)
    assert cfg.vocab_size == tc["vocab_size"] and cfg.max_tokens == tc["token_length"]
    assert cfg.seq_len == model.S
    assert result.checkpoint.embedder.model == "novic-tiny-clip"


def test_vocabulary_and_nouns(original, imported):
    _, _, raw = original
    ck = imported[0].checkpoint
    assert ck.nouns == NOUNS                                   # placeholders dropped, order kept
    assert ck.token_table.kind == "clip_bpe"
    assert ck.token_table.tokenizer_ids[1:] == raw["target_config"]["compact_unmap"][1:].tolist()
    tok = tiny_tokenizer()
    cmap = raw["target_config"]["compact_map"]
    for noun, seq in zip(ck.nouns, ck.noun_tokens):
        # the original's target tokenisation: compact_map[tokenize(noun)] without the start token
        assert seq == cmap[torch.tensor(tok.encode(noun) + [EOT])].tolist()
        assert ck.token_table.decode(seq) == noun
    assert not imported[0].warnings


def test_training_state_dropped_and_metadata_kept(imported):
    result, out = imported
    meta = load_checkpoint(out).meta
    assert {"optimizer_state_dict", "scheduler_state_dict", "amp_scaler_state_dict"} <= set(meta["dropped"])
    assert meta["original_embedder_spec"] == "openclip:novic-tiny-clip"
    assert meta["num_invalid_target_nouns"] == N_INVALID
    assert out.stat().st_size < 1.2 * 4 * result.checkpoint.config.num_params() + 200_000


def test_logits_match_independent_forward(original, imported):
    _, model, _ = original
    ours = load_checkpoint(imported[1]).build_model()       # through the saved file
    cfg = ours.cfg
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(16, cfg.embed_dim, generator=g) * 3.0   # any norm: both normalise
    tokens = torch.randint(1, cfg.vocab_size, (16, cfg.max_tokens - 1), generator=g)
    with torch.no_grad():
        for T in (0, 1, cfg.max_tokens - 1):
            a = ours(embeds, tokens[:, :T])
            b = model(embeds, tokens[:, :T])
            assert a.shape == b.shape == (16, T + 1, cfg.vocab_size)
            assert (a - b).abs().max().item() <= 1e-5
        logits, cache = ours.prefill(embeds)
        assert (logits - model(embeds, tokens[:, :0])[:, 0]).abs().max().item() <= 1e-5


def test_released_dims(tmp_path):
    """H=512, 6 layers, 8 heads (default: no head count in cfg_flat), FFN 128, P=4."""
    path, model, _ = make_original(tmp_path, seed=5)
    ck = import_checkpoint(path).checkpoint
    cfg = ck.config
    assert (cfg.prefix_len, cfg.width, cfg.layers, cfg.heads, cfg.ffn_width) == (4, 512, 6, 8, 128)
    assert ck.meta["heads_from"] == "default"
    ours = ck.build_model()
    g = torch.Generator().manual_seed(6)
    e = torch.randn(3, 32, generator=g)
    t = torch.randint(1, cfg.vocab_size, (3, cfg.max_tokens - 1), generator=g)
    with torch.no_grad():
        assert (ours(e, t) - model(e, t)).abs().max().item() <= 1e-5


def test_guided_beam10_identical(original, imported):
    _, model, _ = original
    ck = imported[0].checkpoint
    ours = ck.build_model()
    seqs = [s[:-1] for s in ck.noun_tokens]
    trie = TokenTrie(seqs)
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(4, ck.config.embed_dim, generator=g)
    got = beam_search(ours, embeds, width=10, trie=trie)
    for i in range(embeds.shape[0]):
        want = plain_beam_search(model, embeds[i:i + 1], 10, seqs, ck.config.max_new_tokens)
        assert [h.tokens for h in got[i]] == [w[0] for w in want]
        for h, w in zip(got[i], want):
            assert abs(h.logprob - w[1]) <= 1e-4
        labels = [ck.token_table.decode(h.tokens) for h in got[i]]
        assert set(labels) <= set(NOUNS) and len(labels) == 10


def test_free_beam_identical(original, imported):
    _, model, _ = original
    ck = imported[0].checkpoint
    ours = ck.build_model()
    # free decoding = guided by "every sequence": compare the first two steps' logits on all beams
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(1, ck.config.embed_dim, generator=g)
    hyps = beam_search(ours, embed, width=10)[0]
    for h in hyps:
        prefix = torch.tensor([list(h.tokens)], dtype=torch.long)
        with torch.no_grad():
            a = ours(embed, prefix)
            b = model(embed, prefix)
        assert (a - b).abs().max().item() <= 1e-5


def test_release_zip(original, tmp_path, imported):
    path, _, _ = original
    z = tmp_path / "vitb16_ft2_ta4_ovod_20240610_105233.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("vitb16_ft2_ta4_ovod_20240610_105233/README.txt", "NOVIC model")
        zf.write(path, "vitb16_ft2_ta4_ovod_20240610_105233/ovod_20240610_105233/" + path.name)
    result = import_checkpoint(z)
    ref = imported[0].checkpoint
    assert result.checkpoint.nouns == ref.nouns
    for k, v in ref.state_dict.items():
        assert torch.equal(result.checkpoint.state_dict[k], v)
    assert path.name in result.source


class _Evil:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))   # unpickling would create a file


@pytest.mark.parametrize("how,message", [("torch.save", "refusing to load"), ("pickle", "refusing to load"),
                                         ("zip", "refusing to load"),
                                         ("pickle4", "written with pickle protocol 4, which torch's safe loader")])
def test_malicious_pickle_refused(tmp_path, how, message):
    target = tmp_path / "pwned.txt"
    raw = {"model_state_dict": {"x": torch.zeros(2)}, "target_config": _Evil(target), "target_nouns": []}
    path = tmp_path / "evil.train"
    if how == "pickle":      # the protocol torch.save uses: the unpickler meets the global and names it
        path.write_bytes(pickle.dumps(raw, protocol=2))
    elif how == "pickle4":   # pickle.dump's default protocol: the safe loader stops at its first opcode
        path.write_bytes(pickle.dumps(raw, protocol=4))
    else:
        torch.save(raw, path)
    if how == "zip":
        z = tmp_path / "evil.zip"
        with zipfile.ZipFile(z, "w") as zf:
            zf.write(path, "release/evil.train")
        path.unlink()
        path = z
    with pytest.raises(CheckpointImportError, match=message) as exc:
        import_checkpoint(path, tmp_path / "out.safetensors")
    assert "\n" not in str(exc.value)
    assert not target.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_files_give_one_line_errors(tmp_path, original):
    path, _, _ = original
    with pytest.raises(CheckpointImportError, match="not found"):
        read_original(tmp_path / "missing.train")
    trunc = tmp_path / "trunc.train"
    trunc.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointImportError, match="re-download"):
        read_original(trunc)
    z = tmp_path / "empty.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("README.txt", "no checkpoint")
    with pytest.raises(CheckpointImportError, match="without a .train"):
        read_original(z)


@pytest.mark.parametrize("content", [
    b"hello world\n",                                                   # KeyError in torch's unpickler
    b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n",       # a failed download
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4,            # a JPEG
    b"",
    b"PKG notes\n",
    b"\x80\x02cmod\x00ule\nname\n.",   # a pickle 'naming' a global of garbage bytes: damaged, not code
], ids=["text", "html", "jpeg", "empty", "pk-text", "garbage-global"])
def test_files_that_are_not_checkpoints(tmp_path, content):
    """Junk gives one line: the file, 'not an original NOVIC checkpoint', no claim that it could run code."""
    path = tmp_path / "junk.train"
    path.write_bytes(content)
    with pytest.raises(CheckpointImportError) as exc:
        import_checkpoint(path, tmp_path / "out.safetensors")
    msg = str(exc.value)
    assert msg.startswith(f"{path}: {NOT_ORIGINAL}: ")
    assert "could run code" not in msg and not re.search(r"[\x00-\x1f]", msg)
    assert not (tmp_path / "out.safetensors").exists()


def test_code_reference_is_refused_by_name(tmp_path):
    path = tmp_path / "os.train"
    path.write_bytes(b"\x80\x02cos\nsystem\n.")
    with pytest.raises(CheckpointImportError, match=r"refusing to load .*os\.system.*could run code"):
        read_original(path)


def test_damaged_checkpoint_message_is_whole(tmp_path):
    """torch's paragraph about a damaged zip is cut to its first sentence, not in the middle of a word."""
    trunc = tmp_path / "trunc.train"
    trunc.write_bytes(b"PK\x03\x04" + bytes(100))   # a zip's first bytes, then nothing usable
    with pytest.raises(CheckpointImportError) as exc:
        read_original(trunc)
    msg = str(exc.value)
    assert msg.startswith(f"{trunc}: {NOT_ORIGINAL}: damaged")
    assert re.search(r"\(RuntimeError: [^()]*central directory\.\); re-download it$", msg), msg


def test_unwritable_out_is_refused_before_the_import(tmp_path, original, monkeypatch):
    from novic.model import importer

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "x.safetensors"            # its 'directory' is a file: nothing can be created there

    def must_not_read(*a, **k):
        raise AssertionError("the original was read before --out was checked")

    with monkeypatch.context() as m:
        m.setattr(importer, "read_original", must_not_read)
        with pytest.raises(CheckpointImportError, match=rf"cannot write {re.escape(str(out))} \("):
            import_checkpoint(original[0], out)
        with pytest.raises(CheckpointImportError, match="is a directory"):
            import_checkpoint(original[0], tmp_path)

    def denied(path, ckpt):   # the write itself fails (e.g. permissions change meanwhile): the path, one line
        raise PermissionError(13, "Permission denied", str(Path(path).parent / ".x.safetensors.1234.tmp"))

    monkeypatch.setattr(importer, "save_checkpoint", denied)
    out = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointImportError, match=rf"^cannot write {re.escape(str(out))} \(Permission denied\)"):
        import_checkpoint(original[0], out)


def test_architecture_mismatch_is_refused(tmp_path):
    def add_bias(raw):
        raw["model_state_dict"]["transformer.layers.0.linear1.bias"] = torch.zeros(16)

    path, _, _ = make_original(tmp_path, H=64, layers=2, heads=4, ffn=16, mutate=add_bias)
    with pytest.raises(CheckpointImportError, match="no biases"):
        import_checkpoint(path)

    def bad_unmap(raw):
        raw["target_config"]["compact_unmap"] = raw["target_config"]["compact_unmap"][:-1]

    path, _, _ = make_original(tmp_path, H=64, layers=2, heads=4, ffn=16, mutate=bad_unmap, name="b.train")
    with pytest.raises(CheckpointImportError, match="compact_unmap has"):
        import_checkpoint(path)


def test_nouns_outside_the_vocabulary(tmp_path):
    """A noun the tokenizer cannot express in the compact vocabulary is left out with a warning;
    many such nouns mean the wrong tokenizer: refused."""
    def extra_noun(raw):
        raw["target_nouns"].append("xylophone")          # its tokens are not in compact_unmap

    path, _, _ = make_original(tmp_path, H=64, layers=2, ffn=16, mutate=extra_noun, name="x.train")
    result = import_checkpoint(path)
    assert result.checkpoint.nouns == NOUNS
    assert any("xylophone" in w for w in result.warnings)

    def shifted(raw):   # a vocabulary that does not match this tokenizer
        raw["target_config"]["compact_unmap"][1:] += 1
        raw["target_config"]["compact_map"] = None

    path, _, _ = make_original(tmp_path, H=64, layers=2, ffn=16, mutate=shifted, name="y.train")
    with pytest.raises(CheckpointImportError, match="not the tokenizer the model was trained with"):
        import_checkpoint(path)


def _sentencepiece_model(tmp_path) -> Path:
    """A tiny T5-style sentencepiece model (pad 0, eos 1, unk 2, no bos) trained on the nouns."""
    spm = pytest.importorskip("sentencepiece")
    from novic.bpe import canonicalize

    text = tmp_path / "nouns.txt"
    text.write_text("\n".join(canonicalize(n) for n in NOUNS * 3) + "\n")
    prefix = tmp_path / "spiece"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=120, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    return prefix.with_suffix(".model")


def test_sentencepiece_checkpoint(tmp_path):
    """SigLIP-style: T5 sentencepiece vocabulary with 'canonicalize' cleaning (the ta4 path)."""
    import sentencepiece

    from novic.bpe import canonicalize

    model_file = _sentencepiece_model(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    ids, longest = set(), 0
    for noun in NOUNS:   # the original: HF tokenizer(clean(noun)) = pieces + </s>; no start token
        seq = sp.encode(canonicalize(noun), out_type=int) + [1]
        ids.update(seq)
        longest = max(longest, len(seq))
    unmap = [0] + sorted(ids - {0, 1})
    cmap = torch.full((sp.get_piece_size(),), -1, dtype=torch.int64)
    cmap[torch.tensor(unmap[1:])] = torch.arange(1, len(unmap))
    cmap[0] = cmap[1] = 0
    tc = {"vocab_size": len(unmap), "token_dtype": torch.int64, "mask_dtype": torch.bool, "start_token_id": None,
          "end_token_id": 0, "pad_token_id": 0, "compact_ids": True, "compact_map": cmap,
          "compact_unmap": torch.tensor(unmap), "fixed_token_length": False, "token_length": longest,
          "use_masks": False}
    path, model, _ = make_original(tmp_path, H=64, layers=2, ffn=16, target_config=tc,
                                   embedder_spec="openclip:timm/ViT-B-16-SigLIP")
    result = import_checkpoint(path, tokenizer_file=model_file)
    ck = result.checkpoint
    assert ck.embedder.model == "hf-hub:timm/ViT-B-16-SigLIP"
    assert (ck.token_table.kind, ck.token_table.clean) == ("sentencepiece", "canonicalize")
    assert ck.token_table.tokenizer_ids[1:] == unmap[1:]
    for noun, seq in zip(ck.nouns, ck.noun_tokens):
        assert seq == cmap[torch.tensor(sp.encode(canonicalize(noun), out_type=int) + [1])].tolist()
        assert ck.token_table.decode(seq) == canonicalize(noun)
    e = torch.randn(3, 32)
    t = torch.randint(1, ck.config.vocab_size, (3, ck.config.max_tokens - 1))
    with torch.no_grad():
        assert (ck.build_model()(e, t) - model(e, t)).abs().max().item() <= 1e-5


def test_sentencepiece_tokenizer_offline_error(monkeypatch):
    """Without a local tokenizer file, the SigLIP tokenizer comes from the hub: offline -> one clear line."""
    import huggingface_hub
    import open_clip

    from novic.model import importer

    def no_transformers(name, *a, **k):
        raise ImportError("transformers is not installed")

    def offline(*a, **k):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(open_clip, "get_tokenizer", no_transformers)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    importer.load_tokenizer.cache_clear()
    with pytest.raises(CheckpointImportError) as exc:
        importer.load_tokenizer(parse_embedder_spec("openclip:timm/ViT-B-16-SigLIP"))
    msg = str(exc.value)
    assert "spiece.model" in msg and "timm/ViT-B-16-SigLIP" in msg and "--tokenizer" in msg and "\n" not in msg


def test_other_sizes_and_heads_from_cfg_flat(tmp_path):
    """P, H, layers, FFN from shapes; the head count from cfg_flat (or an argument)."""
    path, model, _ = make_original(tmp_path, H=64, layers=2, heads=4, ffn=16, P=2, F_=32,
                                   extra_cfg={"decoder_heads": 4})
    cfg = import_checkpoint(path).checkpoint.config
    assert (cfg.prefix_len, cfg.width, cfg.layers, cfg.heads, cfg.ffn_width) == (2, 64, 2, 4, 16)
    ours = import_checkpoint(path, heads=4).checkpoint.build_model()
    g = torch.Generator().manual_seed(4)
    e, t = torch.randn(5, 32, generator=g), torch.randint(1, cfg.vocab_size, (5, cfg.max_tokens - 1), generator=g)
    with torch.no_grad():
        assert (ours(e, t) - model(e, t)).abs().max().item() <= 1e-5


def test_embedder_spec_parsing():
    assert parse_embedder_spec("openclip:timm/ViT-B-16-SigLIP").model == "hf-hub:timm/ViT-B-16-SigLIP"
    assert parse_embedder_spec("openclip:apple/DFN5B-CLIP-ViT-H-14-378").model == "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
    spec = parse_embedder_spec("openclip:novic-tiny-clip")
    assert spec.config_file == "novic-tiny-clip.json"
    spec = parse_embedder_spec("openai:ViT-B/16")
    assert (spec.model, spec.pretrained) == ("ViT-B-16", "openai")
    with pytest.raises(CheckpointImportError, match="TYPE:NAME"):
        parse_embedder_spec("ViT-B-16")
    with pytest.raises(CheckpointImportError, match="not supported"):
        parse_embedder_spec("transformers:google/siglip-base-patch16-224")


def test_cli_import(original, tmp_path, monkeypatch, capsys):
    import typer

    from novic.cli import export as export_cli
    from novic.cli import importer as cli

    path, _, _ = original
    out = tmp_path / "cli.safetensors"
    monkeypatch.setattr("sys.argv", ["novic-import", str(path), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code in (0, None)
    assert load_checkpoint(out).nouns == NOUNS
    err = capsys.readouterr().err
    assert "imported" in err
    # the suggested next command is one novic-export accepts
    next_cmd = re.search(r"next: (novic-export .*)$", err, re.M).group(1)
    args = shlex.split(next_cmd.replace("BUNDLE_DIR", str(tmp_path / "bundle")))
    export_cmd = typer.main.get_command(export_cli.app).commands[args[1]]
    params = export_cmd.make_context(args[1], args[2:]).params   # parses only; raises on a missing option
    assert params["checkpoint"] == out
    # existing output without --force: refused, one line
    monkeypatch.setattr("sys.argv", ["novic-import", str(path), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert "--force" in capsys.readouterr().err


def _cli(monkeypatch, *argv) -> int:
    from novic.cli import importer as cli

    monkeypatch.setattr("sys.argv", ["novic-import", *map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code or 0


def test_cli_junk_file_one_line(tmp_path, monkeypatch, capsys):
    junk = tmp_path / "h.txt"
    junk.write_text("hello world\n")
    out = tmp_path / "o.safetensors"
    assert _cli(monkeypatch, junk, "--out", out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{junk}: {NOT_ORIGINAL}" in err.replace("\n", "")
    assert not out.exists()


def test_cli_out_directory_is_refused(original, tmp_path, monkeypatch, capsys):
    """--out DIR/ (existing or not) names a directory: refused with the file to give instead; nothing written."""
    existing = tmp_path / "outdir"
    existing.mkdir()
    for argv in ([existing], [existing, "--force"], [f"{existing}/"], [f"{tmp_path / 'newdir'}/"]):
        assert _cli(monkeypatch, original[0], "--out", *argv) == 2
        err = capsys.readouterr().err
        assert "names a directory" in err and f"{original[0].stem}.safetensors" in err and err.count("\n") == 1
    assert list(existing.iterdir()) == [] and not (tmp_path / "newdir").exists()


def test_cli_unwritable_out_one_line(original, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "x.safetensors"
    assert _cli(monkeypatch, original[0], "--out", out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {out}" in err and "Traceback" not in err


def test_cli_help_names_the_other_commands(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    assert _cli(monkeypatch, "--help") == 0
    text = capsys.readouterr().out
    description = text.split("Arguments")[0]   # the command's description, above the argument table
    assert "novic-import models" in description and "novic-import fetch" in description
    for sub in ("models", "fetch"):
        assert _cli(monkeypatch, sub, "--help") == 0
        text = capsys.readouterr().out
        assert "REFERENCE.md" not in text and "DESIGN.md" not in text


@pytest.mark.parametrize("legacy", [False, True])
def test_a_newer_pickle_protocol_is_named_with_the_fix(tmp_path, legacy):
    """A real torch.save checkpoint written with pickle_protocol=4 is not 'damaged': say how to re-save it."""
    raw = {"model_state_dict": {"x": torch.zeros(2)}, "target_config": {}, "target_nouns": []}
    path = tmp_path / "p4.train"
    torch.save(raw, path, pickle_protocol=4, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointImportError, match=r"p4.train: written with pickle protocol 4, .*re-save it with "
                                                    r"torch.save\(checkpoint, path\)"):
        import_checkpoint(path)


def test_long_torch_messages_are_cut():
    from novic.model.importer import _first_sentence

    assert len(_first_sentence("x" * 500)) == 204 and _first_sentence("a b. c") == "a b."
