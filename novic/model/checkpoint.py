"""Decoder checkpoints: one `.safetensors` file, never pickle.

Tensors: the `ObjectDecoder` state_dict. Header metadata (strings only, as safetensors wants):
  "format": "novic-checkpoint", "format_version": "<int>",
  "novic": JSON {config, embedder, token_table, nouns, noun_tokens, meta}.
Loading checks everything before any tensor is used, and every problem is a one-line
`CheckpointError` naming the file and what to do.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from novic.atomic import write_file_atomic
from novic.config import EOS, DecoderConfig
from novic.errors import NovicError
from novic.model.embedder import EmbedderSpec
from novic.tokens import TokenTable

FORMAT = "novic-checkpoint"
FORMAT_VERSION = 1
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointError(NovicError):
    """A checkpoint file that cannot be written or read."""


@dataclass
class Checkpoint:
    config: DecoderConfig
    state_dict: dict[str, torch.Tensor]
    embedder: EmbedderSpec
    token_table: TokenTable
    nouns: list[str] | None = None              # the noun vocabulary (guided decoding)
    noun_tokens: list[list[int]] | None = None  # compact sequence of each noun, ending in EOS
    meta: dict = field(default_factory=dict)    # free-form, JSON-serialisable (training info...)

    def build_model(self, device="cpu"):
        """The decoder with these weights, in eval mode."""
        from novic.model.decoder import ObjectDecoder

        model = ObjectDecoder(self.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()


def _expected_shapes(cfg: DecoderConfig) -> dict[str, tuple]:
    from novic.model.decoder import ObjectDecoder

    with torch.device("meta"):  # shapes only, no memory, no init cost
        model = ObjectDecoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _problems(ckpt: Checkpoint) -> list[str]:
    """Everything that makes `ckpt` inconsistent, as short phrases."""
    cfg, out = ckpt.config, []
    expected = _expected_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        out.append(f"missing weights {missing[:5]}")
    if unexpected:
        out.append(f"unexpected weights {unexpected[:5]}")
    for k in sorted(set(expected) & set(got)):
        if expected[k] != got[k]:
            out.append(f"{k} has shape {list(got[k])} but the config needs {list(expected[k])}")
    for k, v in ckpt.state_dict.items():
        if not v.is_floating_point():
            out.append(f"{k} has dtype {v.dtype}, expected floating point")
        elif not torch.isfinite(v).all():   # a diverged run: every label would score NaN
            out.append(f"{k} holds {int((~torch.isfinite(v)).sum())} NaN/inf values (weights of a diverged "
                       f"or damaged run; use an earlier checkpoint)")
    if ckpt.token_table.vocab_size != cfg.vocab_size:
        out.append(f"token table has {ckpt.token_table.vocab_size} tokens but config.vocab_size "
                   f"is {cfg.vocab_size}")
    if not isinstance(ckpt.meta, dict):
        out.append(f"meta must be a dict, got {type(ckpt.meta).__name__}")
    if ckpt.nouns is not None and not (isinstance(ckpt.nouns, list)
                                       and all(isinstance(n, str) for n in ckpt.nouns)):
        out.append("nouns must be a list of strings")
    if ckpt.nouns is not None and ckpt.noun_tokens is None:
        out.append("nouns without noun_tokens")
    if ckpt.noun_tokens is not None:
        if ckpt.nouns is not None and len(ckpt.nouns) != len(ckpt.noun_tokens):
            out.append(f"{len(ckpt.nouns)} nouns but {len(ckpt.noun_tokens)} noun token sequences")
        for i, seq in enumerate(ckpt.noun_tokens):
            ok = (isinstance(seq, list) and 2 <= len(seq) <= cfg.max_tokens and seq[-1] == EOS
                  and all(isinstance(t, int) and 0 < t < cfg.vocab_size for t in seq[:-1]))
            if not ok:
                out.append(f"noun token sequence {i} {str(seq)[:60]} is not 1..{cfg.max_tokens - 1} "
                           f"tokens in 1..{cfg.vocab_size - 1} followed by EOS")
                break
    return out


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically: a temp file in the same directory, then os.replace."""
    path = Path(path)
    problems = _problems(ckpt)
    if problems:
        raise CheckpointError(f"not saving {path}: inconsistent checkpoint: {'; '.join(problems)}")
    body = {"config": ckpt.config.to_dict(), "embedder": ckpt.embedder.to_dict(),
            "token_table": ckpt.token_table.to_dict(), "nouns": ckpt.nouns,
            "noun_tokens": ckpt.noun_tokens, "meta": ckpt.meta}
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"not saving {path}: meta must be JSON-serialisable ({e})") from None
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "novic": text}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ckpt.state_dict.items()}
    write_safetensors(path, tensors, metadata)
    return path


def write_safetensors(path, tensors: dict, metadata: dict) -> None:
    """Tensors (CPU, contiguous) + string metadata as safetensors, written atomically: save_file
    writes the temp file itself (no bytes object of the whole file)."""
    from safetensors.torch import save_file

    size = sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(metadata)) \
        + 100 * len(tensors)   # + the header: metadata and about 100 bytes per tensor entry
    write_file_atomic(path, lambda name: save_file(tensors, name, metadata=metadata), size)


def _read_header(path: Path) -> dict:
    """Parse the safetensors header ourselves to tell truncated, foreign and garbage files apart."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is empty or truncated ({size} bytes): re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER:
            raise CheckpointError(f"{path} is not a safetensors file (expected a novic checkpoint)")
        raw = f.read(n)
    if len(raw) < n:
        if raw.lstrip()[:1] != b"{":
            raise CheckpointError(f"{path} is not a safetensors file (expected a novic checkpoint)")
        raise CheckpointError(f"{path} is truncated (header cut at {size} bytes): re-download or re-save it")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except ValueError:
        raise CheckpointError(f"{path} is not a safetensors file (expected a novic checkpoint)") from None
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError):
        raise CheckpointError(f"{path} is not a safetensors file (expected a novic checkpoint)") from None
    if size < 8 + n + max(ends, default=0):
        raise CheckpointError(f"{path} is truncated ({size} of {8 + n + max(ends)} bytes): "
                              f"re-download or re-save it")
    return header


def load_checkpoint(path: str | Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = _read_header(path).get("__metadata__") or {}
    if meta.get("format") != FORMAT or "novic" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a novic checkpoint (no "
                              f"'{FORMAT}' metadata); original NOVIC '.train' files go through novic-import")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{path}: unreadable format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than this "
                              f"novic reads ({FORMAT_VERSION}): upgrade novic")
    try:
        body = json.loads(meta["novic"])
        ckpt = Checkpoint(config=DecoderConfig.from_dict(body["config"]),
                          state_dict={},
                          embedder=EmbedderSpec.from_dict(body["embedder"]),
                          token_table=TokenTable.from_dict(body["token_table"]),
                          nouns=body.get("nouns"), noun_tokens=body.get("noun_tokens"),
                          meta=body.get("meta") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupt novic metadata ({e}): re-save the checkpoint") from None
    try:
        ckpt.state_dict = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the weights ({e}): re-download or re-save it") from None
    problems = _problems(ckpt)
    if problems:
        raise CheckpointError(f"{path} does not match its own decoder config: {'; '.join(problems)} "
                              f"(re-save it with novic's save_checkpoint)")
    return ckpt
