"""Load images from anything a service hands us and turn them into 8-bit RGB PIL images.

Accepted inputs (`load_image`):
- a path (`str` or `os.PathLike`) to an image file;
- `bytes` / `bytearray` / `memoryview` holding an encoded image (JPEG, PNG, GIF, WebP, ...);
- a binary file object (anything with `.read()`);
- a `PIL.Image.Image`;
- a numpy array: `HxW` (grayscale), `HxWx1`, `HxWx3` (RGB) or `HxWx4` (RGBA), of dtype uint8,
  uint16 (full 16-bit range) or float (values in [0, 1]).

Conversion rules (documented policy; open_clip itself only calls `.convert('RGB')`):
- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so a phone photo stored sideways
  is classified upright. open_clip does NOT do this; for photos without an orientation tag
  (or with orientation 1) the result is identical.
- Grayscale ('L', '1'), palette ('P', including palette transparency), 'LA', 'RGBA', 'CMYK',
  'YCbCr', ... become RGB through Pillow's `.convert('RGB')`, exactly as open_clip does: the alpha
  channel is DROPPED (transparent pixels show their stored colour; there is no compositing on white),
  CMYK uses Pillow's ICC-free conversion, ICC profiles are ignored.
- 16-bit and 32-bit integer images ('I;16*', 'I') are rescaled to 8 bits (value / 257, i.e.
  65535 -> 255; 'I' images whose values all fit 0..255 are taken as 8-bit). open_clip's
  `.convert('RGB')` would clip every value above 255 to white, so this is a deliberate deviation.
  Float ('F') images are taken as [0, 1] when their values fit, else as 0..255, clipped.
- Animated images (GIF, APNG, WebP) read from a file or bytes: the first frame. A PIL image you
  pass yourself is used at the frame it is on.
- Conversion happens BEFORE resizing (open_clip resizes in the source mode and converts after). For
  RGB and grayscale inputs (every JPEG photo) this is bit-identical; palette and RGBA images differ
  slightly at edges (open_clip resizes palette images with nearest neighbour).

Fast JPEG decoding (opt-in, `draft=(w, h)`): a JPEG file or bytes may be decoded at 1/2, 1/4 or
1/8 scale by libjpeg's DCT scaling (Pillow's `Image.draft`), as long as both sides stay at least
`draft`. A 12-megapixel photo then decodes several times faster, at the price of pixels that
differ slightly from a full decode + resize (docs/benchmarks.md, "Fast JPEG decoding"). Other
formats, PIL images and arrays are unaffected.

Errors: every failure raises `ImageError` (a `NovicError`) whose message is one line that names the
input and says what to do: missing file, directory, 0-byte file, a file that is not an image (a text
file named .jpg), truncated or corrupt data, and images above Pillow's decompression-bomb limit
(`PIL.Image.MAX_IMAGE_PIXELS`, about 89 M pixels: Pillow warns above it and refuses above twice it;
we surface the refusal as `ImageError` and leave the warning to Python's warnings machinery).
Huge but allowed images load; the preprocessing never materialises a huge intermediate.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from novic.errors import NovicError, first_line, option

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, Any]

_ORIENTATION = 0x0112  # EXIF tag

__all__ = ["ImageError", "ImageInput", "describe", "load_image", "to_rgb"]


class ImageError(NovicError):
    """One input could not be turned into an image; the message is one line."""

    def __init__(self, source: str, problem: str, fix: str):
        self.source, self.problem, self.fix = source, problem, fix
        super().__init__(f"{source}: {problem}; {fix}")


def bomb_fix() -> str:
    return ("downscale it, or if you trust it raise the limit ("
            + option("PIL.Image.MAX_IMAGE_PIXELS", "novic-run --max-pixels N") + ")")


def describe(source: Any) -> str:
    """A short, printable name for an input (used in results and error lines)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes len={len(source)}>"
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or ""
        return name or f"<PIL {source.mode} {source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {'x'.join(map(str, source.shape))}>"
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return name
    return f"<{type(source).__name__}>"


