"""Bundle reader (torch-free): ``Bundle.open(path)`` -> validated manifest + verified artifact paths.

A bundle is a directory written by ``novic.export.bundle`` (``novic-export onnx``)::

    manifest.json                    format name/version, embedder + preprocessing, decoder config,
                                     search defaults, token table, nouns, artifacts, engines
    image_encoder.onnx               pixels [B,3,H,W] -> unit embedding [B,F]
    decoder_prefill.onnx, decoder_step.onnx      (+ *.fp16.onnx variants)
    *.fused.onnx, *.fused.fp16.onnx  onnxruntime-only variants with com.microsoft fused ops
                                     (``"variant": "fused"`` in the manifest; optional, gated)
    image_encoder[.fused][.fp16].u8.onnx   the encoders ort-cuda loads, taking uint8 pixels
                                     u8[B,H,W,3] and normalising in the graph (novic.export.u8;
                                     ``"pixels": "uint8-nhwc"`` in the manifest; optional, gated);
                                     no weights of their own: they read the float graph's
    *.onnx.data                      ONNX external data (weights) of a graph; a float encoder's
                                     file is listed under its u8 twin's "external_data" as well
    image_encoder.int8.onnx, image_encoder.fp8.onnx   quantised encoders, added by ``novic-export calib``
    tokenizer/...                    CLIP BPE merges or the sentencepiece model (optional)
    hierarchy.json                   the nouns' WordNet hypernyms (optional; novic.runtime.hierarchy)
    engines/*.engine, engines/timing.*.cache     added by ``novic-export trt`` (optional; one timing
                                                 cache per GPU architecture and TensorRT release)

Verification (what we chose and why): every artifact's size is checked when the bundle is
opened (cheap; catches truncation and missing files at once). The sha256 of an artifact is
checked lazily, the first time its path is asked for (``artifact_path`` / ``engine_path``), with a
streaming hash (1 MiB blocks, constant memory). A service therefore hashes only what it loads: a
TensorRT service never reads the fp32 ONNX files, a CPU service never reads the engines. A file
that several artifacts list (a float encoder's weights, which its u8 twin reads too) is hashed
once; the manifest must give it the same hash and size everywhere.
``verify="cached"`` additionally remembers good hashes in a sidecar ``.novic-verified.json``
(keyed by file, size, mtime_ns, ctime_ns and inode) so that restarts skip re-hashing unchanged
files. It trusts the file system's metadata: any write through the file system (even one that
puts the mtime back: the ctime cannot be put back) and any replaced file is hashed again, but
corruption below the file system (a failing disk flipping bits) leaves the metadata as it was
and is found only by a full hash (``verify=True``, ``novic-run --verify full``,
``novic-export check``). ``verify=False`` checks presence and size only.
``Bundle.verify()`` hashes everything now (used by ``novic-export check`` and the tests).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from novic.config import DecoderConfig
from novic.errors import NovicError

FORMAT_NAME = "novic-bundle"
# 2: artifacts may carry "variant" (fused graphs) and the manifest a "hierarchy"; both optional, so
# version-1 bundles read unchanged, and a novic that reads only 1 says "upgrade" on a 2.
# 3: image encoder artifacts may carry "pixels": "uint8-nhwc" (novic.export.u8), optional; a
# novic that reads only 2 would see two encoders for one precision, so it is told to upgrade.
# Still 3 since the u8 twins list their float graph's weight file as their own "external_data"
# (instead of holding a copy): readers of 3 already hash and load such entries unchanged.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
VERIFY_CACHE = ".novic-verified.json"

ROLES = ("image_encoder", "decoder_prefill", "decoder_step")
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")   # image encoder only (novic-export calib); the decoder stays fp32/fp16
# "plain": standard ONNX ops (every backend); "fused": onnxruntime's contrib ops (novic.export.fused).
# An entry without "variant" is plain (every format_version 1 entry).
VARIANTS = ("plain", "fused")
# What an image encoder takes: f32[B,3,H,W] normalised on the host (every entry without "pixels"),
# or the resized uint8 pixels u8[B,H,W,3], normalised in the graph.
FLOAT_PIXELS, U8_PIXELS = "float32-nchw", "uint8-nhwc"
PIXELS = (FLOAT_PIXELS, U8_PIXELS)
REEXPORT = "re-export with novic-export onnx"
_CHUNK = 1 << 20


class BundleError(NovicError):
    """A bundle that cannot be used; the message names the file and the fix."""


def sha256_file(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    """Streaming sha256 (constant memory) of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


