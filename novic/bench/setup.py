"""Random-weight benchmark configurations (offline): a CLIP image tower of a real architecture,
a decoder of the released size and a synthetic noun vocabulary of the released size.

The CLIP weights are saved to a local file so that the exported bundle and the PyTorch baseline
use exactly the same weights."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from novic.atomic import write_json_atomic
from novic.registry import _say   # console or stderr, one line

# What shapes a bundle's graphs: when any of it changes, a cached bench bundle is exported again
# (a benchmark must never time graphs that the current code would not write).
EXPORT_SOURCES = ("config.py", "model/*.py", "export/*.py", "runtime/trie.py")
EXPORT_TOOLS = ("torch", "onnx", "onnxscript")


def export_code_hash() -> str:
    """A hash of EXPORT_SOURCES and the versions of EXPORT_TOOLS."""
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for pattern in EXPORT_SOURCES:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    for tool in EXPORT_TOOLS:
        try:
            digest.update(f"{tool}=={version(tool)}".encode())
        except PackageNotFoundError:
            digest.update(f"{tool} missing".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    clip: str            # open_clip architecture (random weights)
    embed_dim: int       # F of that architecture
    vocab_size: int      # V of the decoder
    max_tokens: int      # Cmax
    nouns: int           # size of the guided vocabulary
    note: str


CONFIGS = {
    # SigLIP B/16 + FT2: 11.4M parameters (docs/model.md) -> V = 5,330 with Cmax 12.
    "paper": BenchConfig("paper", "ViT-B-16-SigLIP", 768, 5330, 12, 11_897,
                         "ViT-B-16-SigLIP encoder, 11.4M decoder (FT2 size), 11,897 nouns"),
    # DFN5B-H/14-378 + FT0: F = 1024, ~43k nouns; CLIP-BPE vocabularies are larger than SigLIP's.
    "large": BenchConfig("large", "ViT-H-14-378", 1024, 14_000, 16, 42_919,
                         "ViT-H-14-378 encoder, 15.8M decoder (FT0 size), 42,919 nouns"),
    "tiny": BenchConfig("tiny", "novic-tiny-clip", 32, 300, 8, 500,
                        "tiny test CLIP + small-vocabulary full-width decoder"),
}


def synthetic_nouns(n: int, vocab_size: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Distinct token sequences (1..max_len tokens, mostly 1-4) with shared prefixes like real
    nouns ("red velvet cake", "red wine"): first tokens are drawn Zipf-like."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.geometric(0.45, size=4 * n), 1, max_len)
    seen, out = set(), []
    for length in lengths:
        first = int(min(vocab_size - 1, 1 + rng.zipf(1.3)))
        seq = (first, *map(int, rng.integers(1, vocab_size, size=length - 1)))
        if seq not in seen:
            seen.add(seq)
            out.append(list(seq))
            if len(out) == n:
                return out
    raise RuntimeError("could not draw enough distinct nouns")


def build(config: BenchConfig, workdir: Path, seed: int = 0, console=None) -> dict:
    """Create (once) the CLIP weights file, the decoder checkpoint and the bundle in workdir; the
    bundle is exported again when the export code changed since (EXPORT_SOURCES)."""
    from novic.export.bundle import export_bundle

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"clip": workdir / "clip.safetensors", "checkpoint": workdir / "decoder.safetensors",
             "bundle": workdir / "bundle", "info": workdir / "setup.json"}
    code = export_code_hash()
    info = json.loads(paths["info"].read_text()) if paths["info"].exists() else {}
    same_weights = (info.get("config") == config.__dict__ and info.get("seed", 0) == seed   # 0 before seeds were kept
                    and paths["checkpoint"].exists() and paths["clip"].exists())
    if same_weights and paths["bundle"].exists() and info.get("export_code") == code:
        return {k: str(v) for k, v in paths.items()}
    if same_weights:   # the same weights, exported again
        why = "export code or tools changed" if paths["bundle"].exists() else "no bundle"
        _say(console, f"{paths['bundle']}: {why}, exporting it again (quantised variants must "
                      f"be made again: novic-export calib)")
    else:   # no setup.json until the new weights are complete: an interrupted run starts over
        paths["info"].unlink(missing_ok=True)
        _random_checkpoint(config, paths, seed)
        info = {"config": config.__dict__, "seed": seed}
    result = export_bundle(paths["checkpoint"], paths["bundle"], overwrite=True, console=console)
    info.update(export_code=code, export_seconds=result["seconds"], export_timings=result["timings"])
    write_json_atomic(paths["info"], info)
    return {k: str(v) for k, v in paths.items()}


def _random_checkpoint(config: BenchConfig, paths: dict, seed: int) -> None:
    """The CLIP weights file and a decoder checkpoint of `config`'s sizes, random (seeded)."""
    import torch
    from safetensors.torch import save_file

    from novic.config import DecoderConfig
    from novic.model.checkpoint import Checkpoint, save_checkpoint
    from novic.model.decoder import ObjectDecoder
    from novic.model.embedder import Embedder, EmbedderSpec, tiny_spec
    from novic.tokens import TokenTable

    torch.manual_seed(seed)
    base = tiny_spec() if config.clip == "novic-tiny-clip" else EmbedderSpec(model=config.clip)
    embedder = Embedder.load(base, seed=seed, text=False)
    save_file({k: v.contiguous() for k, v in embedder.model.state_dict().items()}, str(paths["clip"]))
    spec = EmbedderSpec(model=base.model, pretrained=str(paths["clip"]), config_file=base.config_file)

    cfg = DecoderConfig(embed_dim=config.embed_dim, vocab_size=config.vocab_size,
                        max_tokens=config.max_tokens)
    model = ObjectDecoder(cfg)
    with torch.no_grad():  # peaked distributions, like a trained decoder
        model.token_embedding.weight.normal_(std=0.5)
        model.prefix_proj.weight.normal_(std=0.5)
    pieces = [""] + [f"t{i}</w>" for i in range(1, cfg.vocab_size)]
    table = TokenTable(kind="clip_bpe", pieces=pieces, tokenizer_ids=[49407] + list(range(1, cfg.vocab_size)))
    nouns_tok = synthetic_nouns(config.nouns, cfg.vocab_size, cfg.max_new_tokens, seed)
    nouns = [table.decode(seq) for seq in nouns_tok]
    ckpt = Checkpoint(config=cfg, state_dict=model.state_dict(), embedder=spec, token_table=table,
                      nouns=nouns, noun_tokens=[seq + [0] for seq in nouns_tok],
                      meta={"note": f"random weights for benchmark config {config.name}"})
    save_checkpoint(paths["checkpoint"], ckpt)
