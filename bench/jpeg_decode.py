"""Fast JPEG decoding (`Preprocessor(fast_decode=True)`, `novic-run --fast-decode`) against the exact
decode: time to load + preprocess one JPEG file, how far the pixels move, and how far the image
embedding moves through the paper bundle's encoder (ViT-B-16-SigLIP, random weights).

Images: two real photos from scikit-image (retina 1411x1411, hubble_deep_field 1000x872) and two
camera-sized ones made by upscaling real photos and adding pixel noise (sensor-like detail, so that
the JPEG is as costly to decode as a photo of that size): 4032x3024 (12 MP) and 2048x1536 (3 MP).
All saved as JPEG quality 90.

    python bench/jpeg_decode.py [--reps 15]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from novic.bench.setup import CONFIGS, build
from novic.runtime.backends.ort import OrtImageEncoder
from novic.runtime.bundle import Bundle
from novic.runtime.preprocess import Preprocessor


def sample_jpegs(folder: Path) -> dict[str, Path]:
    import skimage.data as data

    rng = np.random.default_rng(0)

    def camera(photo: np.ndarray, size: tuple[int, int]) -> Image.Image:
        big = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC), np.int16)
        return Image.fromarray(np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8))

    images = {"retina 1411x1411 (real photo)": Image.fromarray(data.retina()),
              "hubble 1000x872 (real photo)": Image.fromarray(data.hubble_deep_field()),
              "12 MP 4032x3024 (upscaled photo + pixel noise)": camera(data.astronaut(), (4032, 3024)),
              "3 MP 2048x1536 (upscaled photo + pixel noise)": camera(data.coffee(), (2048, 1536))}
    paths = {}
    for i, (name, image) in enumerate(images.items()):
        paths[name] = folder / f"{i}.jpg"
        image.save(paths[name], quality=90)
    return paths


def seconds(pre: Preprocessor, path: Path) -> float:
    start = time.perf_counter()
    pre.load_batch([path])
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench"))
    a = ap.parse_args()
    paths = build(CONFIGS["paper"], Path(a.workdir) / "paper")
    bundle = Bundle.open(paths["bundle"])
    encoder = OrtImageEncoder(bundle.artifact_path("image_encoder", "fp32"), threads=2)
    exact, fast = Preprocessor(bundle.preprocess, threads=1), Preprocessor(bundle.preprocess, threads=1, fast_decode=True)
    level = 1 / 255 / min(exact.config.std)   # one 8-bit step after normalisation
    print(f"preprocess {exact.config.to_dict()}; fast decode keeps >= {fast.draft} pixels")
    print("| JPEG | exact load + preprocess | fast | speed-up | pixels: mean / max diff (8-bit levels) | embedding cosine |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in sample_jpegs(Path(tmp)).items():
            times = {"exact": [], "fast": []}
            for _ in range(a.reps):   # taking turns, so that a change in load hits both
                times["exact"].append(seconds(exact, path))
                times["fast"].append(seconds(fast, path))
            t_exact, t_fast = (statistics.median(times[k]) * 1e3 for k in ("exact", "fast"))
            want, got = exact.load_batch([path])[0], fast.load_batch([path])[0]
            diff = np.abs(got - want) / level
            e_want, e_got = encoder(want), encoder(got)
            cos = float((e_want * e_got).sum() / np.linalg.norm(e_want) / np.linalg.norm(e_got))
            print(f"| {name} | {t_exact:.1f} ms | {t_fast:.1f} ms | {t_exact / t_fast:.2f}x | "
                  f"{diff.mean():.2f} / {diff.max():.0f} | {cos:.6f} |")


if __name__ == "__main__":
    main()