def load_image(source: ImageInput, *, name: str | None = None,
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode/convert `source` into a fully loaded 8-bit RGB PIL image (see module docstring).
    draft: (width, height) a JPEG may be decoded down to (fast decoding; None = full size)."""
    name = name or describe(source)
    if isinstance(source, Image.Image):
        return _load_pil(source, name)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(os.fspath(source), name, draft)
    if isinstance(source, io.TextIOBase):   # read() would fail decoding the image as text
        raise ImageError(name, "file object opened in text mode", "open the image with mode 'rb'")
    if hasattr(source, "read"):   # a file object (or stdin): its bytes, so that empty input is named as such
        source = source.read()
        if isinstance(source, str):
            raise ImageError(name, "file object returned text, not bytes", "open the image with mode 'rb'")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(name, "empty data (0 bytes)", "pass the encoded image file contents")
        return _decode(io.BytesIO(data), name, draft)
    if hasattr(source, "__array__"):
        return _from_array(np.asarray(source), name)
    raise ImageError(name, f"unsupported input type {type(source).__name__}",
                     "pass a path, bytes, a binary file object, a PIL image or a numpy array")


def _from_path(text, name: str, draft: tuple[int, int] | None = None) -> Image.Image:
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        raise ImageError(name, "URLs are not supported", "download the image and pass the file or its bytes")
    path = Path(os.fsdecode(text))
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(name, "no such file", "check the path") from None
    except OSError as exc:
        raise ImageError(name, f"cannot access file ({exc.strerror or exc})", "check the path and its permissions") from None
    if path.is_dir():
        raise ImageError(name, "is a directory", "pass the image files inside it (novic-run expands directories)")
    if size == 0:
        raise ImageError(name, "empty file (0 bytes)", "re-copy or re-export the image")
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ImageError(name, f"cannot open file ({exc.strerror or exc})", "check its permissions") from None
    with handle:
        return _decode(handle, name, draft)


def _decode(handle, name: str, draft: tuple[int, int] | None = None) -> Image.Image:
    try:
        image = Image.open(handle)
        if draft is not None:   # JPEG only (a no-op for other formats); keeps the mode, scales
            _try_draft(image, draft)
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"image too large ({first_line(exc)})",
                         bomb_fix()) from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image file Pillow can read (unknown or corrupt header)",
                         "check that it really is a JPEG/PNG/GIF/WebP/... file and re-export it") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read image ({first_line(exc)})", "re-export the image") from None
    try:
        result = _load_pil(image, name)
    except BaseException:
        image.close()
        raise
    if result is not image:
        image.close()
    elif getattr(image, "is_animated", False):
        result = image.copy()  # detach the first frame from the file we are about to close
        image.close()
    return result


def _try_draft(image: Image.Image, size: tuple[int, int]) -> None:
    try:
        image.draft(image.mode, size)
    except Exception:  # noqa: BLE001 - only a speed-up: decode at full size instead
        pass


def _load_pil(image: Image.Image, name: str) -> Image.Image:
    """Decode (first frame), orient and convert; map Pillow's exceptions to one-line ImageErrors."""
    try:
        image.load()  # animated files: Image.open leaves us on the first frame
        return _finish(image, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"image too large ({first_line(exc)})",
                         bomb_fix()) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        problem = first_line(exc)
        if "truncated" in problem.lower() or isinstance(exc, EOFError):
            raise ImageError(name, f"truncated or corrupt image data ({problem})",
                             "re-download or re-export the file") from None
        raise ImageError(name, f"cannot decode image ({type(exc).__name__}: {problem})",
                         "re-export it as JPEG or PNG") from None


def _finish(image: Image.Image, name: str) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise ImageError(name, f"image has no pixels ({image.width}x{image.height})", "pass a non-empty image")
    try:
        if image.getexif().get(_ORIENTATION, 1) not in (1, None):
            image = ImageOps.exif_transpose(image) or image
    except Exception:  # a broken EXIF block must not lose the image: keep it as stored
        pass
    try:
        return to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(name, f"cannot convert {image.mode} image to RGB ({first_line(exc)})",
                         "re-export it as 8-bit RGB") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB per the module's rules (drop alpha like open_clip; rescale 16-bit)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)
        if mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
            scaled = values
        else:
            scaled = values / 257.0
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and np.nanmin(values) >= 0 and np.nanmax(values) <= 1:
            values = values * 255.0
        gray = np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    a = array
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (3, 4):
        raise ImageError(name, f"array of shape {a.shape} looks channel-first",
                         "pass HxWxC (e.g. array.transpose(1, 2, 0))")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(name, f"array of shape {a.shape} is not an image",
                         "pass HxW (grayscale), HxWx3 (RGB) or HxWx4 (RGBA)")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(name, f"array of shape {a.shape} has no pixels", "pass a non-empty image")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError(name, "float array contains NaN or infinity", "pass finite values in [0, 1]")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ImageError(name, f"float array values span [{a.min():g}, {a.max():g}], not [0, 1]",
                             "scale it to [0, 1] or pass uint8")
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ImageError(name, f"{a.dtype} array values span [{a.min()}, {a.max()}], not 0..255",
                             "pass uint8 (0..255), uint16 (0..65535) or float (0..1)")
        a = a.astype(np.uint8)
    else:
        raise ImageError(name, f"unsupported array dtype {a.dtype}", "pass uint8, uint16 or float in [0, 1]")
    a = np.ascontiguousarray(a)
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.shape[2] == 4:
        return Image.fromarray(a, "RGBA").convert("RGB")
    return Image.fromarray(a, "RGB")
