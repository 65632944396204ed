"""Import an original NOVIC checkpoint (`*.train`, or a release `.zip` holding one) into novic's
checkpoint format (docs/model.md "The released checkpoints").

Safety: the file is read with ``torch.load(weights_only=True)``: only tensors, torch dtypes and
plain containers are unpickled. A file that needs anything else (arbitrary classes, callables) is
refused with `CheckpointImportError` before any of its code could run. What the file may unpack
to is capped (`ReadLimits`: a release zip's .train member, a torch zip's records and its pickle),
from the zip directories before anything is unpacked and again while streaming, so that a small
hostile file cannot fill TMPDIR or memory. NaN/inf weights are refused by name.

Mapping (original key -> ObjectDecoder key):
  embed_mlp.mlp.0.weight [P*H, F]                        -> prefix_proj.weight
  pos_embedding.embedding.weight [P+Cmax-1, H]            -> pos_embedding
  transformer.layers.{i}.self_attn.in_proj_weight [3H,H]  -> layers.{i}.attn.{q,k,v}_proj.weight
  transformer.layers.{i}.self_attn.out_proj.weight        -> layers.{i}.attn.out_proj.weight
  transformer.layers.{i}.linear{1,2}.weight               -> layers.{i}.linear{1,2}.weight
  transformer.layers.{i}.norm{1,2}.weight                 -> layers.{i}.norm{1,2}.weight
  transformer.norm.weight                                 -> norm.weight
  logits_linear.weight [V, H] (tied)                      -> token_embedding.weight
  causality_mask                                          -> (ignored: derived)
P, F, V, Cmax, H, layers and the FFN width come from the shapes; the head count (not visible in
shapes) from ``cfg_flat`` when it names one, else the released value 8. The token table is built
from the CLIP model's own tokenizer and ``target_config['compact_unmap']``; the noun vocabulary is
``target_nouns`` without its leading '' placeholders, each tokenised and mapped to compact ids.
"""
from __future__ import annotations

import functools
import math
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from novic.atomic import check_writable_file
from novic.config import EOS, DecoderConfig
from novic.errors import NovicError
from novic.hub import check_online, in_cache
from novic.model.checkpoint import Checkpoint, save_checkpoint
from novic.model.embedder import CONFIG_DIR, HF_HUB_PREFIX, EmbedderSpec
from novic.tokens import TokenTable

DEFAULT_HEADS = 8          # all released checkpoints (docs/model.md)
DEFAULT_LN_EPS = 1e-5
MAX_BAD_NOUNS = 2          # nouns that may fail to tokenise into the vocabulary (else: more than 1%)
TRAIN_SUFFIX = ".train"



class CheckpointImportError(NovicError):
    """An original checkpoint that cannot (or must not) be imported."""


@dataclass(frozen=True)
class ReadLimits:
    """What an original file may unpack to. Checked from the zip directories before anything is
    unpacked, and again while streaming, so that a small hostile file cannot fill TMPDIR or RAM.
    The defaults are far above the released checkpoints (about 1-2 GB, a pickle of a few MB);
    tests set them small."""
    max_bytes: int = 32 << 30         # a .train member of a release zip, or all records of a .train
    max_pickle_bytes: int = 256 << 20  # the pickle (data.pkl) of a torch zip: structure and nouns only
    max_ratio: float = 50.0            # unpacked / packed size of one member; float weights do not
    ratio_from: int = 64 << 20         # compress 50x; checked for members unpacking to more than this


@dataclass
class ImportResult:
    checkpoint: Checkpoint
    source: str                                   # the file read (zip member as 'zip:member')
    warnings: list[str] = field(default_factory=list)


# --- reading the file safely -----------------------------------------------------------------------
NOT_ORIGINAL = "not an original NOVIC checkpoint (.train inside a release zip)"
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _not_original(label, why: str) -> CheckpointImportError:
    return CheckpointImportError(f"{label}: {NOT_ORIGINAL}: {why}")


