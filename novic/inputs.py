"""Image inputs as users name them: files, directories, glob patterns and '-' (standard input)
-> the image files they mean. Shared by novic-run, novic-label and novic-eval; standard library
only, so that Ray workers and a runtime-only install use it without the CLI's packages."""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

# What a directory's image files end with (any case); a file named on its own may end with anything.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".heic", ".heif", ".jp2"})
GLOB_CHARS = frozenset("*?[")


def image_files(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """The image files in `folder` (and, if `recursive`, below it), sorted."""
    folder = Path(folder)
    walker = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(str(p) for p in walker if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def expand_inputs(args: list[str], recursive: bool = False) -> tuple[list, list[str]]:
    """Files, directories and globs -> (inputs in order, one error line per argument that matched
    nothing). Missing files are kept as inputs: they fail per file with a clear line. '-' is one
    image on standard input (a file object)."""
    inputs, problems, seen = [], [], set()

    def add(item):
        key = os.path.abspath(item) if isinstance(item, str) else id(item)
        if key not in seen:
            seen.add(key)
            inputs.append(item)

    def add_dir(d: Path):
        found = image_files(d, recursive)
        if not found:
            subdirs = not recursive and any(p.is_dir() for p in d.iterdir())
            problems.append(f"{d}: directory has no image files" + (" (use --recursive for its subdirectories)"
                                                                     if subdirs else ""))
        for f in found:
            add(f)

    stdin = None
    for arg in args:
        if arg == "-":   # standard input holds one image: a second '-' would read nothing
            if stdin is None:
                stdin = _Stdin()
                add(stdin)
            continue
        p = Path(arg)
        if p.is_dir():
            add_dir(p)
        elif p.exists() or not (GLOB_CHARS & set(arg)):
            add(arg)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            for m in matches:
                if os.path.isdir(m):
                    add_dir(Path(m))
            if not matches:
                problems.append(f"{arg}: no files match this pattern")
            for f in files:
                add(f)
    return inputs, problems


class _Stdin:
    """'-': the image bytes on standard input (read when the batch is loaded)."""

    name = "<stdin>"

    def read(self, *args):
        return sys.stdin.buffer.read(*args)
