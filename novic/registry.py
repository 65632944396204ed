"""The released NOVIC models, their download, and the local model cache (torch-free).

    from novic.registry import ensure_bundle
    bundle_dir = ensure_bundle("ta4")   # download -> import -> export once; later calls: no network

Cache layout (``~/.cache/novic``, or ``$NOVIC_CACHE``):
    downloads/<release zip>            the original release files (resumable: ``<name>.part``)
    clip/<org>--<repo>/<weights file>  the CLIP model's open_clip weights
    checkpoints/<id>.safetensors       the imported decoder checkpoint
    bundles/<id>/                      the exported bundle (what novic-run loads)
    hashes.json                        size + sha256 of every file downloaded (recorded on first download)

Environment:
    NOVIC_CACHE          cache directory
    NOVIC_MODEL          default model id for novic-run (else ``ta4``)
    NOVIC_RELEASE_BASE   base URL of the release zips (mirrors, tests)
    NOVIC_CLIP_WEIGHTS   URL or local path of the open_clip weights file to use for the CLIP model
                         instead of the Hugging Face hub (air-gapped installs, tests)
    HF_ENDPOINT          Hugging Face hub endpoint (as for huggingface_hub)

Downloads (``download``) use urllib only: HTTP Range resume from a ``.part`` file (also across
runs), automatic retries when a connection drops, size and sha256 checks, a rich progress bar with
rate and ETA, and an atomic rename at the end. Without network, one error line says what could
not be fetched and how to go on with local files.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from novic.atomic import write_bytes_atomic
from novic.errors import NovicError
from novic.hub import ENV_OFFLINE, file_url, offline_by_env

RELEASE_BASE = "https://github.com/pallgeuer/novic/releases/download/v1.0.0/"
DEFAULT_MODEL = "ta4"
ENV_CACHE = "NOVIC_CACHE"
ENV_MODEL = "NOVIC_MODEL"
ENV_RELEASE_BASE = "NOVIC_RELEASE_BASE"
ENV_CLIP_WEIGHTS = "NOVIC_CLIP_WEIGHTS"
MANIFEST = "manifest.json"          # same name as novic.runtime.bundle.MANIFEST
HASHES = "hashes.json"
# open_clip looks for these in an hf-hub repo, safetensors first
CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_CHUNK = 1 << 16

# Hub ids of the released CLIP models -> open_clip's built-in model config and pretrained tag (the same
# model as 'hf-hub:<id>': the hub repo's open_clip_config.json is that config).
HUB_OPEN_CLIP = {
    "timm/ViT-B-16-SigLIP": ("ViT-B-16-SigLIP", "webli"),
    "timm/ViT-SO400M-14-SigLIP": ("ViT-SO400M-14-SigLIP", "webli"),
    "apple/DFN5B-CLIP-ViT-H-14-378": ("ViT-H-14-378-quickgelu", "dfn5b"),
}


class RegistryError(NovicError):
    """An unknown model id or a cache that cannot be used."""


class DownloadError(NovicError):
    """A file that could not be downloaded (offline, not found, corrupted)."""


class NotFoundError(DownloadError):
    """The server says the file does not exist (HTTP 404/410)."""


# --- the registry -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    id: str
    zip_name: str
    clip_hub: str                 # open_clip hub id of the CLIP model ('hf-hub:' + this)
    embed_dim: int                # F
    vocab: str                    # noun vocabulary
    description: str
    size: int | None = None       # bytes of the release zip (None: unknown, Content-Length is used)
    sha256: str | None = None     # None: unknown, recorded in hashes.json on first download

    @property
    def url(self) -> str:
        return release_base() + self.zip_name

    @property
    def open_clip_name(self) -> str:
        return HUB_OPEN_CLIP[self.clip_hub][0]

    @property
    def open_clip_tag(self) -> str:
        return HUB_OPEN_CLIP[self.clip_hub][1]

    @property
    def clip_weight_urls(self) -> list[str]:
        return [hf_file_url(self.clip_hub, f) for f in CLIP_WEIGHT_FILES]


MODELS: dict[str, ModelInfo] = {m.id: m for m in (
    ModelInfo("ta4", "vitb16_ft2_ta4_ovod_20240610_105233.zip", "timm/ViT-B-16-SigLIP", 768,
              "FT2 (11,897 nouns)", "SigLIP ViT-B/16, the lightest (default)"),
    ModelInfo("yb3", "so400m_ft2_yb3_ovod_20240626_001447.zip", "timm/ViT-SO400M-14-SigLIP", 1152,
              "FT2 (11,897 nouns)", "SigLIP SO400M/14, the most accurate open-vocabulary"),
    ModelInfo("ya2", "dfn5bl_ft2_ya2_ovod_20240620_162925.zip", "apple/DFN5B-CLIP-ViT-H-14-378", 1024,
              "FT2 (11,897 nouns)", "DFN5B CLIP ViT-H/14-378"),
    ModelInfo("ye2", "dfn5bl_ft0_ye2_ovod_20240628_142131.zip", "apple/DFN5B-CLIP-ViT-H-14-378", 1024,
              "FT0 (42,919 nouns)", "DFN5B CLIP ViT-H/14-378, the largest noun vocabulary"),
)}


def get_model(model_id: str) -> ModelInfo:
    key = (model_id or "").strip().lower()
    if key not in MODELS:
        raise RegistryError(f"unknown model {model_id!r}: choose one of {', '.join(MODELS)} "
                            f"(novic-import models lists them), or pass --bundle DIR")
    return MODELS[key]


def default_model_id() -> str:
    return os.environ.get(ENV_MODEL) or DEFAULT_MODEL


def release_base() -> str:
    base = os.environ.get(ENV_RELEASE_BASE) or RELEASE_BASE
    return base if base.endswith("/") else base + "/"


def hf_file_url(repo: str, filename: str) -> str:
    return file_url(repo, filename)


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "novic"


def paths(model_id: str, cache=None) -> dict[str, Path]:
    """Where the cache keeps the files of `model_id`."""
    info, root = get_model(model_id), cache_dir(cache)
    return {"zip": root / "downloads" / info.zip_name,
            "checkpoint": root / "checkpoints" / f"{info.id}.safetensors",
            "bundle": root / "bundles" / info.id}


# --- recorded hashes --------------------------------------------------------------------------------------
def _hashes_path(root: Path) -> Path:
    return root / HASHES


def recorded_hash(name: str, cache=None) -> dict | None:
    try:
        return json.loads(_hashes_path(cache_dir(cache)).read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None


def _record_hash(root: Path, name: str, url: str, size: int, sha256: str) -> None:
    path = _hashes_path(root)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[name] = {"url": url, "size": size, "sha256": sha256,
                  "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --- downloading ------------------------------------------------------------------------------------------
class _Dropped(Exception):
    """The connection ended before the whole file arrived (resume and retry)."""


def offline_hint(what: str, dest: Path | None = None) -> str:
    put = f"; or place the file at {dest}" if dest is not None else ""
    return (f"without network, use a bundle exported elsewhere (novic-run --bundle DIR), or import files "
            f"copied by hand as README \"Offline\" lists them: novic-import RELEASE.zip --out model.safetensors, "
            f"then novic-export onnx --checkpoint model.safetensors --pretrained open_clip_model.safetensors "
            f"--out DIR{put}")


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class _Bar:
    """A rich progress bar (bytes, rate, ETA) on stderr, or nothing."""

    def __init__(self, what: str, enabled: bool, console=None):
        self.what, self.enabled, self.console = what, enabled, console
        self.progress = self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(),
                                     console=self.console or Console(stderr=True), transient=False)
            self.progress.__enter__()
            self.task = self.progress.add_task(self.what, total=None)
        return self

    def start(self, total: int | None, completed: int):
        if self.progress is not None:
            self.progress.reset(self.task, total=total, completed=completed)

    def advance(self, n: int):
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _fetch(url: str, part: Path, bar: _Bar, timeout: float, size: int | None, what: str, dest: Path) -> int | None:
    """One HTTP request appending to `part` (Range from its current size). Returns the total size if
    known. Raises _Dropped if the connection ends early, DownloadError for permanent problems."""
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    headers = {"User-Agent": "novic-downloader", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:   # nothing left to send: the part may already be whole
            total = _content_range_total(e.headers.get("Content-Range"))
            if total == have or (total is None and size == have):
                return have
            part.unlink()
            raise _Dropped(f"server refused to resume at {have} bytes (HTTP 416)") from None
        if e.code in (404, 410):
            raise NotFoundError(f"cannot download {what}: {url} does not exist (HTTP {e.code}); "
                                f"{offline_hint(what, dest)}") from None
        if e.code >= 500 or e.code in (408, 429):
            raise _Dropped(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"cannot download {what} from {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {what}: {url} is unreachable ({reason}); "
                            f"{offline_hint(what, dest)}") from None
    with resp:
        if have and resp.status == 206:
            start = have
            cr = resp.headers.get("Content-Range") or ""
            m = re.match(r"bytes\s+(\d+)-", cr)
            if m and int(m.group(1)) != have:
                raise DownloadError(f"cannot resume {what}: the server sent bytes from {m.group(1)}, not {have}")
            total = _content_range_total(cr)
        else:
            start = 0   # a full response (the server ignored Range, or a fresh start)
            total = None
        length = resp.headers.get("Content-Length")
        if total is None and length is not None:
            total = start + int(length)
        if size is not None and total is not None and total != size:
            raise DownloadError(f"{what} at {url} is {total} bytes, expected {size}: the file on the server "
                                f"differs from the released one; not downloading it")
        bar.start(total, start)
        got = start
        with open(part, "ab" if start else "wb") as f:
            while True:
                try:
                    block = resp.read(_CHUNK)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as e:
                    f.flush()
                    raise _Dropped(f"connection lost at {got} bytes ({type(e).__name__})") from None
                if not block:
                    break
                f.write(block)
                got += len(block)
                bar.advance(len(block))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and got < total:
        raise _Dropped(f"connection closed at {got} of {total} bytes")
    return total if total is not None else got


def download(url: str, dest: str | os.PathLike, *, size: int | None = None, sha256: str | None = None,
             what: str | None = None, progress: bool | None = None, retries: int = 4, timeout: float = 60.0,
             console=None, record: bool = True, cache=None) -> Path:
    """Download `url` to `dest` (atomically, via `dest.part`, resuming a previous partial download).

    `size`/`sha256`: expected values (None: unknown; then the size comes from Content-Length, and the
    sha256 of the first download is recorded in the cache's hashes.json and checked on later downloads
    of the same file name). A dropped connection is resumed up to `retries` times; a corrupted file is
    deleted and reported. `progress`: a rich progress bar on stderr (default: on for a terminal).
    `record`: keep size + sha256 in hashes.json of the cache (`cache`, default cache_dir())."""
    dest = Path(dest)
    what = what or dest.name
    root = cache_dir(cache)
    if sha256 is None and record:
        rec = recorded_hash(dest.name, root)
        if rec and rec.get("url") == url:
            sha256 = rec.get("sha256")
            size = size if size is not None else rec.get("size")
    if dest.is_file():
        ok = (size is None or dest.stat().st_size == size) and (sha256 is None or sha256_of(dest) == sha256)
        if ok:
            return dest
        dest.unlink()   # a damaged earlier download
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if progress is None:
        progress = (console.is_terminal if console is not None
                    else bool(getattr(sys.stderr, "isatty", lambda: False)()))
    failures = 0
    with _Bar(what, progress, console) as bar:
        while True:
            try:
                total = _fetch(url, part, bar, timeout, size, what, dest)
                break
            except _Dropped as e:
                failures += 1
                if failures > retries:
                    kept = part.stat().st_size if part.is_file() else 0
                    raise DownloadError(f"download of {what} from {url} failed {failures} times ({e}); "
                                        f"{_human(kept)} kept in {part}: run again to resume") from None
                time.sleep(min(0.25 * 2 ** (failures - 1), 5.0))
    got = part.stat().st_size
    if (size is not None and got != size) or (total is not None and got != total):
        part.unlink()
        raise DownloadError(f"downloaded {what} has {got} bytes, expected {size or total}: deleted, run again")
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise DownloadError(f"downloaded {what} is corrupted (sha256 {digest[:16]}..., expected "
                            f"{sha256[:16]}...): deleted it, run again to re-download (or check the mirror "
                            f"{url})")
    os.replace(part, dest)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if record:
        _record_hash(root, dest.name, url, got, digest)
    return dest


def download_first(urls: list[str], dest_dir: Path, **kwargs) -> Path:
    """Try each URL in turn (named after its file); the first one that exists wins."""
    last = None
    for url in urls:
        dest = dest_dir / url.rsplit("/", 1)[-1]
        if dest.is_file():
            return download(url, dest, **kwargs)
    for url in urls:
        try:
            return download(url, dest_dir / url.rsplit("/", 1)[-1], **kwargs)
        except NotFoundError as e:
            last = e
    raise last if last is not None else DownloadError("no URL to download from")


# --- the cache: release zip -> checkpoint -> bundle ------------------------------------------------------
@contextlib.contextmanager
def _lock(root: Path, name: str):
    """One process at a time prepares a model (others wait, then find it cached)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:   # not POSIX: no lock
        yield
        return
    with open(root / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_release(model_id: str, cache=None, *, progress=None, console=None) -> Path:
    """The release zip of `model_id` in the cache (downloaded if missing)."""
    info = get_model(model_id)
    return download(info.url, paths(info.id, cache)["zip"], size=info.size, sha256=info.sha256,
                    what=f"{info.id} release ({info.zip_name})", progress=progress, console=console, cache=cache)


def fetch_clip_weights(hub_id: str, cache=None, *, progress=None, console=None) -> Path:
    """The open_clip weights file of a hub CLIP model, or $NOVIC_CLIP_WEIGHTS (URL or local path)."""
    root = cache_dir(cache)
    override = os.environ.get(ENV_CLIP_WEIGHTS)
    if override:
        if re.match(r"^(https?|file)://", override):
            name = override.rstrip("/").rsplit("/", 1)[-1] or "weights"
            tag = hashlib.sha1(override.encode()).hexdigest()[:10]
            return download(override, root / "clip" / f"override-{tag}" / name, what=f"CLIP weights ({name})",
                            progress=progress, console=console, cache=cache)
        path = Path(override).expanduser()
        if not path.is_file():
            raise DownloadError(f"{ENV_CLIP_WEIGHTS}={override} is not a file or URL")
        return path
    repo_dir = root / "clip" / hub_id.replace("/", "--")
    if offline_by_env() and not any((repo_dir / f).is_file() for f in CLIP_WEIGHT_FILES):
        raise DownloadError(f"the CLIP weights of {hub_id} are not in the cache and {ENV_OFFLINE}=1: download "
                            f"{hf_file_url(hub_id, CLIP_WEIGHT_FILES[0])} elsewhere and set "
                            f"{ENV_CLIP_WEIGHTS}=PATH/{CLIP_WEIGHT_FILES[0]}; {offline_hint('them')}")
    try:
        return download_first([hf_file_url(hub_id, f) for f in CLIP_WEIGHT_FILES], repo_dir,
                              what=f"CLIP weights of {hub_id}", progress=progress, console=console, cache=cache)
    except NotFoundError:
        raise DownloadError(f"{hub_id} on the Hugging Face hub has none of {list(CLIP_WEIGHT_FILES)}; set "
                            f"{ENV_CLIP_WEIGHTS} to a local open_clip weights file") from None


def is_cached(model_id: str, cache=None) -> bool:
    return (paths(model_id, cache)["bundle"] / MANIFEST).is_file()


def _say(console, text: str) -> None:
    if console is None:
        from rich.console import Console
        console = Console(stderr=True)
    console.print(text, highlight=False, soft_wrap=True)


def ensure_bundle(model_id: str | None = None, *, cache=None, console=None, progress: bool | None = None,
                  engines: bool | None = None, force: bool = False) -> Path:
    """The cached bundle directory of a released model, made on first use: download the release zip ->
    import it (novic.model.importer) -> fetch the CLIP weights -> export (novic.export.bundle) -> and
    TensorRT engines when TensorRT and a GPU are present (`engines`: None = if available, True = must,
    False = never). Later calls return the cached bundle without network or torch."""
    info = get_model(model_id or default_model_id())
    where = paths(info.id, cache)
    bundle_dir = where["bundle"]
    if (bundle_dir / MANIFEST).is_file() and not force:
        return bundle_dir
    root = cache_dir(cache)
    with _lock(root, info.id):
        if (bundle_dir / MANIFEST).is_file() and not force:
            return bundle_dir   # another process made it while we waited
        try:   # before downloading anything: preparing a model needs the export tools
            import onnx  # noqa: F401
            import open_clip  # noqa: F401

            from novic.export.bundle import export_bundle
            from novic.model.checkpoint import load_checkpoint
            from novic.model.importer import import_checkpoint, summary
        except ImportError as e:
            raise RegistryError(f"model {info.id} is not in the cache ({bundle_dir}) and preparing it needs the "
                                f"export tools ({e}): pip install 'novic[export]', or use a bundle exported "
                                f"elsewhere (novic-run --bundle DIR)") from None
        _say(console, f"novic: preparing model {info.id} ({info.description}) in {root}; this happens once")
        ckpt_path = where["checkpoint"]
        if force or not ckpt_path.is_file():
            zip_path = fetch_release(info.id, cache, progress=progress, console=console)
            result = import_checkpoint(zip_path, ckpt_path)
            _say(console, f"novic: imported {summary(result)}")
            for w in result.warnings:
                _say(console, f"[yellow]warning:[/] {w}")

        spec = load_checkpoint(ckpt_path).embedder
        hub = spec.model[len("hf-hub:"):] if spec.model.startswith("hf-hub:") else None
        weights = fetch_clip_weights(hub or info.clip_hub, cache, progress=progress, console=console)
        if hub is not None:
            if hub not in HUB_OPEN_CLIP:
                raise RegistryError(f"{info.id}: CLIP model {hub} has no known open_clip config")
            clip = HUB_OPEN_CLIP[hub][0]
        else:
            clip = None   # keep the checkpoint's own model (and config file), with these weights
        export_bundle(ckpt_path, bundle_dir, clip=clip, pretrained=str(weights), overwrite=True,
                      console=console)
        if engines is not False:
            _build_engines(bundle_dir, required=bool(engines), console=console)
    return bundle_dir


def _build_engines(bundle_dir: Path, required: bool, console) -> None:
    try:
        from novic.export.tensorrt import TensorRTMissing, build_engines
    except ImportError:
        if required:
            raise
        return
    try:
        build_engines(bundle_dir, console=console)
    except TensorRTMissing:
        if required:
            raise
    except NovicError as e:
        if required:
            raise
        _say(console, f"[yellow]warning:[/] TensorRT engines were not built ({e}); the bundle runs with "
                      f"onnxruntime (novic-export trt {bundle_dir} to retry)")


def default_bundle(model_id: str | None = None, *, console=None) -> Path:
    """Hook for `novic-run` without --bundle: the cached bundle of `model_id` (default $NOVIC_MODEL or
    ta4), prepared on first use."""
    return ensure_bundle(model_id, console=console)


def list_models(cache=None) -> list[dict]:
    """The registry and what the cache holds for each model."""
    rows = []
    for info in MODELS.values():
        where = paths(info.id, cache)
        zip_path = where["zip"]
        part = zip_path.with_name(zip_path.name + ".part")
        rows.append({
            "id": info.id, "default": info.id == default_model_id(), "clip": info.clip_hub,
            "embed_dim": info.embed_dim, "vocab": info.vocab, "description": info.description,
            "url": info.url,
            "zip": zip_path.stat().st_size if zip_path.is_file() else None,
            "partial": part.stat().st_size if part.is_file() else None,
            "checkpoint": where["checkpoint"].is_file(),
            "bundle": str(where["bundle"]) if (where["bundle"] / MANIFEST).is_file() else None,
        })
    return rows


__all__ = ["MODELS", "ModelInfo", "DEFAULT_MODEL", "HUB_OPEN_CLIP", "RegistryError", "DownloadError",
           "NotFoundError", "get_model", "cache_dir", "paths", "download", "fetch_release", "fetch_clip_weights",
           "ensure_bundle", "default_bundle", "list_models", "is_cached", "recorded_hash"]
