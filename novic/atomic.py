"""Atomic file writes (torch-free): a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def atomic_path(path):
    """A temp file name next to `path`, for writers that take a name (safetensors' save_file):
    when the block ends without an error the file is fsynced and renamed over `path` (and the
    directory fsynced), else removed. The temp file is created first (exclusively), with mode
    0o666 minus the umask like any new file (mkstemp's 0o600 would make a bundle or checkpoint
    unreadable to the service user that loads it); the writer truncates it and keeps the mode."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:   # name the file the caller asked for, not our hidden temp file
        raise named(exc, path) from None
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)   # the file's data, whichever descriptor wrote it
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except OSError as exc:   # e.g. `path` is a directory: name it, not the temp file
            raise named(exc, path) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def open_atomic(path: Path):
    """`atomic_path`, opened for writing."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


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
    with open_atomic(path) as f:
        f.write(data)


def write_file_atomic(path, write) -> None:
    """`write(temp_name)` makes the file, which then replaces `path` like write_bytes_atomic: for
    writers that take a file name, with no in-memory copy of what they write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
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
        with open_atomic(dst) as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 24)
        src.unlink()
        return
    fsync_dir(dst.parent)