# --- typed views of manifest entries ----------------------------------------------------------
@dataclass(frozen=True)
class FileRef:
    """A file of the bundle with its expected hash and size."""

    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy dtype name: float32, float16, int64, ...
    shape: tuple                    # ints for fixed dims, strings for symbolic ones ("B", "N")

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Artifact:
    """An ONNX graph of the bundle."""

    file: str
    role: str
    precision: str
    sha256: str
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[FileRef, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)
    variant: str = "plain"
    pixels: str = FLOAT_PIXELS

    def files(self) -> list[FileRef]:
        return [FileRef(self.file, self.sha256, self.size), *self.external_data]

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.file)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.file)

    def signature(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class Engine:
    """A TensorRT engine built from one of the artifacts (``novic-export trt``)."""

    file: str
    role: str
    precision: str
    sha256: str
    size: int
    tensorrt_version: str
    compute_capability: str          # "9.0"
    profiles: tuple[dict, ...]       # [{"bucket": n, "shapes": {input: [min, opt, max]}}]
    source: str = ""                 # the ONNX file it was built from
    device_name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")


def _by_name(specs, name, file):
    for t in specs:
        if t.name == name:
            return t
    raise BundleError(f"{file}: no tensor named {name!r} (has {[t.name for t in specs]}); {REEXPORT}")


# --- manifest validation ---------------------------------------------------------------------
def _fail(path: Path, what: str, fix: str = REEXPORT) -> "BundleError":
    return BundleError(f"{path}: {what}; {fix}")


def _require(cond: bool, path: Path, what: str):
    if not cond:
        raise _fail(path, f"invalid manifest: {what}")


def _safe_relpath(root: Path, rel: str, mpath: Path) -> Path:
    """A manifest path must stay inside the bundle (no absolute paths, no '..')."""
    _require(isinstance(rel, str) and rel != "", mpath, f"bad file name {rel!r}")
    p = Path(rel)
    _require(not p.is_absolute() and ".." not in p.parts, mpath, f"file {rel!r} points outside the bundle")
    return root / p


def _file_ref(d: dict, mpath: Path, where: str) -> FileRef:
    _require(isinstance(d, dict), mpath, f"{where} must be an object")
    for key in ("file", "sha256", "size"):
        _require(key in d, mpath, f"{where} lacks {key!r}")
    sha, size = d["sha256"], d["size"]
    _require(isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
             mpath, f"{where}: sha256 must be 64 lowercase hex digits")
    _require(isinstance(size, int) and not isinstance(size, bool) and size >= 0, mpath,
             f"{where}: size must be a non-negative integer")
    return FileRef(str(d["file"]), sha, size)


def parse_manifest(data: dict, mpath: Path) -> tuple[list[Artifact], list[Engine]]:
    """Structural validation of a loaded manifest; returns the typed artifacts and engines."""
    _require(isinstance(data, dict), mpath, "top level must be a JSON object")
    fmt = data.get("format")
    if fmt != FORMAT_NAME:
        raise _fail(mpath, f"not a novic bundle manifest (format is {fmt!r}, expected {FORMAT_NAME!r})",
                    "point at a directory written by novic-export onnx")
    version = data.get("format_version")
    _require(isinstance(version, int) and not isinstance(version, bool), mpath, "format_version must be an integer")
    if version > FORMAT_VERSION:
        raise _fail(mpath, f"bundle format_version {version} is newer than this novic supports "
                    f"({FORMAT_VERSION}; written by novic {data.get('novic_version', '?')})",
                    "upgrade novic (pip install -U novic) or re-export with this version's novic-export onnx")
    if version < 1:
        raise _fail(mpath, f"bundle format_version {version} is not supported")
    for key in ("decoder", "tokens", "embedder", "artifacts"):
        _require(key in data, mpath, f"missing {key!r}")
    _require(isinstance(data["artifacts"], list) and data["artifacts"], mpath, "'artifacts' must be a non-empty list")

    artifacts = []
    seen = set()
    listed: dict[str, FileRef] = {}   # a file several artifacts read (a u8 twin's shared weights)
    for i, a in enumerate(data["artifacts"]):
        where = f"artifacts[{i}]"
        ref = _file_ref(a, mpath, where)
        role, precision, variant = a.get("role"), a.get("precision"), a.get("variant", "plain")
        pixels = a.get("pixels", FLOAT_PIXELS)
        _require(role in ROLES, mpath, f"{where}: role {role!r} is not one of {ROLES}")
        _require(precision in PRECISIONS, mpath, f"{where}: precision {precision!r} is not one of {PRECISIONS}")
        _require(variant in VARIANTS, mpath, f"{where}: variant {variant!r} is not one of {VARIANTS}")
        _require(pixels in PIXELS and (pixels == FLOAT_PIXELS or role == "image_encoder"), mpath,
                 f"{where}: pixels {pixels!r} is not one of {PIXELS} (and only an image encoder takes pixels)")
        _require((role, precision, variant, pixels) not in seen, mpath,
                 f"{where}: two artifacts for {role}/{precision}" + (f" ({variant})" if variant != "plain" else "")
                 + (f" ({pixels})" if pixels != FLOAT_PIXELS else ""))
        seen.add((role, precision, variant, pixels))
        try:
            inputs = tuple(TensorSpec.from_dict(t) for t in a.get("inputs", []))
            outputs = tuple(TensorSpec.from_dict(t) for t in a.get("outputs", []))
        except (KeyError, TypeError) as exc:
            raise _fail(mpath, f"invalid manifest: {where}: bad input/output entry ({exc})") from None
        ext = tuple(_file_ref(e, mpath, f"{where}.external_data") for e in a.get("external_data", []))
        for f in (ref, *ext):   # hashes are checked once per file name: every listing must agree
            _require(listed.setdefault(f.file, f) == f, mpath,
                     f"{where}: {f.file} is listed twice with different sha256 or size")
        known = {"file", "sha256", "size", "role", "precision", "inputs", "outputs", "external_data", "variant",
                 "pixels"}
        artifacts.append(Artifact(ref.file, role, precision, ref.sha256, ref.size, inputs, outputs, ext,
                                  {k: v for k, v in a.items() if k not in known}, variant, pixels))

    engines = []
    for i, e in enumerate(data.get("engines", []) or []):
        where = f"engines[{i}]"
        ref = _file_ref(e, mpath, where)
        for key in ("role", "precision", "tensorrt_version", "compute_capability"):
            _require(key in e, mpath, f"{where} lacks {key!r}")
        _require(e["role"] in ROLES, mpath, f"{where}: role {e['role']!r} is not one of {ROLES}")
        known = {"file", "sha256", "size", "role", "precision", "tensorrt_version", "compute_capability",
                 "profiles", "source", "device_name"}
        engines.append(Engine(ref.file, e["role"], e["precision"], ref.sha256, ref.size,
                              str(e["tensorrt_version"]), str(e["compute_capability"]),
                              tuple(e.get("profiles", []) or []), str(e.get("source", "")),
                              str(e.get("device_name", "")), {k: v for k, v in e.items() if k not in known}))
    return artifacts, engines


def read_manifest(path: str | os.PathLike) -> dict:
    """Load ``manifest.json`` of a bundle directory with one-line errors (no validation)."""
    root = Path(path)
    if not root.exists():
        raise BundleError(f"{root}: bundle directory not found; export one with "
                          f"novic-export onnx --checkpoint CKPT --out {root}")
    if not root.is_dir():
        raise BundleError(f"{root}: a bundle is a directory (with {MANIFEST}), not a file; "
                          "pass the directory written by novic-export onnx")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing, so {root} is not a complete bundle; {REEXPORT}")
    try:
        text = mpath.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: cannot be read ({exc}); {REEXPORT}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mpath}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                          f"the file is truncated or edited; {REEXPORT}") from None


