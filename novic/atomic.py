"""Atomic file writes (torch-free): a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from novic.errors import NovicError

# How a full disk shows up: an OSError's errno, or the text of a writer's own error type
# (safetensors raises SafetensorError("... No space left on device (os error 28) ..."), not OSError).
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|StorageFull|QuotaExceeded|"
                        r"os error (28|122)\b|code: (28|122)\b")


class DiskFullError(NovicError):
    """A write that ran out of disk space (the file it was replacing is left as it was)."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _FULL_ERRNOS
    return bool(_FULL_TEXT.search(str(exc)))


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def disk_full(path, needed: int | None = None) -> DiskFullError:
    """The one-line error for `path` that did not fit: how much it needs and how much is free."""
    where = Path(path).absolute().parent
    try:
        free = _size(shutil.disk_usage(where).free)
    except OSError:
        free = "unknown"
    need = f"it needs about {_size(needed)}, " if needed is not None else ""
    return DiskFullError(f"cannot write {path}: no space left on device ({need}{free} free in {where}); "
                         f"free some space or write it elsewhere (the previous file, if any, is unchanged)")


def fsync_dir(path) -> None:
    """Make a rename inside `path` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def named(exc: OSError, path) -> OSError:
    """`exc` about `path` (the file the user gave) instead of the temp file it hit; as is if it
    carries no errno (nothing to rebuild it from)."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))


def fsync_file(path) -> None:
    """Make a file's data durable, whichever descriptor wrote it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path, keep_suffix: bool = False) -> Path:
    """A hidden, unpredictable name next to `path`: `.NAME.HEX.tmp` (what a crashed run leaves, and
    what cleanups glob for), plus the target's suffix for writers that take a name (np.save, for
    one, appends .npy to a name without it)."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix if keep_suffix else ''}"


@contextmanager
def open_atomic(path: Path, size: int | None = None):
    """A temp file next to `path`, open for writing; when the block ends without an error it is
    fsynced and renamed over `path` (and the directory fsynced), else removed.
    Created exclusively with mode 0o666 minus the umask, like any new file (mkstemp's 0o600 would
    make a bundle or checkpoint unreadable to the service user that loads it), and written through
    that descriptor (so a umask without owner-write still works). `size`: the bytes to be
    written, for the error if the disk fills up (DiskFullError)."""
    tmp = _temp_name(Path(path))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:   # name the file the caller asked for, not our hidden temp file
        raise named(exc, path) from None
    with _replacing(tmp, path, size):
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def new_file_mode(directory) -> int:
    """The permission bits a new file gets in `directory`: 0o666 minus the umask (and whatever a
    default ACL takes away), read from a probe file, since reading the umask means changing it,
    which is not thread-safe."""
    probe = _temp_name(Path(directory) / "mode")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.unlink(probe)


@contextmanager
def atomic_path(path, size: int | None = None):
    """A temp file name next to `path` (not created yet), for writers that take a name
    (safetensors' save_file): when the block ends without an error the file they made is fsynced,
    given the mode of a normal new file (safetensors creates its files 0o600, which a service
    user could not read) and renamed over `path` (and the directory fsynced), else removed.
    `size` as for open_atomic."""
    path = Path(path)
    tmp = _temp_name(path, keep_suffix=True)
    with _replacing(tmp, path, size):
        yield tmp
        try:
            fsync_file(tmp)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "the writer made no file", str(path)) from None
        os.chmod(tmp, new_file_mode(path.parent))


@contextmanager
def _replacing(tmp: Path, path, size: int | None = None):
    """Rename `tmp` over `path` after the block (fsyncing the directory), or remove it on an error;
    a full disk (whichever writer hit it) becomes one DiskFullError line about `path`."""
    try:
        yield
        try:
            os.replace(tmp, path)
        except OSError as exc:   # e.g. `path` is a directory: name it, not the temp file
            raise named(exc, path) from None
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full(path, size) from None   # after the unlink: the free space is real
        raise
    fsync_dir(Path(path).parent)


def check_writable_dir(directory) -> None:
    """Raise the OSError that creating a file in `directory` (or, if it does not exist yet, in its
    nearest existing parent, where it would be made) would raise: checked before long work, so that
    an unwritable output fails at once. A real probe (a temp file), not os.access, which root and
    read-only mounts fool."""
    directory = Path(directory).absolute()
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(probe))
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise named(exc, directory) from None


def check_writable_file(path) -> None:
    """`check_writable_dir` for a file about to be written; a directory at `path` is refused."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory (give a file name)", str(path))
    check_writable_dir(path.parent)


def write_bytes_atomic(path, data) -> None:
    """Write to a temp file in the same directory, fsync, rename over `path`, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_atomic(path, len(data)) as f:
        f.write(data)


def write_file_atomic(path, write, size: int | None = None) -> None:
    """`write(temp_name)` makes the file, which then replaces `path` like write_bytes_atomic: for
    writers that take a file name, with no in-memory copy of what they write. `size`: about how
    many bytes it writes (named if the disk fills up)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, size) as tmp:
        write(str(tmp))


def write_json_atomic(path, data, dumps=None) -> None:
    """`data` as JSON (indented, or by `dumps`; one trailing newline), written like write_bytes_atomic."""
    text = dumps(data) if dumps is not None else json.dumps(data, indent=1)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def move_file_atomic(src, dst) -> None:
    """Move `src` over `dst`: fsync it and rename (same file system), else copy to a temp file next
    to `dst`, fsync, rename and remove `src`. Either way `dst` is the old file or the whole new one."""
    src, dst = Path(src), Path(dst)
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.replace(src, dst)
    except OSError:   # another file system: copy
        with open_atomic(dst, src.stat().st_size) as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 24)
        src.unlink()
        return
    fsync_dir(dst.parent)


def move_written_files(scratch, directory, last: str) -> list[str]:
    """Move the files a writer made in `scratch` (a folder on the same file system) into
    `directory`, `last` after the others (an ONNX graph after its weight files, so that the
    graph never names weights that are not there yet), each given a normal new file's mode:
    onnx writes external weight files 0o600, which a service user could not read. Returns
    the new paths, in that order."""
    mode = new_file_mode(directory)
    files = sorted(Path(scratch).iterdir(), key=lambda p: p.name == last)
    for f in files:
        os.chmod(f, mode)
        os.replace(f, Path(directory) / f.name)
    return [str(Path(directory) / f.name) for f in files]