def _refusal(path, what: str) -> CheckpointImportError:
    return CheckpointImportError(
        f"refusing to load {path}: it needs arbitrary unpickling ({what}), which could run code; novic reads "
        f"only .train files made of tensors and plain data (use the official release files, or re-save the "
        f"checkpoint with only tensors, dicts, lists and numbers)")


def _first_sentence(text: str) -> str:
    """torch's messages go on for lines of advice: keep the first sentence, cut at a word if long."""
    text = re.split(r"(?<=\.) ", " ".join(text.split()), maxsplit=1)[0]
    text = re.sub(r"[\x00-\x1f\x7f]+", "?", text)   # a damaged file's bytes can end up in the message
    cut = text.rfind(" ", 0, 200)
    return text if len(text) <= 200 else text[:cut if cut > 0 else 200] + " ..."


def _pickle_protocol(path: Path, head: bytes) -> int:
    """The pickle protocol of a torch.save file (its data.pkl for the zip format); 0 if unknown.
    Reads 2 bytes of the pickle, never all of it."""
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if not pkl:
                    return 0
                with zf.open(pkl) as f:
                    head = f.read(2)
        except (zipfile.BadZipFile, OSError):
            return 0
    return head[1] if len(head) > 1 and head[0] == 0x80 else 0


def _check_head(head: bytes, label) -> None:
    """torch.save writes a zip archive, or in its legacy format a protocol-2 pickle (b'\x80\x02'):
    anything else is no checkpoint, and the unpickler would fail on it with a cryptic error."""
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        what = ("an empty file" if not head else "an HTML/XML page (a failed download?)"
                if head.lstrip().startswith(b"<") else "neither a PyTorch zip archive nor a pickle")
        raise _not_original(label, f"it is {what}; pass the release .zip or the .train file inside it")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_member(info: zipfile.ZipInfo, label, limit: int, limits: ReadLimits, what: str) -> None:
    """Refuse a zip member whose declared size is over `limit`, or that unpacks suspiciously far."""
    if info.file_size > limit:
        raise CheckpointImportError(f"{label}: {what} {info.filename} unpacks to {_gib(info.file_size)}, more than "
                                    f"the {_gib(limit)} a NOVIC checkpoint needs; refusing to unpack it (a damaged "
                                    f"or hostile file)")
    if info.file_size > limits.ratio_from and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        raise CheckpointImportError(f"{label}: {what} {info.filename} unpacks from {_gib(info.compress_size)} to "
                                    f"{_gib(info.file_size)} ({info.file_size // max(info.compress_size, 1)}:1), far "
                                    f"more than checkpoint weights compress; refusing to unpack it (a zip bomb?)")


