"""Checkpoint files: exact round trip, atomic writes, one clear error per kind of bad file."""
import json
import os

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from novic.bpe import ClipBpeEncoder  # noqa: E402
from novic.config import DecoderConfig  # noqa: E402
from novic.model.checkpoint import (FORMAT, FORMAT_VERSION, Checkpoint, CheckpointError,  # noqa: E402
                                    load_checkpoint, save_checkpoint)
from novic.model.decoder import ObjectDecoder  # noqa: E402
from novic.model.embedder import tiny_spec  # noqa: E402
from novic.model.tokenizer import build_noun_vocab  # noqa: E402

NOUNS = ["dog", "hot dog", "red velvet cake", "brazil nut tree", "crème brûlée", "t-shirt"]


@pytest.fixture(scope="module")
def ckpt():
    from open_clip.tokenizer import default_bpe

    vocab = build_noun_vocab(ClipBpeEncoder(default_bpe()), NOUNS)
    cfg = DecoderConfig(embed_dim=32, vocab_size=vocab.table.vocab_size, max_tokens=vocab.max_tokens,
                        width=64, layers=2, heads=2, ffn_width=16)
    torch.manual_seed(0)
    model = ObjectDecoder(cfg)
    return Checkpoint(config=cfg, state_dict=model.state_dict(), embedder=tiny_spec(),
                      token_table=vocab.table, nouns=vocab.nouns, noun_tokens=vocab.noun_tokens,
                      meta={"epochs": 18, "note": "tiny ✓", "loss": [2.5, 1.25]})


@pytest.fixture()
def saved(ckpt, tmp_path):
    return save_checkpoint(tmp_path / "decoder.safetensors", ckpt)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_round_trip_is_exact(ckpt, saved):
    back = load_checkpoint(saved)
    assert back.state_dict.keys() == ckpt.state_dict.keys()
    for k, v in ckpt.state_dict.items():
        assert back.state_dict[k].dtype == v.dtype and raw_bytes(back.state_dict[k]) == raw_bytes(v), k
    assert back.config == ckpt.config and back.embedder == ckpt.embedder
    assert back.token_table == ckpt.token_table
    assert back.nouns == ckpt.nouns and back.noun_tokens == ckpt.noun_tokens and back.meta == ckpt.meta
    assert back.token_table.decode(back.noun_tokens[4]) == "crème brûlée"


def test_half_precision_weights_stay_half(ckpt, tmp_path):
    half = Checkpoint(**{**ckpt.__dict__, "state_dict": {k: v.half() for k, v in ckpt.state_dict.items()}})
    back = load_checkpoint(save_checkpoint(tmp_path / "half.safetensors", half))
    for k, v in half.state_dict.items():
        assert back.state_dict[k].dtype == torch.float16 and raw_bytes(back.state_dict[k]) == raw_bytes(v)


def test_build_model_reproduces_the_saved_decoder(ckpt, saved):
    original = ckpt.build_model()
    loaded = load_checkpoint(saved).build_model()
    embeds = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([[1, 2], [3, 0], [4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(embeds, tokens), original(embeds, tokens))
    assert not loaded.training


def test_metadata_is_readable_without_torch(ckpt, saved):
    # Plain safetensors: tools (bundle writer, runtime) can read the JSON from the header alone.
    data = saved.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len])["__metadata__"]
    assert meta["format"] == FORMAT and meta["format_version"] == str(FORMAT_VERSION)
    body = json.loads(meta["novic"])
    assert body["config"] == ckpt.config.to_dict() and body["nouns"] == NOUNS


def test_save_is_atomic(ckpt, saved, monkeypatch):
    before = saved.read_bytes()
    changed = Checkpoint(**{**ckpt.__dict__, "meta": {"run": 2}})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(saved, changed)
    assert saved.read_bytes() == before                       # the old file is untouched
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no temp file left


def test_inconsistent_checkpoint_is_not_saved(ckpt, tmp_path):
    state = dict(ckpt.state_dict)
    del state["norm.weight"]
    with pytest.raises(CheckpointError, match=r"not saving .*missing weights \['norm.weight'\]"):
        save_checkpoint(tmp_path / "bad.safetensors", Checkpoint(**{**ckpt.__dict__, "state_dict": state}))
    with pytest.raises(CheckpointError, match="meta must be JSON-serialisable"):
        save_checkpoint(tmp_path / "bad.safetensors", Checkpoint(**{**ckpt.__dict__, "meta": {"x": object()}}))
    assert not list(tmp_path.iterdir())


# --- bad files: one line naming the file and the way out ------------------------------------
def novic_metadata(ckpt, **override):
    body = {"config": ckpt.config.to_dict(), "embedder": ckpt.embedder.to_dict(),
            "token_table": ckpt.token_table.to_dict(), "nouns": ckpt.nouns,
            "noun_tokens": ckpt.noun_tokens, "meta": {}}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "novic": json.dumps(body)}
    meta.update(override)
    return meta


def expect_error(path, *phrases):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for phrase in phrases:
        assert phrase in message, message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "checkpoint not found", "check the path")


@pytest.mark.parametrize("keep", [0.5, 0.999, 20 / 10_000_000])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:max(10, int(len(data) * keep))])
    expect_error(saved, "truncated", "re-download or re-save")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_error(path, "empty or truncated")


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n" + bytes(200),                     # an image renamed
    b"PK\x03\x04" + bytes(200),                            # a release zip
    b"\x80\x04\x95" + b"pickle-ish bytes" * 20,            # a torch.save file
    (12).to_bytes(8, "little") + b"not json at all" + bytes(50),
])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    expect_error(path, "is not a safetensors file")


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file({"visual.proj": torch.zeros(4, 4)}, str(path), metadata={"format": "pt"})
    expect_error(path, "not a novic checkpoint")


def test_format_version_too_new(ckpt, tmp_path):
    path = tmp_path / "future.safetensors"
    save_file(dict(ckpt.state_dict), str(path), metadata=novic_metadata(ckpt, format_version="99"))
    expect_error(path, "format version 99", "upgrade novic")


@pytest.mark.parametrize("edit, phrase", [
    (lambda s: s.pop("layers.1.linear2.weight"), "missing weights ['layers.1.linear2.weight']"),
    (lambda s: s.update({"extra.bias": torch.zeros(3)}), "unexpected weights ['extra.bias']"),
    (lambda s: s.update({"token_embedding.weight": torch.zeros(7, 64)}),
     "token_embedding.weight has shape [7, 64] but the config needs"),
])
def test_weights_not_matching_config(ckpt, tmp_path, edit, phrase):
    state = dict(ckpt.state_dict)
    edit(state)
    path = tmp_path / "mismatch.safetensors"
    save_file(state, str(path), metadata=novic_metadata(ckpt))
    expect_error(path, "does not match its own decoder config", phrase)


def test_corrupt_metadata(ckpt, tmp_path):
    path = tmp_path / "corrupt.safetensors"
    save_file(dict(ckpt.state_dict), str(path), metadata=novic_metadata(ckpt, novic="{not json"))
    expect_error(path, "corrupt novic metadata")