# --- the bundle ------------------------------------------------------------------------------
class Bundle:
    """A validated bundle. Cheap to open; artifact hashes are checked on first use (see module doc)."""

    def __init__(self, root: Path, manifest: dict, artifacts: list[Artifact], engines: list[Engine],
                 verify: bool | str = True):
        self.path = root
        self.manifest = manifest
        self.artifacts = artifacts
        self.engines = engines
        self.verify_mode = _verify_mode(verify)
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._token_table = None
        self._config = None

    # --- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool | str = True) -> "Bundle":
        """Read and validate ``path/manifest.json``; check that every listed file exists with its
        recorded size. ``verify``: True (sha256 of each artifact on first use), "cached" (same,
        remembering good hashes by size+mtime in a sidecar), "eager" (hash everything now),
        False (sizes only)."""
        root = Path(path)
        data = read_manifest(root)
        mpath = root / MANIFEST
        artifacts, engines = parse_manifest(data, mpath)
        bundle = cls(root, data, artifacts, engines, verify)
        try:
            bundle.decoder_config  # noqa: B018  (validates the config)
        except (TypeError, ValueError) as exc:
            raise _fail(mpath, f"invalid decoder config ({exc})") from None
        for ref in bundle._all_refs():
            bundle._check_size(ref)
        if bundle.verify_mode == "eager":
            bundle.verify()
        return bundle

    def _all_refs(self) -> list[FileRef]:
        refs = [r for a in self.artifacts for r in a.files()] + [
            FileRef(e.file, e.sha256, e.size) for e in self.engines]
        for key in ("tokenizer", "hierarchy"):
            entry = self.manifest.get(key)
            if entry:
                refs.append(FileRef(entry["file"], entry["sha256"], entry["size"]))
        return refs

    def _check_size(self, ref: FileRef) -> Path:
        p = _safe_relpath(self.path, ref.file, self.path / MANIFEST)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise BundleError(f"{p}: missing from the bundle (listed in {MANIFEST}); "
                              f"the bundle is incomplete; {REEXPORT}") from None
        if size != ref.size:
            raise BundleError(f"{p}: size {size} bytes differs from the manifest's {ref.size}: the file "
                              f"is truncated, corrupt or was replaced; {REEXPORT}")
        return p

    # --- verification ----------------------------------------------------------------------
    def _verify_ref(self, ref: FileRef) -> Path:
        p = self._check_size(ref)
        if self.verify_mode == "size" or ref.file in self._verified:
            return p
        with self._lock:
            if ref.file in self._verified:
                return p
            if self.verify_mode == "cached" and _cache_hit(self.path, ref, p):
                self._verified.add(ref.file)
                return p
            digest = sha256_file(p)
            if digest != ref.sha256:
                raise BundleError(f"{p}: sha256 mismatch (manifest {ref.sha256[:12]}..., file "
                                  f"{digest[:12]}...): the file is corrupt or was tampered with; {REEXPORT}")
            self._verified.add(ref.file)
            if self.verify_mode == "cached":
                _cache_store(self.path, ref, p)
        return p

    def verify(self, roles=None) -> list[str]:
        """Hash every artifact, engine and tokenizer file now (or only those of `roles`);
        returns the files checked, each once. Raises BundleError on the first mismatch."""
        checked = []
        for a in self.artifacts:
            if roles is None or a.role in roles:
                for ref in a.files():
                    self._verify_ref(ref)
                    if ref.file not in checked:   # a float encoder's weights, listed by its u8 twin too
                        checked.append(ref.file)
        for e in self.engines:
            if roles is None or e.role in roles:
                self._verify_ref(FileRef(e.file, e.sha256, e.size))
                checked.append(e.file)
        for key in ("tokenizer", "hierarchy"):
            entry = self.manifest.get(key)
            if entry and roles is None:
                self._verify_ref(FileRef(entry["file"], entry["sha256"], entry["size"]))
                checked.append(entry["file"])
        return checked

    # --- typed accessors -------------------------------------------------------------------
    @property
    def format_version(self) -> int:
        return self.manifest["format_version"]

    @property
    def novic_version(self) -> str:
        return self.manifest.get("novic_version", "")

    @property
    def created(self) -> str:
        return self.manifest.get("created", "")

    @property
    def decoder_config(self) -> DecoderConfig:
        if self._config is None:
            self._config = DecoderConfig.from_dict(self.manifest["decoder"])
        return self._config

    @property
    def token_table(self):
        if self._token_table is None:
            from novic.tokens import TokenTable, TokenTableError
            try:
                self._token_table = TokenTable.from_dict(self.manifest["tokens"])
            except TokenTableError as exc:
                raise _fail(self.path / MANIFEST, str(exc)) from None
        return self._token_table

    @property
    def embedder(self) -> dict:
        """{"spec": EmbedderSpec dict, "embed_dim": F, "preprocess": {...}, ...}"""
        return self.manifest["embedder"]

    @property
    def preprocess(self) -> dict:
        """The embedder's preprocessing (open_clip keys), checked: a bad value is a BundleError."""
        self.preprocess_config  # noqa: B018  (validates it)
        return copy.deepcopy(self.manifest["embedder"].get("preprocess", {}))   # a copy: the config is cached

    @functools.cached_property
    def preprocess_config(self):
        """`preprocess` parsed (novic.runtime.preprocess.PreprocessConfig), once."""
        from novic.runtime.preprocess import PreprocessConfig

        try:
            return PreprocessConfig.from_dict(self.manifest["embedder"].get("preprocess", {}))
        except (ValueError, TypeError, AttributeError) as exc:
            raise _fail(self.path / MANIFEST, f"embedder.preprocess is invalid ({exc})") from None

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embedder"].get("embed_dim", self.decoder_config.embed_dim))

    def check_encoder(self, image_size, embed_dim) -> None:
        """An image encoder (its input H, W and output width, as loaded) against this bundle's
        preprocessing size and decoder: at load, so that graphs of another model in a re-hashed
        manifest fail here and not in the middle of a classification."""
        want_size, want_dim = tuple(self.preprocess_config.size), self.decoder_config.embed_dim
        size = tuple(d if isinstance(d, int) else None for d in image_size)
        if size != want_size or embed_dim != want_dim:
            raise BundleError(f"{self.path}: the image encoder takes {'x'.join(map(str, size))} images and returns "
                              f"{embed_dim}-d embeddings, but the bundle preprocesses to "
                              f"{'x'.join(map(str, want_size))} and its decoder takes {want_dim}-d embeddings: the "
                              f"graphs come from different models; {REEXPORT}")

    @property
    def search_defaults(self) -> dict:
        """{"topk": k of the graphs, "beam_width": 10, ...}"""
        return dict(self.manifest.get("search", {}))

    @property
    def graph_topk(self) -> int:
        return int(self.manifest.get("search", {}).get("topk", 10))

    @property
    def nouns(self) -> list[str] | None:
        n = self.manifest.get("nouns")
        return list(n["text"]) if n else None

    @property
    def noun_tokens(self) -> list[list[int]] | None:
        """Compact token sequences of the nouns (without EOS), aligned with ``nouns``."""
        n = self.manifest.get("nouns")
        return [list(t) for t in n["tokens"]] if n and n.get("tokens") is not None else None

    @property
    def tokenizer_file(self) -> Path | None:
        """The CLIP BPE merges file or sentencepiece model copied into the bundle, verified."""
        tok = self.manifest.get("tokenizer")
        if not tok:
            return None
        return self._verify_ref(FileRef(tok["file"], tok["sha256"], tok["size"]))

    @property
    def tokenizer_kind(self) -> str | None:
        tok = self.manifest.get("tokenizer")
        return tok.get("kind") if tok else None

    @property
    def has_hierarchy(self) -> bool:
        return bool(self.manifest.get("hierarchy"))

    @functools.cached_property
    def hierarchy(self):
        """The nouns' hierarchy (novic.runtime.hierarchy.Hierarchy), verified and parsed once."""
        from novic.runtime.hierarchy import Hierarchy, HierarchyError

        entry = self.manifest.get("hierarchy")
        if not entry:
            raise BundleError(f"{self.path}: this bundle has no noun hierarchy (exported before novic had one, "
                              f"without a noun vocabulary, or on a machine without WordNet), which granularity and "
                              f"hierarchy-aware scoring need; re-export it with novic-export onnx where wordnet-base "
                              f"is installed")
        try:
            _file_ref(entry, self.path / MANIFEST, "hierarchy")
            path = self._verify_ref(FileRef(entry["file"], entry["sha256"], entry["size"]))
            return Hierarchy.load(path)
        except HierarchyError as exc:
            raise BundleError(str(exc)) from None

    def precisions(self, role: str, variant: str = "plain", pixels: str = FLOAT_PIXELS) -> list[str]:
        return [a.precision for a in self.artifacts if a.role == role and a.variant == variant and a.pixels == pixels]

    def has_u8(self, precision: str, variant: str = "plain") -> bool:
        """Whether the image encoder `precision`/`variant` has a uint8-input twin (novic.export.u8)."""
        return precision in self.precisions("image_encoder", variant, U8_PIXELS)

    def has_fused(self, precision: str, roles=ROLES) -> bool:
        """Whether every role in `roles` has a fused `precision` graph (one that passed its gate)."""
        return all(precision in self.precisions(role, "fused") for role in roles)

    def fused_precisions(self) -> list[str]:
        """Precisions with at least one fused graph (the encoder and the decoder are gated apart)."""
        return sorted({a.precision for a in self.artifacts if a.variant == "fused"})

    def artifact(self, role: str, precision: str = "fp32", variant: str = "plain",
                 pixels: str = FLOAT_PIXELS) -> Artifact:
        for a in self.artifacts:
            if a.role == role and a.precision == precision and a.variant == variant and a.pixels == pixels:
                return a
        have = ", ".join(f"{a.role}/{a.precision}" + (f" ({a.variant})" if a.variant != "plain" else "")
                         + (" (u8)" if a.pixels != FLOAT_PIXELS else "") for a in self.artifacts) or "none"
        if pixels != FLOAT_PIXELS:
            raise BundleError(f"{self.path / MANIFEST}: no {variant} {role} graph in {precision} taking {pixels} "
                              f"pixels (bundle has: {have}); re-export with novic-export onnx to get it, or load "
                              f"without u8=True")
        if variant != "plain":
            raise BundleError(f"{self.path / MANIFEST}: no {variant} {role} graph in {precision} (bundle has: "
                              f"{have}); re-export with novic-export onnx (fused variants are on by default)")
        fix = ("re-export without --no-fp16" if precision == "fp16" else
               f"make it with novic-export calib {self.path}" if role == "image_encoder" and precision in QUANTIZED
               else REEXPORT)
        raise BundleError(f"{self.path / MANIFEST}: no {role} graph in {precision} (bundle has: {have}); {fix}")

    def artifact_path(self, role: str, precision: str = "fp32", variant: str = "plain",
                      pixels: str = FLOAT_PIXELS) -> Path:
        """Path of the ONNX graph for `role`/`precision`/`variant`/`pixels`, hash-verified (with its
        external data)."""
        a = self.artifact(role, precision, variant, pixels)
        for ref in a.external_data:
            self._verify_ref(ref)
        return self._verify_ref(FileRef(a.file, a.sha256, a.size))

    def engines_for(self, role: str | None = None, compute_capability: str | None = None,
                    tensorrt_version: str | None = None) -> list[Engine]:
        return [e for e in self.engines
                if (role is None or e.role == role)
                and (compute_capability is None or e.compute_capability == compute_capability)
                and (tensorrt_version is None or e.tensorrt_version == tensorrt_version)]

    def engine_path(self, engine: Engine) -> Path:
        return self._verify_ref(FileRef(engine.file, engine.sha256, engine.size))

    def __repr__(self) -> str:
        roles = ", ".join(f"{a.role}/{a.precision}" + (f"/{a.variant}" if a.variant != "plain" else "")
                          + ("/u8" if a.pixels != FLOAT_PIXELS else "") for a in self.artifacts)
        return f"Bundle({str(self.path)!r}, {roles}, engines={len(self.engines)})"


# --- the optional verification cache ----------------------------------------------------------
def _verify_mode(verify) -> str:
    if verify is True or verify == "lazy":
        return "lazy"
    if verify is False or verify == "size":
        return "size"
    if verify in ("cached", "eager"):
        return verify
    raise ValueError(f"verify={verify!r}: use True, False, 'cached' or 'eager'")


def _cache_key(ref: FileRef, p: Path) -> dict:
    """What must be unchanged for a remembered hash to stand: the ctime and inode as well as the
    mtime, since a write can restore the mtime (os.utime, touch -d) but not the ctime."""
    st = p.stat()
    return {"sha256": ref.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino}


def _load_cache(root: Path) -> dict:
    try:
        data = json.loads((root / VERIFY_CACHE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _cache_hit(root: Path, ref: FileRef, p: Path) -> bool:
    return _load_cache(root).get(ref.file) == _cache_key(ref, p)


def _cache_store(root: Path, ref: FileRef, p: Path) -> None:
    """Best effort: a read-only bundle simply gets no cache."""
    cache = _load_cache(root)
    cache[ref.file] = _cache_key(ref, p)
    tmp = root / f"{VERIFY_CACHE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, root / VERIFY_CACHE)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