def _check_torch_zip(path: Path, label, limits: ReadLimits) -> None:
    """The records of a torch.save zip, from its directory, before torch reads any of them: the
    pickle is read whole into memory, so it gets its own, smaller cap."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError):
        return   # torch.load names the damage
    total = 0
    for info in infos:
        is_pickle = info.filename.endswith("data.pkl")
        _check_member(info, label, limits.max_pickle_bytes if is_pickle else limits.max_bytes, limits,
                      "its pickle" if is_pickle else "its record")
        total += info.file_size
    if total > limits.max_bytes:
        raise CheckpointImportError(f"{label}: its records unpack to {_gib(total)}, more than the "
                                    f"{_gib(limits.max_bytes)} a NOVIC checkpoint needs; refusing to load it")


def _torch_load(path: Path, label: str, limits: ReadLimits = ReadLimits()) -> dict:
    with open(path, "rb") as f:
        head = f.read(512)
    _check_head(head, label)
    if head.startswith(b"PK\x03\x04"):
        _check_torch_zip(path, label, limits)
    try:
        with warnings.catch_warnings():   # "Detected pickle protocol 4": noise before the error line
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything (KeyError, IndexError, ...)
        # torch wraps the unpickler's own error (in __context__) in paragraphs of advice
        cause = e.__context__ if isinstance(e, pickle.UnpicklingError) and e.__context__ is not None else e
        m = re.search(r"GLOBAL (\S+)", str(cause))
        if m and _DOTTED.fullmatch(m.group(1)):   # a damaged file can 'name' a global of garbage bytes
            raise _refusal(label, f"global {m.group(1)}") from None
        protocol = _pickle_protocol(path, head)
        if protocol > 2 and "Unsupported operand" in str(cause):   # e.g. torch.save(..., pickle_protocol=4)
            raise CheckpointImportError(
                f"{label}: written with pickle protocol {protocol}, which torch's safe loader (weights_only) "
                f"does not read; re-save it with torch.save(checkpoint, path) (protocol 2, the default) "
                f"and import that") from None
        raise _not_original(label, f"damaged or truncated ({type(cause).__name__}: {_first_sentence(str(cause))}); "
                                   f"re-download it") from None
    if not isinstance(data, dict):
        raise _not_original(label, f"it holds a {type(data).__name__}, not the checkpoint dict")
    return data


def _train_member(zf: zipfile.ZipFile) -> str | None:
    """The .train member of a release zip (the latest chunk if there are several), else None."""
    names = [n for n in zf.namelist() if n.endswith(TRAIN_SUFFIX) and not n.endswith("/")]
    if not names:
        return None

    def chunk(name):
        m = re.search(r"chunk(\d+)", Path(name).name)
        return (int(m.group(1)) if m else -1, name)

    return max(names, key=chunk)


def _extract(zf: zipfile.ZipFile, member: str, target: Path, label: str, limits: ReadLimits) -> None:
    """Stream `member` to `target` after checking its declared size (against the limits and the
    free space where it goes) and its first bytes; count while streaming (a lying header)."""
    info = zf.getinfo(member)
    _check_member(info, label, limits.max_bytes, limits, "member")
    free = shutil.disk_usage(target.parent).free
    if info.file_size > free:
        raise CheckpointImportError(f"{label}: unpacking it needs {_gib(info.file_size)} in {target.parent}, which "
                                    f"has {_gib(free)} free; set TMPDIR to a directory with more space")
    written = 0
    with zf.open(member) as src, open(target, "wb") as dst:
        while block := src.read(1 << 22):
            if not written:
                _check_head(block, label)   # a bomb of zeros is refused after 4 MiB, not 4 GiB
            written += len(block)
            if written > min(info.file_size, limits.max_bytes):
                raise CheckpointImportError(f"{label}: unpacks to more than its declared "
                                            f"{_gib(info.file_size)}; refusing it (a damaged or hostile zip)")
            dst.write(block)
    if not written:
        _check_head(b"", label)


def read_original(path: str | Path, limits: ReadLimits = ReadLimits()) -> tuple[dict, str]:
    """Load the original checkpoint dict from a `.train` file or a release `.zip`.
    Returns (dict, source label). `limits`: what the file may unpack to (ReadLimits)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"file not found: {path} (give an original NOVIC .train file or a release .zip)")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                member = _train_member(zf)
                if member is not None:
                    label = f"{path}:{member}"
                    with tempfile.TemporaryDirectory(prefix="novic-import-") as tmp:
                        target = Path(tmp) / Path(member).name
                        _extract(zf, member, target, label, limits)
                        return _torch_load(target, label, limits), label
                if not any(n.endswith("data.pkl") for n in zf.namelist()):
                    raise _not_original(path, f"a zip file without a {TRAIN_SUFFIX} file inside (a NOVIC "
                                              f"release zip holds one)")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise CheckpointImportError(f"{path} is a damaged zip file ({e}): re-download it") from None
    return _torch_load(path, str(path), limits), str(path)


