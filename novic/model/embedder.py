"""The CLIP model behind a decoder: any open_clip model, wrapped for novic.

`EmbedderSpec` names it (stored in checkpoints and bundles); `Embedder.load(spec)` builds it with
open_clip and gives unit text/image embeddings, the tokenizer, the image tower (for export) and
the preprocessing parameters a torch-free runtime must reproduce. Models without weights are
initialised from a fixed seed, so two loads of the tiny test model are identical.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from novic import hub
from novic.errors import NovicError
from novic.registry import CLIP_WEIGHT_FILES, HUB_OPEN_CLIP

CONFIG_DIR = Path(__file__).parent / "configs"   # model configs shipped with novic
TINY_MODEL = "novic-tiny-clip"
HF_HUB_PREFIX = "hf-hub:"
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")


class EmbedderError(NovicError):
    """The CLIP model or its tokenizer cannot be loaded."""


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class EmbedderSpec:
    """`model`: an open_clip model name or 'hf-hub:org/repo'; `pretrained`: an open_clip tag, a
    local weights file, or None (random weights from a fixed seed); `config_file`: an open_clip
    model-config JSON whose file stem is `model` (a bare file name is looked up in the configs
    shipped with novic, so checkpoints stay portable), or None for open_clip's own configs."""

    model: str
    pretrained: str | None = None
    config_file: str | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("embedder spec: 'model' must be a non-empty string")
        if self.model.startswith(HF_HUB_PREFIX) and (self.pretrained or self.config_file):
            raise ValueError(f"embedder spec: {self.model} brings its own weights and config; "
                             f"leave 'pretrained' and 'config_file' empty")
        if self.config_file and Path(self.config_file).stem != self.model:
            raise ValueError(f"embedder spec: config file {self.config_file} defines model "
                             f"{Path(self.config_file).stem!r}, not {self.model!r}; use that name")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EmbedderSpec":
        if not isinstance(data, dict):
            raise ValueError(f"embedder spec: expected a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise ValueError(f"embedder spec: unknown keys {sorted(set(data) - known)}")
        for key in ("pretrained", "config_file"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"embedder spec: '{key}' must be a string or null")
        return cls(**data)


def tiny_spec() -> EmbedderSpec:
    """A tiny random CLIP (ViT 64px, 2+2 layers, width 64, CLIP BPE) for tests and examples."""
    return EmbedderSpec(model=TINY_MODEL, config_file=TINY_MODEL + ".json")


def resolve_config_file(config_file: str) -> Path:
    path = Path(config_file)
    if not path.is_file() and path.name == config_file and (CONFIG_DIR / config_file).is_file():
        path = CONFIG_DIR / config_file
    if not path.is_file():
        raise EmbedderError(f"open_clip model config not found: {config_file} (give a path to the "
                            f"JSON, or the name of one in {CONFIG_DIR})")
    return path


_registered: set[Path] = set()


def _register_config(config_file: str):
    """Make open_clip know the model defined by `config_file` (by its file stem)."""
    import json

    import open_clip

    path = resolve_config_file(config_file).resolve()
    if path in _registered:
        return
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EmbedderError(f"cannot read open_clip model config {path}: {_one_line(e)}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise EmbedderError(f"{path} is not an open_clip model config (missing {missing})")
    open_clip.add_model_config(path)
    _registered.add(path)


def _check_model(spec: EmbedderSpec):
    import open_clip

    if ":" in spec.model:  # 'hf-hub:' / 'local-dir:' schemas: open_clip resolves them
        return
    if open_clip.get_model_config(spec.model) is None:
        raise EmbedderError(f"unknown open_clip model {spec.model!r}: use a name from "
                            f"open_clip.list_models(), 'hf-hub:org/repo', or set config_file")
    p = spec.pretrained
    if p is None:
        return
    if os.sep in p or "/" in p or p.endswith(_WEIGHT_SUFFIXES):
        if not os.path.isfile(p):
            raise EmbedderError(f"weights file not found: {p} (spec.pretrained must be an open_clip "
                                f"tag or an existing file)")
        return
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if p not in tags:
        raise EmbedderError(f"{spec.model} has no pretrained tag {p!r}; known tags: {tags or 'none'}")


def open_clip_name(spec: EmbedderSpec) -> str:
    """The open_clip model name to ask for configs and tokenizers: a released CLIP's hub id maps to
    open_clip's built-in config of the same model (no hub round trip for its config)."""
    repo = hub_repo(spec)
    return HUB_OPEN_CLIP[repo][0] if repo in HUB_OPEN_CLIP else spec.model


def hub_repo(spec: EmbedderSpec) -> str | None:
    return spec.model[len(HF_HUB_PREFIX):] if spec.model.startswith(HF_HUB_PREFIX) else None


def hub_tokenizer_repo(spec: EmbedderSpec) -> str | None:
    """The hub repo the text tokenizer comes from (SigLIP-style HF tokenizers; an 'hf-hub:' model
    whose config is not known locally), or None for tokenizers shipped with open_clip."""
    import open_clip

    name = open_clip_name(spec)
    if ":" in name:
        return hub_repo(spec)
    try:
        cfg = open_clip.get_model_config(name) or {}
    except Exception:  # noqa: BLE001
        cfg = {}
    return cfg.get("text_cfg", {}).get("hf_tokenizer_name") or None


def with_weights_file(spec: EmbedderSpec, pretrained: str, clip: str | None = None) -> EmbedderSpec:
    """`spec` with its weights from the local file (or tag) `pretrained`, and the open_clip model
    `clip` if given. An 'hf-hub:' model gets the open_clip name of the same architecture (known for
    the released CLIP models; others need `clip`)."""
    if clip:
        shipped = CONFIG_DIR / f"{clip}.json"
        return EmbedderSpec(model=clip, pretrained=pretrained,
                            config_file=shipped.name if shipped.is_file() else None)
    if hub_repo(spec) is None:
        return replace(spec, pretrained=pretrained)
    name = open_clip_name(spec)
    if ":" in name:
        raise EmbedderError(f"{spec.model} brings its own weights; to use the file {pretrained} instead, "
                            f"also pass --clip with the open_clip model name of that architecture")
    return EmbedderSpec(model=name, pretrained=pretrained)


def _hub_weights_repo(spec: EmbedderSpec) -> str | None:
    """The hub repo whose weights open_clip will fetch for `spec`, or None (local file, random)."""
    import open_clip

    if hub_repo(spec):
        return hub_repo(spec)
    if spec.pretrained is None or os.path.isfile(spec.pretrained):
        return None
    try:
        cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained) or {}
    except Exception:  # noqa: BLE001
        cfg = {}
    return (cfg.get("hf_hub") or "").strip("/") or None


def _load_tokenizer(spec: EmbedderSpec):
    import open_clip

    source = hub_tokenizer_repo(spec)
    name = open_clip_name(spec)
    try:
        # offline: the HF cache only, a fast failure instead of retries
        if source and not hub.check_online() and ":" in name and not hub.in_cache(source, "open_clip_config.json"):
            raise EmbedderError("its config is not in the local Hugging Face cache")
        return open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - any failure here means "tokenizer unavailable"
        if source and hub.offline()[0]:
            hint = hub.missing_file(f"the tokenizer of {spec.model}", source, "spiece.model", "--tokenizer")
        elif source:
            hint = (f"it comes from the Hugging Face hub ({source}): install `transformers` and make "
                    f"the hub reachable, or pass --tokenizer with its spiece.model")
        else:
            hint = "check the model name and your network"
        raise EmbedderError(f"cannot load the tokenizer of {spec.model}: {_one_line(e, 160)}; {hint}") from None


class Embedder:
    """An open_clip model in eval mode on one device. Embeddings are fp32 unit vectors."""

    def __init__(self, spec: EmbedderSpec, model, tokenizer, device: torch.device):
        self.spec, self.model, self.tokenizer, self.device = spec, model, tokenizer, device
        self._dim = None

    @classmethod
    def load(cls, spec: EmbedderSpec, device="cpu", seed: int = 0, text: bool = True) -> "Embedder":
        """text=False skips the tokenizer (image-only uses: export, benchmarks); encode_text then
        raises."""
        import open_clip

        if spec.config_file:
            _register_config(spec.config_file)
        _check_model(spec)
        # First: it fails fast when the hub is unreachable.
        tokenizer = _load_tokenizer(spec) if text else None
        weights_repo = _hub_weights_repo(spec)
        if weights_repo and not hub.check_online() and not any(
                hub.in_cache(weights_repo, f) for f in CLIP_WEIGHT_FILES):
            raise EmbedderError(hub.missing_file(f"the CLIP weights of {spec.model}", weights_repo,
                                                 CLIP_WEIGHT_FILES[0], "--pretrained"))
        # Weights not loaded from a file come from this seed (without touching the global RNG).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = open_clip.create_model(spec.model, pretrained=spec.pretrained, device=device)
            except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/KeyError/OSError
                what = f"weights {spec.pretrained}" if spec.pretrained else "the model"
                hint = (f"; or {hub.missing_file('they', weights_repo, CLIP_WEIGHT_FILES[0], '--pretrained')}"
                        if weights_repo else "")
                raise EmbedderError(f"cannot create {spec.model} with {what}: {_one_line(e)}{hint}") from None
        model.eval().requires_grad_(False)
        return cls(spec, model, tokenizer, torch.device(device))

    # --- properties ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.model

    @property
    def visual(self) -> torch.nn.Module:
        """The image tower (pixels [N,3,H,W] -> unnormalised embeddings), for export."""
        return self.model.visual

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode_text(["a"]).shape[1])
        return self._dim

    @property
    def preprocess(self) -> dict:
        """open_clip's eval preprocessing as plain data: size [H, W], mean, std (3 floats each),
        interpolation ('bicubic'/'bilinear'), resize_mode ('shortest'/'longest'/'squash'),
        fill_color, mode ('RGB')."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        size = [size, size] if isinstance(size, int) else list(size)

        def three(v):
            return [float(x) for x in (v if isinstance(v, (list, tuple)) else (v,) * 3)]

        return {"size": [int(s) for s in size], "mean": three(cfg["mean"]), "std": three(cfg["std"]),
                "interpolation": cfg.get("interpolation", "bicubic"),
                "resize_mode": cfg.get("resize_mode", "shortest"),
                "fill_color": int(cfg.get("fill_color", 0)), "mode": cfg.get("mode", "RGB")}

    def image_transform(self):
        """open_clip's own eval transform (PIL image -> [3,H,W] tensor): the parity oracle."""
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = open_clip.get_model_preprocess_cfg(self.model)
        known = {f.name for f in fields(PreprocessCfg)}
        return image_transform_v2(PreprocessCfg(**{k: v for k, v in cfg.items() if k in known}),
                                  is_train=False)

    # --- embeddings ---------------------------------------------------------------------------
    def _autocast(self):
        # The original computes CLIP embeddings under fp16 autocast on CUDA; fp32 on CPU.
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """[N] strings -> [N, F] fp32 unit vectors on the embedder's device."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not a string")
        if self.tokenizer is None:
            raise EmbedderError(f"{self.name} was loaded without its tokenizer (text=False)")
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            with self._autocast():
                feats = self.model.encode_text(tokens)
            out.append(F.normalize(feats.float(), dim=-1))
        if not out:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat(out)

    @torch.inference_mode()
    def encode_image(self, pixels, batch_size: int = 64) -> torch.Tensor:
        """Preprocessed pixels [N, 3, H, W] (tensor or array) -> [N, F] fp32 unit vectors."""
        pixels = torch.as_tensor(pixels)
        H, W = self.preprocess["size"]
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, H, W):
            raise ValueError(f"{self.name} expects preprocessed pixels [N, 3, {H}, {W}], "
                             f"got {list(pixels.shape)} (use Embedder.image_transform())")
        out = []
        for i in range(0, pixels.shape[0], batch_size):
            batch = pixels[i:i + batch_size].to(self.device, torch.float32)
            with self._autocast():
                feats = self.model.encode_image(batch)
            out.append(F.normalize(feats.float(), dim=-1))
        if not out:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat(out)
