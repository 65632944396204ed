"""Host preprocessing and encoder on the CPU: the float path (resize + crop, then (x/255 - mean)/std
to float32 [B,3,H,W] on the host) against the uint8 path (resize + crop to uint8 [B,H,W,3]; the
normalisation inside the encoder graph, novic.export.u8). Same bundle, same process, interleaved
call by call so that the machine's load hits both alike. Prints medians and ratios float / uint8.

    python bench/cpu_u8_preprocess.py --config paper --reps 15 --batches 1,32,256 --e2e-batches 1,8 --e2e-reps 9 --threads 2

Inputs: scikit-image's photos (astronaut, chelsea, coffee, rocket, 300x451 to 512x512), decoded
once, cycled to the batch size: the host work timed is `Preprocessor.load_batch` (its thread pool,
`--threads` workers), decoding excluded. End to end = load_batch + the fp32 encoder: the plain graph
(ort-cpu's) with its uint8 twin made here by novic.export.u8, and the fused graph with the
bundle's own uint8 twin when the bundle has one.
"""
import argparse
import os
import shutil
import tempfile
from pathlib import Path

from novic.bench.setup import CONFIGS, build
from novic.bench.timing import interleaved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper", choices=list(CONFIGS))
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/novic/bench"))
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batches", default="1,32,256", help="batch sizes of the host preprocessing comparison")
    ap.add_argument("--e2e-batches", default="1,8", help="batch sizes of preprocessing + encoder")
    ap.add_argument("--e2e-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from skimage import data as skdata
    from PIL import Image

    from novic.export.u8 import U8_PIXELS, gate_u8, u8_file
    from novic.runtime.backends.ort import OrtImageEncoder
    from novic.runtime.bundle import Bundle
    from novic.runtime.preprocess import Preprocessor

    bundle = Bundle.open(build(CONFIGS[a.config], Path(a.workdir) / a.config)["bundle"])
    cfg = bundle.preprocess_config
    photos = [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in ("astronaut", "chelsea", "coffee", "rocket")]
    pre = {"float": Preprocessor(cfg, threads=a.threads), "uint8": Preprocessor(cfg, threads=a.threads, uint8=True)}
    print(f"{a.config}: {bundle.embedder['spec']['model']}, {cfg.size[0]}x{cfg.size[1]}, {os.cpu_count()} CPUs, "
          f"{a.threads} preprocessing threads, onnxruntime threads {a.threads}, load {os.getloadavg()[0]:.2f}")

    print("\nHost preprocessing (Preprocessor.load_batch, decoded photos):\n")
    print("| batch | float path (median) | uint8 path (median) | float / uint8 | the normalisation alone "
          "(median) | bytes to the encoder: float / uint8 |")
    print("|---|---|---|---|---|---|")
    for b in (int(x) for x in a.batches.split(",")):
        images = [photos[i % len(photos)] for i in range(b)]
        crops = pre["uint8"].load_batch(images)[0]
        t = interleaved({**{k: (lambda p=p: p.load_batch(images)) for k, p in pre.items()},
                         "normalise": lambda: pre["uint8"].normalize_batch(crops)}, a.reps)
        nbytes = {k: p.load_batch(images)[0].nbytes for k, p in pre.items()}
        print(f"| {b} | {t['float']:.2f} ms | {t['uint8']:.2f} ms | {t['float'] / t['uint8']:.2f}x | "
              f"{t['normalise']:.2f} ms | {nbytes['float'] / 2**20:.1f} MiB / {nbytes['uint8'] / 2**20:.1f} MiB |")

    with tempfile.TemporaryDirectory(prefix="novic-u8-bench-") as scratch:
        plain = bundle.artifact_path("image_encoder", "fp32")
        src = Path(scratch) / plain.name   # the twin is written beside its source: here, not in the bundle
        try:
            os.link(plain, src)
        except OSError:
            shutil.copyfile(plain, src)
        twin = u8_file(src, cfg.mean, cfg.std)["path"]
        gate = gate_u8(plain, twin, cfg)
        pairs = {"plain fp32": (plain, twin, gate.numbers["min_cosine"])}
        if bundle.has_u8("fp32", "fused"):
            art = bundle.artifact("image_encoder", "fp32", "fused", U8_PIXELS)
            pairs["fused fp32"] = (bundle.artifact_path("image_encoder", "fp32", "fused"),
                                   bundle.artifact_path("image_encoder", "fp32", "fused", U8_PIXELS),
                                   art.extra["gate"]["min_cosine"])
        print("\nEnd to end: load_batch + encoder (embeddings equal: cosine on the gate photos in brackets):\n")
        print("| encoder | batch | float path (median) | uint8 path (median) | float / uint8 |")
        print("|---|---|---|---|---|")
        for name, (float_path, u8_path, cos) in pairs.items():
            enc = {"float": OrtImageEncoder(float_path, threads=a.threads),
                   "uint8": OrtImageEncoder(u8_path, threads=a.threads)}
            for b in (int(x) for x in a.e2e_batches.split(",") if x):
                images = [photos[i % len(photos)] for i in range(b)]
                t = interleaved({k: (lambda k=k: enc[k](pre[k].load_batch(images)[0])) for k in enc}, a.e2e_reps)
                print(f"| {name} (cos {cos:.7f}) | {b} | {t['float']:.1f} ms | {t['uint8']:.1f} ms | "
                      f"{t['float'] / t['uint8']:.3f}x |")
    print(f"\nload after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