# --- the embedder spec and its tokenizer --------------------------------------------------------------
def parse_embedder_spec(text: str) -> EmbedderSpec:
    """The original's 'TYPE:NAME' embedder spec -> EmbedderSpec.
    'openclip:org/repo' -> hf-hub:org/repo; 'openclip:NAME' -> an open_clip (or novic-shipped) model
    config; 'openai:ViT-B/16' -> open_clip's port of the OpenAI weights."""
    if not isinstance(text, str) or ":" not in text:
        raise CheckpointImportError(f"embedder spec {text!r} is not of the form 'TYPE:NAME' "
                                    f"(e.g. 'openclip:timm/ViT-B-16-SigLIP'); pass the CLIP model explicitly")
    kind, name = text.split(":", 1)
    if kind == "openclip":
        if name.startswith(HF_HUB_PREFIX):
            name = name[len(HF_HUB_PREFIX):]
        if "/" in name:
            return EmbedderSpec(model=HF_HUB_PREFIX + name)
        if (CONFIG_DIR / f"{name}.json").is_file():
            return EmbedderSpec(model=name, config_file=f"{name}.json")
        return EmbedderSpec(model=name)
    if kind == "openai":
        model = name.replace("/", "-").replace("@336px", "-336")
        return EmbedderSpec(model=model, pretrained="openai")
    raise CheckpointImportError(f"embedder spec {text!r}: type {kind!r} is not supported (novic uses open_clip "
                                f"models: 'openclip:...' or 'openai:...'); pass the CLIP model explicitly")


def _sentencepiece_from_hub(repo: str, clean: str):
    from novic.bpe import EncoderError, SentencePieceEncoder
    from novic.hub import HubOfflineError, fetch

    try:
        path = fetch(repo, "spiece.model", f"the sentencepiece tokenizer of {repo}", "--tokenizer")
    except (HubOfflineError, ImportError) as e:
        raise CheckpointImportError(str(e)) from None
    try:
        return SentencePieceEncoder(path, clean=clean)
    except EncoderError as e:
        raise CheckpointImportError(str(e)) from None


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: EmbedderSpec, tokenizer_file: str | Path | None = None):
    """The CLIP model's own text tokenizer (anything novic.model.tokenizer.token_source accepts).
    `tokenizer_file`: a local CLIP BPE merges file (.txt/.txt.gz) or sentencepiece model (.model)
    instead (offline use). Cached per process (loading a BPE vocabulary takes seconds)."""
    from novic.bpe import ClipBpeEncoder, EncoderError, SentencePieceEncoder
    from novic.model import embedder as emb

    if tokenizer_file is not None:
        p = Path(tokenizer_file)
        try:
            if p.suffix == ".model":
                return SentencePieceEncoder(p, clean="canonicalize")
            return ClipBpeEncoder(p)
        except EncoderError as e:
            raise CheckpointImportError(str(e)) from None

    import open_clip

    if spec.config_file:
        emb._register_config(spec.config_file)
    hub = emb.hub_repo(spec)
    name = emb.open_clip_name(spec)   # open_clip's built-in config: no hub round trip for the config
    try:
        cfg = open_clip.get_model_config(name) if ":" not in name else None
    except Exception:  # noqa: BLE001
        cfg = None
    text_cfg = (cfg or {}).get("text_cfg", {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    if (hf_name or hub) and not check_online() and ":" in name and not in_cache(hub, "open_clip_config.json"):
        # offline, and open_clip could not even read this hub model's config: the tokenizer file it is
        return _sentencepiece_from_hub(hub, "canonicalize")
    try:
        return open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - transformers missing, hub unreachable, ...
        source = hf_name or hub
        clean = (text_cfg.get("tokenizer_kwargs") or {}).get("clean", "canonicalize")
        if source:
            # SigLIP-style: open_clip wraps the HF tokenizer (needs `transformers`); the same
            # vocabulary is the repo's sentencepiece model, read with `sentencepiece`.
            return _sentencepiece_from_hub(source, clean)
        raise CheckpointImportError(f"cannot load the tokenizer of {spec.model}: "
                                    f"{' '.join(str(e).split())[:200]}") from None


# --- conversion ---------------------------------------------------------------------------------------
_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight",
                "norm1.weight", "norm2.weight")
_TOP_KEYS = ("embed_mlp.mlp.0.weight", "pos_embedding.embedding.weight", "transformer.norm.weight",
             "logits_linear.weight")
_IGNORED = ("causality_mask",)


def _as_list(value, what: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    raise CheckpointImportError(f"target_config['{what}'] is a {type(value).__name__}, expected a tensor or list")


def _find_heads(cfg_flat: dict, width: int) -> int | None:
    """A head count named in the flattened training config, if any (key containing 'head')."""
    found = set()
    for key, value in cfg_flat.items():
        last = str(key).lower().rsplit(".", 1)[-1]
        if ("head" in last and "dim" not in last and "size" not in last and isinstance(value, int)
                and not isinstance(value, bool) and value > 0 and width % value == 0):
            found.add(value)
    return found.pop() if len(found) == 1 else None


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value if not (isinstance(value, float) and not math.isfinite(value)) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)} {value.dtype}>"
    return str(value)


