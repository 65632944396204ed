"""Calibration images -> preprocessed pixels, split into a calibration and a held-out set.

Sources, in order of preference:
- a folder the user gives (their domain): every image file below it, paths sorted, then a seeded
  choice of ``n_calib + n_heldout`` of them (deterministic for a given folder and seed);
- the built-in fallback: scikit-image's free sample photos (astronaut, chelsea, coffee, rocket,
  camera, ...) expanded with deterministic crops and flips; if scikit-image is missing, simple
  procedural images (gradients, checkerboards, smooth noise) stand in, with a warning.

Pixels come from the runtime's own ``Preprocessor`` with the bundle's preprocessing, so the
calibration sees exactly what the deployed encoder sees. Loading shows a rich progress bar.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from novic.errors import NovicError
from novic.inputs import IMAGE_SUFFIXES   # the suffixes novic-run reads in a folder

# scikit-image sample images shipped inside the wheel (no download); grey ones are made RGB.
SKIMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "coins", "moon", "page",
                 "text", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                 "retina", "colorwheel", "logo", "clock", "horse")
# (left, top, right, bottom) fractions of the image, each also used mirrored.
CROPS = ((0.0, 0.0, 1.0, 1.0), (0.15, 0.15, 0.85, 0.85), (0.0, 0.0, 0.6, 0.6), (0.4, 0.0, 1.0, 0.6),
         (0.0, 0.4, 0.6, 1.0), (0.4, 0.4, 1.0, 1.0), (0.25, 0.0, 0.75, 0.5), (0.1, 0.3, 0.9, 0.9))


class CalibDataError(NovicError):
    """No usable calibration images."""


@dataclass
class CalibrationSet:
    calib: np.ndarray                # f32 [N, 3, H, W], preprocessed
    heldout: np.ndarray              # f32 [M, 3, H, W], preprocessed, disjoint from calib
    calib_names: list[str] = field(default_factory=list)
    heldout_names: list[str] = field(default_factory=list)
    source: str = ""                 # "folder DIR" / "built-in (scikit-image)" / "built-in (procedural)"
    skipped: list[str] = field(default_factory=list)   # unreadable files, with the reason

    def save_npy(self, path) -> Path:
        """Calibration pixels as one .npy (f32 [N,3,H,W]): the input format of NVIDIA ModelOpt's
        ONNX PTQ (``python -m modelopt.onnx.quantization --calibration_data FILE``)."""
        path = Path(path)
        np.save(path, np.ascontiguousarray(self.calib, dtype=np.float32))
        return path

    def summary(self) -> str:
        extra = f", {len(self.skipped)} unreadable skipped" if self.skipped else ""
        return f"{len(self.calib)} calibration + {len(self.heldout)} held-out images from {self.source}{extra}"


# ---- sources ------------------------------------------------------------------------------------
def folder_images(folder) -> list[Path]:
    """Image files below `folder` (recursive), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise CalibDataError(f"{root}: calibration image folder not found; pass --images DIR with "
                             f"JPEG/PNG files of your domain, or leave it out for the built-in set")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise CalibDataError(f"{root}: no image files (.jpg, .png, .webp, ... as novic-run reads) in the folder; "
                             f"add images of your domain or leave --images out for the built-in set")
    return files


@functools.lru_cache(maxsize=1)
def _base_photos() -> tuple[list[tuple[str, Any]], str]:
    from PIL import Image

    try:
        from skimage import data as skdata
    except ImportError:
        skdata = None
    out = []
    if skdata is not None:
        for name in SKIMAGE_NAMES:
            try:
                arr = np.asarray(getattr(skdata, name)())
            except Exception:  # noqa: BLE001 - a sample that needs a download, or a missing one
                continue
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            if arr.dtype != np.uint8:
                arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            out.append((name, img.convert("RGB")))
        if out:
            return out, "built-in (scikit-image sample photos)"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
    for i in range(12):  # procedural stand-ins: gradients, checkerboards, smooth noise
        c = rng.random((3, 3)).astype(np.float32)
        chans = [c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * ((xx * (i + 2)).astype(int) + (yy * (i + 2)).astype(int)) % 2
                 for k in range(3)]
        noise = rng.random((16, 16, 3)).astype(np.float32)
        noise = np.kron(noise, np.ones((16, 16, 1), np.float32))
        arr = np.clip((np.stack(chans, -1) / 3.0 + 0.5 * noise) * 255, 0, 255).astype(np.uint8)
        out.append((f"procedural{i}", Image.fromarray(arr)))
    return out, "built-in (procedural images; install scikit-image for real photos)"


