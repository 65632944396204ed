"""JPEG decoding through NVIDIA nvImageCodec (optional; on the GPU with nvJPEG), Pillow otherwise.

Decoding camera JPEGs is the largest host cost in front of a GPU (docs/benchmarks.md, "Fast JPEG
decoding"). nvImageCodec (`pip install 'novic[nvjpeg]'`, the `nvidia-nvimgcodec-cu13` wheel, plus
`nvidia-nvjpeg` for the GPU decoder) decodes a whole batch of JPEGs in one call, on the GPU where
it can. The decoded RGB images come back to the host, where `Preprocessor` resizes and normalises
them as for Pillow's, so the pixels match Pillow's within a few 8-bit levels (IDCT and chroma
upsampling may differ; tests/test_nvjpeg.py). EXIF orientation is applied by nvImageCodec.

Only JPEG files and bytes take this path; a JPEG that nvImageCodec cannot decode, one above Pillow's
decompression-bomb limit (`jpeg_payload`), every JPEG of a `fast_decode` Preprocessor (Pillow's
reduced-scale decode) and every other input are decoded by Pillow as before (same clear errors).

    decoder = jpeg_decoder("auto", device="cuda")   # None (Pillow) when nvImageCodec is not installed
                                                    # or its GPU decoder cannot open (warned once)
"""
from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from novic.errors import NovicError, first_line

INSTALL = "pip install 'novic[nvjpeg]' (nvidia-nvimgcodec-cu13; nvidia-nvjpeg for the GPU decoder)"
CHOICES = ("pillow", "nvimgcodec", "auto")
JPEG_MAGIC = b"\xff\xd8\xff"
METADATA_BYTES = 1 << 20   # room for EXIF/ICC/thumbnails on top of the pixels' uncompressed size

log = logging.getLogger("novic")
_warned: set[str] = set()   # "auto" fallbacks already logged: once per reason and process


class JpegDecoderError(NovicError, ValueError):
    """nvImageCodec asked for but missing, or an unknown decoder name."""


def import_nvimgcodec():
    from nvidia import nvimgcodec   # the optional extra; ImportError when absent
    return nvimgcodec


def jpeg_decoder(choice: str = "pillow", device: str = "cpu", device_id: int = 0) -> "NvImageCodecDecoder | None":
    """The decoder for `choice`: "pillow" -> None (Pillow decodes); "nvimgcodec" -> nvImageCodec on
    `device` ("cuda" or "cpu"), a one-line error when it is not installed or cannot open its
    decoder there (no GPU); "auto" -> nvImageCodec when installed and `device` is "cuda", else
    None; if its GPU decoder cannot open, None too, with one logged warning saying why."""
    if choice not in CHOICES:
        raise JpegDecoderError(f"jpeg decoder {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "pillow" or (choice == "auto" and device != "cuda"):
        return None
    try:
        import_nvimgcodec()
    except ImportError as exc:
        if choice == "auto":
            return None
        raise JpegDecoderError(f"nvImageCodec is not installed ({exc}); {INSTALL}") from None
    try:
        return NvImageCodecDecoder(device, device_id)
    except Exception as exc:  # noqa: BLE001 - nvImageCodec raises RuntimeError("... Code: 8") and no more
        why = _why_no_decoder(device, device_id, exc)
    if choice == "auto":
        if why not in _warned:
            _warned.add(why)
            log.warning("novic: JPEGs are decoded by Pillow: %s", why)
        return None
    raise JpegDecoderError(f"jpeg_decoder='nvimgcodec': {why}; use jpeg_decoder='pillow', or 'auto' (nvImageCodec "
                           f"where it can decode, else Pillow), or run where it can ({INSTALL})")


def _why_no_decoder(device: str, device_id: int, exc: Exception) -> str:
    """Why nvImageCodec could not open a decoder on `device`, in words: its own error says only
    "Could not create decoder. Code: 8" (the reason goes to stderr from C)."""
    if device == "cuda" and not _cuda_driver_loads():
        return f"nvImageCodec cannot decode on GPU {device_id}: no NVIDIA driver on this machine (libcuda)"
    where = f"GPU {device_id}" if device == "cuda" else "the CPU"
    return f"nvImageCodec could not open a decoder on {where} ({first_line(exc)})"


def _cuda_driver_loads() -> bool:
    import ctypes

    try:
        ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return False
    return True


def jpeg_payload(source: Any) -> bytes | None:
    """The bytes of `source` if it is a JPEG file path or JPEG bytes that nvImageCodec may decode,
    else None (Pillow decodes it). Its header is read first (Pillow reads only the header): an
    unreadable header, an image above Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
    novic-run --max-pixels) and a file much larger than its pixels need are left to Pillow, which
    reports them in its one line, so nothing is read whole that Pillow would refuse."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data if data[:3] == JPEG_MAGIC and _within_limits(io.BytesIO(data), len(data)) else None
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(Path(source), "rb") as handle:
                if handle.read(3) != JPEG_MAGIC:
                    return None
                handle.seek(0)
                if not _within_limits(handle, os.fstat(handle.fileno()).st_size):
                    return None
                handle.seek(0)
                return handle.read()
        except OSError:
            return None   # Pillow's loader reports the missing or unreadable file
    return None


def _within_limits(handle, size: int) -> bool:
    """Whether the image in `handle` (`size` bytes) is one nvImageCodec may decode: a header Pillow
    reads, at most MAX_IMAGE_PIXELS pixels, and at most an uncompressed image's bytes (+ metadata)."""
    try:
        with Image.open(handle) as image:   # reads the header only
            width, height = image.size
    except Exception:  # noqa: BLE001 - includes DecompressionBombError: Pillow's path says it in one line
        return False
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:   # Pillow warns or refuses: leave it that way
        return False
    return size <= 3 * width * height + METADATA_BYTES


class NvImageCodecDecoder:
    """One nvImageCodec decoder: JPEG bytes -> RGB uint8 [H, W, 3] host arrays, a batch per call."""

    def __init__(self, device: str = "cuda", device_id: int = 0):
        nv = import_nvimgcodec()
        self.device = device
        if device == "cuda":   # GPU first (hardware / CUDA nvJPEG), the CPU where it cannot
            self._decoder = nv.Decoder(device_id=device_id)
        else:
            self._decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
                                       backends=[nv.Backend(nv.CPU_ONLY)])
        self._params = nv.DecodeParams(apply_exif_orientation=True, color_spec=nv.ColorSpec.SRGB,
                                       allow_any_depth=False)
        self._lock = threading.Lock()   # one Classifier's loading threads share this decoder

    def decode(self, payloads: Sequence[bytes]) -> list[np.ndarray | None]:
        """One array per payload; None where nvImageCodec could not decode it (Pillow then does)."""
        if not payloads:
            return []
        try:
            with self._lock:
                if self._decoder is None:   # closed: Pillow decodes them
                    return [None] * len(payloads)
                images = self._decoder.decode(list(payloads), params=self._params)
        except Exception:  # noqa: BLE001 - the whole batch failed: Pillow decodes every one
            return [None] * len(payloads)
        out = []
        for image in images:
            host = image.cpu() if image is not None else None
            array = np.asarray(host) if host is not None else None
            ok = array is not None and array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8
            out.append(np.ascontiguousarray(array) if ok else None)
        return out

    def close(self) -> None:
        """Let go of nvImageCodec's decoder (its GPU buffers and streams; it has no close of its
        own). Waits for a batch being decoded; Pillow decodes whatever comes after. Idempotent."""
        with self._lock:
            self._decoder = None