def map_state_dict(sd: dict, label: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Original model_state_dict -> (ObjectDecoder state_dict, shape facts)."""
    def bad(msg):
        raise CheckpointImportError(f"{label}: {msg}: not the released NOVIC decoder architecture")

    missing = [k for k in _TOP_KEYS if k not in sd]
    if missing:
        bad(f"model_state_dict lacks {missing}")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _TOP_KEYS or key in _IGNORED:
            continue
        m = _LAYER_KEY.match(key)
        if m and m.group(2) in _LAYER_PARTS:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        bad(f"unexpected weight {key!r}" + (" (the released decoder has no biases)" if "bias" in key else ""))
    if not layers or sorted(layers) != list(range(len(layers))):
        bad(f"transformer layers {sorted(layers)} are not numbered 0..L-1")
    for i, parts in layers.items():
        lack = [p for p in _LAYER_PARTS if p not in parts]
        if lack:
            bad(f"layer {i} lacks {lack}")
    for key, value in sd.items():
        if key not in _IGNORED and (not isinstance(value, torch.Tensor) or not value.is_floating_point()):
            bad(f"{key} is not a floating-point tensor")
        if key not in _IGNORED and not torch.isfinite(value).all():
            raise CheckpointImportError(f"{label}: weight {key} holds {int((~torch.isfinite(value)).sum())} NaN/inf "
                                        f"values (a diverged or damaged training run); import another checkpoint")

    def f32(t):
        return t.detach().to(torch.float32).contiguous().clone()

    prefix = sd["embed_mlp.mlp.0.weight"]
    pos = sd["pos_embedding.embedding.weight"]
    head = sd["logits_linear.weight"]
    if prefix.dim() != 2 or pos.dim() != 2 or head.dim() != 2:
        bad("embed_mlp, pos_embedding and logits_linear weights must be 2-D")
    H = pos.shape[1]
    PH, F = prefix.shape
    if PH % H:
        bad(f"prefix projection rows {PH} are not a multiple of the width {H}")
    P = PH // H
    S, V = pos.shape[0], head.shape[0]
    Cmax = S - P + 1
    ffn = layers[0]["linear1.weight"].shape[0]
    if head.shape[1] != H:
        bad(f"logits_linear.weight is {list(head.shape)}, expected [V, {H}]")
    if Cmax < 2:
        bad(f"position table length {S} is too short for {P} prefix vectors")
    out = {"prefix_proj.weight": f32(prefix), "pos_embedding": f32(pos),
           "token_embedding.weight": f32(head), "norm.weight": f32(sd["transformer.norm.weight"])}
    for i in range(len(layers)):
        parts = layers[i]
        qkv = parts["self_attn.in_proj_weight"]
        if tuple(qkv.shape) != (3 * H, H):
            bad(f"layer {i} in_proj_weight is {list(qkv.shape)}, expected [{3 * H}, {H}]")
        q, k, v = qkv.chunk(3, dim=0)   # rows: Q, then K, then V
        pre = f"layers.{i}."
        out.update({
            pre + "attn.q_proj.weight": f32(q), pre + "attn.k_proj.weight": f32(k),
            pre + "attn.v_proj.weight": f32(v),
            pre + "attn.out_proj.weight": f32(parts["self_attn.out_proj.weight"]),
            pre + "linear1.weight": f32(parts["linear1.weight"]),
            pre + "linear2.weight": f32(parts["linear2.weight"]),
            pre + "norm1.weight": f32(parts["norm1.weight"]), pre + "norm2.weight": f32(parts["norm2.weight"]),
        })
    facts = {"embed_dim": F, "prefix_len": P, "width": H, "vocab_size": V, "max_tokens": Cmax,
             "layers": len(layers), "ffn_width": ffn}
    return out, facts


def build_vocab(tokenizer, compact_unmap: list[int], nouns: list[str], max_tokens: int,
                label: str = "checkpoint") -> tuple[TokenTable, list[str], list[list[int]], list[str]]:
    """Token table from the tokenizer + compact_unmap; compact sequence (+EOS) of every noun.
    Returns (table, nouns kept, their sequences, warnings). A few nouns that this tokenizer cannot
    express in the compact vocabulary are left out with a warning; many mean a wrong tokenizer (error)."""
    from novic.model.tokenizer import token_source

    src = token_source(tokenizer)
    content = compact_unmap[1:]
    if any(b <= a for a, b in zip(content, content[1:])):
        raise CheckpointImportError(f"{label}: compact_unmap is not increasing after entry 0 (not a compact "
                                    f"NOVIC vocabulary)")
    try:
        pieces = [""] + [src.piece(int(t)) for t in content]
    except (IndexError, KeyError) as e:
        raise CheckpointImportError(f"{label}: compact_unmap names tokenizer id {e} that the {src.kind} "
                                    f"tokenizer does not have: wrong CLIP model/tokenizer for this checkpoint") from None
    try:
        table = TokenTable(kind=src.kind, pieces=pieces, tokenizer_ids=[max(int(src.eos_id), 0)] + content,
                           clean=src.clean)
    except ValueError as e:
        raise CheckpointImportError(f"{label}: {e}") from None
    compact = {t: c for c, t in enumerate(content, 1)}
    kept, noun_tokens, used, warnings, bad = [], [], set(), [], []
    for noun in nouns:
        ids = [int(i) for i in src.encode(noun)]
        missing = [i for i in ids if i not in compact]
        if not ids:
            bad.append((noun, "tokenises to nothing"))
        elif missing:
            bad.append((noun, f"tokenises to ids {missing[:5]} outside the compact vocabulary"))
        elif len(ids) + 1 > max_tokens:
            bad.append((noun, f"needs {len(ids)} tokens + EOS, more than the decoder's {max_tokens}"))
        else:
            used.update(ids)
            kept.append(noun)
            noun_tokens.append([compact[i] for i in ids] + [EOS])
    if len(bad) > max(MAX_BAD_NOUNS, len(nouns) // 100):
        noun, why = bad[0]
        raise CheckpointImportError(
            f"{label}: {len(bad)} of {len(nouns)} nouns do not fit the checkpoint's vocabulary with the "
            f"{src.kind} tokenizer (e.g. {noun!r} {why}): this is not the tokenizer the model was trained with "
            f"(check the CLIP model, or pass --embedder/--tokenizer)")
    if bad:
        warnings.append(f"{len(bad)} noun(s) left out of the guided vocabulary because this tokenizer splits them "
                        f"differently from the original: " + "; ".join(f"{n!r} {w}" for n, w in bad[:5]))
    unused = len(content) - len(used)
    if kept and unused:
        warnings.append(f"{unused} of {len(content)} vocabulary tokens occur in no noun tokenisation (the "
                        f"original tokenizer may split some nouns differently)")
    return table, kept, noun_tokens, warnings


def convert(raw: dict, *, label: str = "checkpoint", embedder: EmbedderSpec | None = None,
            heads: int | None = None, tokenizer=None, tokenizer_file: str | Path | None = None) -> ImportResult:
    """Original checkpoint dict -> ImportResult (novic Checkpoint + warnings).
    `embedder` overrides the CLIP model named by cfg_flat; `tokenizer` (an object) or
    `tokenizer_file` (path) override the tokenizer loaded for it; `heads` the head count."""
    for key in ("model_state_dict", "target_config", "target_nouns"):
        if key not in raw:
            raise _not_original(label, f"it has no '{key}' (keys: {sorted(map(str, raw))[:8]})")
    cfg_flat = raw.get("cfg_flat") or {}
    if not isinstance(cfg_flat, dict):
        raise CheckpointImportError(f"{label}: cfg_flat is a {type(cfg_flat).__name__}, expected a dict")
    tc = raw["target_config"]
    if not isinstance(tc, dict):
        raise CheckpointImportError(f"{label}: target_config is a {type(tc).__name__}, expected a dict")

    state_dict, facts = map_state_dict(raw["model_state_dict"], label)
    warnings: list[str] = []

    # --- target config: compact ids, EOS = PAD = 0, no start token ---
    if not tc.get("compact_ids", False):
        raise CheckpointImportError(f"{label}: target_config has compact_ids={tc.get('compact_ids')!r}; only "
                                    f"compact-vocabulary checkpoints (all released ones) are supported")
    if tc.get("start_token_id") is not None or tc.get("end_token_id", 0) != 0 or tc.get("pad_token_id", 0) != 0:
        raise CheckpointImportError(
            f"{label}: target_config has start/end/pad token ids {tc.get('start_token_id')!r}/"
            f"{tc.get('end_token_id')!r}/{tc.get('pad_token_id')!r}; novic needs None/0/0 (as released)")
    unmap = _as_list(tc.get("compact_unmap"), "compact_unmap")
    V, Cmax = facts["vocab_size"], facts["max_tokens"]
    if len(unmap) != V:
        raise CheckpointImportError(f"{label}: compact_unmap has {len(unmap)} entries but the decoder has "
                                    f"{V} tokens")
    if tc.get("vocab_size") not in (None, V):
        raise CheckpointImportError(f"{label}: target_config vocab_size {tc['vocab_size']} != logits rows {V}")
    if tc.get("token_length") not in (None, Cmax):
        raise CheckpointImportError(f"{label}: target_config token_length {tc['token_length']} does not match "
                                    f"the position table (P + Cmax - 1 = {Cmax + facts['prefix_len'] - 1})")
    if tc.get("compact_map") is not None:
        cmap = _as_list(tc["compact_map"], "compact_map")
        bad = [t for c, t in enumerate(unmap[1:], 1) if not (0 <= t < len(cmap)) or cmap[t] != c]
        if bad:
            raise CheckpointImportError(f"{label}: compact_map and compact_unmap disagree (tokenizer ids "
                                        f"{bad[:5]})")

    # --- decoder config ---
    width = facts["width"]
    n_heads = heads or _find_heads(cfg_flat, width) or DEFAULT_HEADS
    if width % n_heads:
        raise CheckpointImportError(f"{label}: width {width} is not divisible by {n_heads} heads; pass heads=")
    try:
        config = DecoderConfig(embed_dim=facts["embed_dim"], vocab_size=V, max_tokens=Cmax,
                               prefix_len=facts["prefix_len"], width=width, layers=facts["layers"],
                               heads=n_heads, ffn_width=facts["ffn_width"], ln_eps=DEFAULT_LN_EPS)
    except ValueError as e:
        raise CheckpointImportError(f"{label}: {e}") from None

    # --- embedder, tokenizer, nouns ---
    spec_text = cfg_flat.get("embedder_spec")
    if embedder is None:
        if spec_text is None:
            raise CheckpointImportError(f"{label}: cfg_flat has no 'embedder_spec' naming the CLIP model; pass "
                                        f"it explicitly (--embedder openclip:org/repo)")
        embedder = parse_embedder_spec(spec_text)
    if tokenizer is None:
        tokenizer = load_tokenizer(embedder, tokenizer_file)

    all_nouns = list(raw["target_nouns"])
    n_invalid = raw.get("num_invalid_target_nouns")
    if n_invalid is None:
        n_invalid = 0
        while n_invalid < len(all_nouns) and all_nouns[n_invalid] == "":
            n_invalid += 1
    if any(n != "" for n in all_nouns[:n_invalid]):
        raise CheckpointImportError(f"{label}: the first {n_invalid} target nouns should be '' placeholders")
    nouns = all_nouns[n_invalid:]
    if not all(isinstance(n, str) and n for n in nouns):
        raise CheckpointImportError(f"{label}: target_nouns has empty or non-string entries after the "
                                    f"{n_invalid} placeholders")
    if len(set(nouns)) != len(nouns):
        warnings.append(f"{len(nouns) - len(set(nouns))} duplicate nouns in target_nouns")
    table, nouns, noun_tokens, vocab_warnings = build_vocab(tokenizer, unmap, nouns, Cmax, label)
    warnings += vocab_warnings

    meta = {"source": "novic-import", "original_file": label, "original_embedder_spec": spec_text,
            "original_compact_unmap0": unmap[0], "num_invalid_target_nouns": n_invalid,
            "heads_from": "argument" if heads else ("cfg_flat" if _find_heads(cfg_flat, width) else "default"),
            "dropped": sorted(str(k) for k in raw if k not in ("model_state_dict", "cfg_flat", "target_config",
                                                                  "target_nouns", "num_invalid_target_nouns")),
            "cfg_flat": _jsonable(cfg_flat), "warnings": warnings}
    ckpt = Checkpoint(config=config, state_dict=state_dict, embedder=embedder, token_table=table,
                      nouns=nouns, noun_tokens=noun_tokens, meta=meta)
    return ImportResult(checkpoint=ckpt, source=label, warnings=warnings)


def import_checkpoint(path: str | Path, out: str | Path | None = None, *, limits: ReadLimits = ReadLimits(),
                      **kwargs) -> ImportResult:
    """Read an original `.train` / release `.zip` (within `limits`), convert it, and (if `out`) save
    it atomically. Other keyword arguments go to `convert` (embedder, heads, tokenizer, tokenizer_file)."""
    if out is not None:
        _check_out(out)   # before the import, which can take minutes
    raw, label = read_original(path, limits)
    result = convert(raw, label=label, **kwargs)
    del raw
    if out is not None:
        try:
            save_checkpoint(out, result.checkpoint)
        except OSError as e:
            raise _unwritable(out, e) from None
    return result


def _unwritable(out, e: OSError) -> CheckpointImportError:
    return CheckpointImportError(f"cannot write {out} ({e.strerror or e}): choose an output path in a "
                                 f"writable directory")


def _check_out(out: str | Path) -> None:
    """Refuse an output path that is a directory or cannot be written (novic.atomic's probe)."""
    out = Path(out)
    if out.is_dir():
        raise CheckpointImportError(f"{out} is a directory: give the checkpoint file to write, e.g. "
                                    f"{out / 'model.safetensors'}")
    try:
        check_writable_file(out)
    except OSError as e:
        raise _unwritable(out, e) from None


def summary(result: ImportResult) -> str:
    c = result.checkpoint.config
    return (f"{result.source}: {result.checkpoint.embedder.model}, F={c.embed_dim}, V={c.vocab_size}, "
            f"Cmax={c.max_tokens}, P={c.prefix_len}, H={c.width}, {c.layers} layers x {c.heads} heads, "
            f"{len(result.checkpoint.nouns or [])} nouns, {c.num_params():,} parameters")


__all__ = ["CheckpointImportError", "ImportResult", "ReadLimits", "read_original", "parse_embedder_spec", "load_tokenizer",
           "map_state_dict", "build_vocab", "convert", "import_checkpoint", "summary"]