def builtin_images() -> tuple[list[tuple[str, Any]], str]:
    """Deterministic list of (name, RGB PIL image): each base photo under CROPS, plain and mirrored."""
    from PIL import Image

    bases, source = _base_photos()   # cached: PIL images, only read (crop/transpose copy)
    out = []
    for name, img in bases:
        w, h = img.size
        for k, (l, t, r, b) in enumerate(CROPS):
            crop = img.crop((int(l * w), int(t * h), int(r * w), int(b * h)))
            out.append((f"{name}/crop{k}", crop))
            out.append((f"{name}/crop{k}/flip", crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    return out, source


# ---- the set --------------------------------------------------------------------------------------
def _progress(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.progress import TextColumn as _T

    class TransferSpeedColumn(_T):  # images per second
        def __init__(self):
            super().__init__("")

        def render(self, task):
            from rich.text import Text
            return Text(f"{task.speed:.1f} img/s" if task.speed else "")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def _list_name(source: Any, i: int) -> str:
    """What a calibration list entry is called in messages: its path, a PIL image's file name, or
    its position."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "filename", "") or f"image{i}")


def calibration_set(preprocess, images=None, *, n_calib: int = 64, n_heldout: int = 40, seed: int = 0,
                    console=None) -> CalibrationSet:
    """Load and preprocess calibration + held-out images (see module doc).

    `preprocess`: a bundle's preprocessing dict (``Bundle.preprocess``) or a ``Preprocessor``.
    `images`: a folder, a list of sources (paths / PIL images), or None for the built-in set.
    The draw is a seeded permutation of the sorted sources: the first `n_calib` calibrate, the next
    `n_heldout` are held out. With fewer sources than asked for, both shrink proportionally."""
    from rich.console import Console

    from novic.runtime.images import ImageError
    from novic.runtime.preprocess import Preprocessor

    if n_calib < 1 or n_heldout < 1:
        raise CalibDataError(f"need at least one calibration and one held-out image (got {n_calib}, {n_heldout})")
    pre = preprocess if isinstance(preprocess, Preprocessor) else Preprocessor(preprocess, threads=1)
    if images is None:
        items, source = builtin_images()
    elif isinstance(images, (str, Path)):
        paths = folder_images(images)
        items, source = [(p.relative_to(Path(images)).as_posix(), p) for p in paths], f"folder {images}"
    else:
        items, source = [(_list_name(s, i), s) for i, s in enumerate(images)], "list"
    if len(items) < 2:
        raise CalibDataError(f"{source}: {len(items)} image(s); need at least 2 (calibration + held-out)")
    want = n_calib + n_heldout
    order = np.random.default_rng(seed).permutation(len(items))
    console = console or Console(stderr=True)
    if len(items) < want:   # shrink both, keep at least one held out
        n_heldout = max(1, round(len(items) * n_heldout / want))
        n_calib = len(items) - n_heldout
        console.print(f"{source}: {len(items)} images, fewer than the {want} asked for: using {n_calib} for "
                      f"calibration and {n_heldout} held out", highlight=False, markup=False)
    chosen = [items[i] for i in order]
    pixels, names, skipped = [], [], []
    with _progress(console) as progress:
        task = progress.add_task("calibration images", total=n_calib + n_heldout)
        for name, src in chosen:
            if len(pixels) == n_calib + n_heldout:
                break
            try:
                pixels.append(pre(src))
                names.append(name)
            except ImageError as exc:   # its message starts with its own name for the source: use ours
                skipped.append(f"{name}: {exc.problem}; {exc.fix}")
                continue
            except Exception as exc:  # noqa: BLE001 - one bad file does not stop calibration
                skipped.append(f"{name}: {exc or type(exc).__name__}")
                continue
            progress.advance(task)
    if len(pixels) < 2:
        raise CalibDataError(f"{source}: fewer than 2 readable images ({len(skipped)} unreadable, first: "
                             f"{skipped[0] if skipped else '-'}); add readable JPEG/PNG files")
    n_c = min(n_calib, len(pixels) - 1)
    arr = np.stack(pixels).astype(np.float32)
    return CalibrationSet(arr[:n_c], arr[n_c:], names[:n_c], names[n_c:], source, skipped)
