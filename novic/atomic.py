"""Atomic file writes (torch-free): a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
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


def write_bytes_atomic(path, data) -> None:
    """Write to a temp file in the same directory, fsync, rename over `path`, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def move_file_atomic(src, dst) -> None:
    """Move `src` over `dst`: fsync it and rename (same file system), else copy to a temp file next
    to `dst`, fsync, rename and remove `src`. Either way `dst` is the old file or the whole new one."""
    src, dst = Path(src), Path(dst)
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.replace(src, dst)
    except OSError:   # another file system: copy
        import shutil

        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dst)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        src.unlink()
    fsync_dir(dst.parent)
