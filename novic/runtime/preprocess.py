"""open_clip's eval image transform, reproduced with numpy + PIL (no torch, no torchvision).

open_clip (`open_clip.transform.image_transform(..., is_train=False)`) does, on a PIL image:
- resize_mode 'shortest' (square size): torchvision `Resize(size)`: the short side becomes `size`,
  the long side `int(size * long / short)`; then `CenterCrop(size)`.
  (non-square size): `ResizeKeepRatio(size)` (scale by the smaller ratio, `round` each side), then
  `CenterCrop(size)`;
- 'longest': `ResizeKeepRatio(size, longest=1)` (the whole image fits), then `CenterCropOrPad(size,
  fill=fill_color)`;
- 'squash': `Resize((h, w))`, aspect ratio not kept;
- `.convert('RGB')`, `ToTensor()` (uint8 -> float32 / 255), `Normalize(mean, std)` (float32).
Resizing is Pillow's `Image.resize` with BICUBIC (or BILINEAR when the config says so), which is
exactly what torchvision calls for PIL inputs, and a resize to the size the image already has is
skipped, as torchvision does. So for RGB inputs the output here is bit-identical in practice
(tested: max abs diff <= 1e-5 against open_clip on real photos).

Two documented differences, both outside what parity tests cover:
- the input is first made 8-bit RGB by `novic.runtime.images` (EXIF orientation applied, 16-bit
  rescaled; see that module);
- 'shortest' on an extremely elongated image (the resized intermediate would exceed
  `MAX_INTERMEDIATE_PIXELS`) resizes only the region that the centre crop keeps, in two separable
  passes, instead of materialising the whole intermediate (open_clip would allocate gigabytes for
  a 40000x20 strip); values may then differ from open_clip by one 8-bit level.

Batches: `Preprocessor.load_batch` loads, converts and transforms in a bounded thread pool
(`concurrent.futures.ThreadPoolExecutor`; Pillow releases the GIL while decoding and resizing).

uint8 output (`Preprocessor(..., uint8=True)`): the host stops after the resize and crop and
hands over u8[N, H, W, 3], for an image encoder that does the scaling, the mean/std
normalisation and the channel transpose in its graph (novic.export.u8): a quarter of the bytes
to move and no float work on the host. `normalize_batch` turns such a batch into the float one.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from novic.runtime.images import ImageError, describe, load_image

__all__ = ["DRAFT_OVERSAMPLE", "MAX_INTERMEDIATE_PIXELS", "PreprocessConfig", "Preprocessor", "OPENAI_MEAN", "OPENAI_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_INTERMEDIATE_PIXELS = 1 << 25  # 33.5 M pixels (100 MB as RGB)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "random": Image.Resampling.BICUBIC}  # open_clip: 'random' means bicubic at eval


@dataclass(frozen=True)
class PreprocessConfig:
    """The eval preprocessing of one CLIP model (open_clip's `PreprocessCfg` fields)."""

    size: tuple[int, int] = (224, 224)          # (height, width)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self):
        problems = []
        if len(self.size) != 2 or min(self.size) < 1:
            problems.append(f"size {self.size} must be two positive ints (height, width)")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std need 3 values (R, G, B)")
        elif any(s <= 0 for s in self.std):
            problems.append(f"std {self.std} must be positive")
        if self.interpolation not in _RESAMPLE:
            problems.append(f"interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLE)}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            problems.append(f"resize_mode {self.resize_mode!r} is not shortest/longest/squash")
        if problems:
            raise ValueError("invalid preprocessing config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessConfig":
        """Accepts open_clip's PreprocessCfg keys (`size` int or [h, w]; `image_size` as an alias);
        unknown keys (e.g. `mode: 'RGB'`) are ignored. Missing keys take open_clip's defaults."""
        size = data.get("size", data.get("image_size", 224))
        if isinstance(size, (int, float)):
            size = (int(size), int(size))
        elif len(size) == 1:
            size = (int(size[0]), int(size[0]))
        mode = data.get("mode", "RGB")
        if mode not in (None, "RGB"):
            raise ValueError(f"invalid preprocessing config: mode {mode!r} (only RGB is supported)")

        def triple(key, default):
            value = data.get(key)
            if value is None:
                return default
            try:
                return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"invalid preprocessing config: {key} {value!r} must be 3 numbers (R, G, B)") from None

        try:
            size = (int(size[0]), int(size[1]))
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"invalid preprocessing config: size {size!r} must be an int or [height, width]") from None
        return cls(size=size,
                   mean=triple("mean", OPENAI_MEAN),
                   std=triple("std", OPENAI_STD),
                   interpolation=data.get("interpolation") or "bicubic",
                   resize_mode=data.get("resize_mode") or "shortest",
                   fill_color=int(data.get("fill_color") or 0))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["size"] = list(self.size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    # ---- geometry (pure functions of the input size; unit-testable) ----
    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """(resized (w, h), (left, top, pad_right, pad_bottom) offsets) as open_clip computes them.

        The crop window of the target size starts at (left, top) in the resized image; negative
        offsets mean padding (only in 'longest' mode)."""
        th, tw = self.size
        if self.resize_mode == "squash":
            return (tw, th), (0, 0, 0, 0)
        if self.resize_mode == "shortest" and th == tw:
            # torchvision _compute_resized_output_size with size=[s]
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = th, int(th * long / short)
            nw, nh = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            # open_clip ResizeKeepRatio.get_params
            ratio_h, ratio_w = height / th, width / tw
            longest = 1.0 if self.resize_mode == "longest" else 0.0
            ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
            nh, nw = round(height / ratio), round(width / ratio)
        return (nw, nh), _crop_offsets(nw, nh, tw, th)


def _crop_offsets(w: int, h: int, cw: int, ch: int) -> tuple[int, int, int, int]:
    """torchvision center_crop / open_clip center_crop_or_pad: pad (left/top get the floor half),
    then crop at int(round((size - crop) / 2))."""
    pad_l = (cw - w) // 2 if cw > w else 0
    pad_t = (ch - h) // 2 if ch > h else 0
    pad_r = (cw - w + 1) // 2 if cw > w else 0
    pad_b = (ch - h + 1) // 2 if ch > h else 0
    pw, ph = w + pad_l + pad_r, h + pad_t + pad_b
    left = int(round((pw - cw) / 2.0)) - pad_l
    top = int(round((ph - ch) / 2.0)) - pad_t
    return left, top, pad_r, pad_b


# Fast decoding keeps JPEGs at least this many times the target size, so that the final resize
# still filters (at 1x the pixels differed 2.6x more from a full decode; docs/benchmarks.md).
DRAFT_OVERSAMPLE = 2


class PreprocessorClosed(RuntimeError):
    """load_batch after close() (the Classifier says "this Classifier was closed")."""


class Preprocessor:
    """Callable: RGB PIL image (or any `load_image` input) -> float32 [3, H, W] (uint8=True:
    the resized, cropped uint8 [H, W, 3], for an encoder that normalises in its graph).

    fast_decode: JPEG files/bytes are decoded at a reduced scale (`load_image(draft=...)`) that
    stays at least DRAFT_OVERSAMPLE x the target size on both sides: several times faster for
    camera photos, not bit-identical to open_clip.
    jpeg_decoder (`novic.runtime.nvjpeg.jpeg_decoder`): `load_batch` decodes the batch's JPEG
    files/bytes with it in one call (nvImageCodec, on the GPU) when there are several (a single
    image is decoded by Pillow in the caller's thread) and the rest with Pillow; with
    fast_decode every JPEG goes to Pillow (nvImageCodec has no reduced-scale decode).
    Thread-safe: the transform is a pure function; the pool is created once, lazily."""

    def __init__(self, config: PreprocessConfig | Mapping[str, Any], *, threads: int | None = None,
                 fast_decode: bool = False, jpeg_decoder=None, uint8: bool = False):
        self.config = config if isinstance(config, PreprocessConfig) else PreprocessConfig.from_dict(config)
        self.uint8 = bool(uint8)
        self.jpeg_decoder = jpeg_decoder   # novic.runtime.nvjpeg decoder for JPEG batches, or None (Pillow)
        self.threads = max(1, threads if threads is not None else min(8, os.cpu_count() or 1))
        side = DRAFT_OVERSAMPLE * max(self.config.size)   # square: EXIF rotation may swap the sides
        self.draft = (side, side) if fast_decode else None
        self._mean = np.asarray(self.config.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.config.std, dtype=np.float32).reshape(3, 1, 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False   # after close(): no new pool, no loading

    # ---- single image ----
    def pixels(self, image: Image.Image) -> np.ndarray:
        """Resize + centre crop/pad of an RGB image (from `load_image`): uint8 [H, W, 3]."""
        if image.mode != "RGB":
            image = load_image(image)
        cfg = self.config
        th, tw = cfg.size
        resample = _RESAMPLE[cfg.interpolation]
        (nw, nh), (left, top, pad_r, pad_b) = cfg.plan(image.width, image.height)
        if nw * nh > MAX_INTERMEDIATE_PIXELS and left >= 0 and top >= 0:
            return np.asarray(_resize_window(image, nw, nh, left, top, tw, th, resample))
        if (nw, nh) != image.size:
            image = image.resize((nw, nh), resample)
        array = np.asarray(image)
        if left < 0 or top < 0 or pad_r or pad_b:
            fill = int(cfg.fill_color)
            pl, pt = max(0, -left), max(0, -top)
            array = np.pad(array, ((pt, pad_b), (pl, pad_r), (0, 0)), constant_values=fill)
            left, top = left + pl, top + pt
        return array[top:top + th, left:left + tw]

    def normalize(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [3, H, W]: (x / 255 - mean) / std, all in float32 (torchvision)."""
        chw = np.transpose(pixels, (2, 0, 1))
        if out is None:
            out = np.empty(chw.shape, dtype=np.float32)
        np.divide(chw, np.float32(255.0), out=out, dtype=np.float32)
        out -= self._mean
        out /= self._std
        return out

    def normalize_batch(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (a uint8 batch) -> float32 [N, 3, H, W], as the float path makes it."""
        out = np.empty((len(pixels), 3, *pixels.shape[1:3]), dtype=np.float32)
        for i, image in enumerate(pixels):
            self.normalize(image, out=out[i])
        return out

    def __call__(self, image: Any) -> np.ndarray:
        """Any `load_image` input (EXIF orientation applied, converted to RGB) -> float32 [3, H, W]
        (uint8 [H, W, 3] with uint8=True)."""
        pixels = self.pixels(load_image(image, draft=self.draft))
        return pixels if self.uint8 else self.normalize(pixels)

    # ---- batches ----
    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._closed:   # a pool made now would never be shut down
                raise PreprocessorClosed("this Preprocessor was closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="novic-pre")
            return self._pool

    def _one(self, source: Any, out: np.ndarray, index: int, decoded: np.ndarray | None = None) -> ImageError | None:
        """Preprocess one input into out[index]; `decoded`: its RGB pixels if already decoded."""
        try:
            image = Image.fromarray(decoded) if decoded is not None else load_image(source, draft=self.draft)
            if self.uint8:
                out[index] = self.pixels(image)
            else:
                self.normalize(self.pixels(image), out=out[index])
            return None
        except ImageError as exc:
            return exc
        except MemoryError:
            return ImageError(describe(source), "out of memory while decoding", "downscale the image")
        except Exception as exc:  # anything unexpected still fails only this image
            return ImageError(describe(source), f"preprocessing failed ({type(exc).__name__}: {exc})",
                              "re-export the image as JPEG or PNG")

    def load_batch(self, sources: Sequence[Any]) -> tuple[np.ndarray, list[ImageError | None]]:
        """Load + preprocess every input in the pool: (float32 [N, 3, H, W] or, with uint8=True,
        uint8 [N, H, W, 3]; per-input error or None).

        Rows of failed inputs are left zero; a bad input never stops the others."""
        if self._closed:
            raise PreprocessorClosed("this Preprocessor was closed")
        th, tw = self.config.size
        shape, dtype = ((th, tw, 3), np.uint8) if self.uint8 else ((3, th, tw), np.float32)
        out = np.zeros((len(sources), *shape), dtype=dtype)
        decoded = self._decode_jpegs(sources)
        if len(sources) <= 1 or self.threads == 1:
            errors = [self._one(s, out, i, d) for i, (s, d) in enumerate(zip(sources, decoded))]
        else:
            errors = list(self._executor().map(self._one, sources, [out] * len(sources), range(len(sources)),
                                               decoded))
        return out, errors

    def _decode_jpegs(self, sources: Sequence[Any]) -> list[np.ndarray | None]:
        """The JPEG files/bytes among `sources` decoded in one batch by `jpeg_decoder` (None for
        the other inputs, for JPEGs it could not decode, and without a jpeg_decoder)."""
        decoded: list[np.ndarray | None] = [None] * len(sources)
        if self.jpeg_decoder is None or self.draft is not None:   # fast_decode: Pillow's reduced-scale decode
            return decoded
        from novic.runtime.nvjpeg import jpeg_payload

        if len(sources) < 2:   # one image: Pillow in this thread, not a queue on the shared decoder
            return decoded
        payloads = [jpeg_payload(s) for s in sources]
        at = [i for i, p in enumerate(payloads) if p is not None]
        if len(at) < 2:
            return decoded
        for i, array in zip(at, self.jpeg_decoder.decode([payloads[i] for i in at])):
            decoded[i] = array
        return decoded

    def batch(self, images: Iterable[Any]) -> np.ndarray:
        """Like `load_batch` but raises the first error (for callers that want all-or-nothing)."""
        out, errors = self.load_batch(list(images))
        for error in errors:
            if error is not None:
                raise error
        return out

    def close(self) -> None:
        """Shut the loading pool down; loading afterwards raises PreprocessorClosed. Idempotent."""
        with self._pool_lock:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __del__(self):  # pragma: no cover - best effort
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _resize_window(image: Image.Image, nw: int, nh: int, left: int, top: int, tw: int, th: int,
                   resample) -> Image.Image:
    """The [top:top+th, left:left+tw] window of `image.resize((nw, nh))` without building the rest:
    horizontal pass over the kept columns, then vertical pass over the kept rows (Pillow's own pass
    order). Equal to the full resize + crop up to one 8-bit level."""
    w, h = image.size
    sx, sy = w / nw, h / nh
    if (tw, left) != (nw, 0) or w != tw:
        image = image.resize((tw, h), resample, box=(left * sx, 0.0, (left + tw) * sx, float(h)))
    if (th, top) != (nh, 0) or h != th:
        image = image.resize((tw, th), resample, box=(0.0, top * sy, float(tw), (top + th) * sy))
    return image
