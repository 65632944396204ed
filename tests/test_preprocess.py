"""novic.runtime.preprocess (numpy + PIL) against open_clip's own eval transform."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

open_clip = pytest.importorskip("open_clip")
skdata = pytest.importorskip("skimage.data")

from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402

from novic.runtime import preprocess as pre  # noqa: E402
from novic.runtime.images import ImageError  # noqa: E402
from novic.runtime.preprocess import PreprocessConfig, Preprocessor  # noqa: E402

TOL = 1e-5


def _photos() -> dict[str, Image.Image]:
    images = {name: Image.fromarray(getattr(skdata, name)())
              for name in ("astronaut", "chelsea", "coffee", "rocket")}
    images["camera (grayscale L)"] = Image.fromarray(skdata.camera())
    rng = np.random.default_rng(0)
    base = skdata.coffee()
    for h, w in [(1, 1), (7, 300), (300, 7), (225, 224), (224, 225), (223, 224), (378, 378),
                 (400, 50), (13, 17), (401, 399)]:
        if h <= base.shape[0] and w <= base.shape[1]:
            y, x = int(rng.integers(0, base.shape[0] - h + 1)), int(rng.integers(0, base.shape[1] - w + 1))
            images[f"coffee crop {h}x{w}"] = Image.fromarray(np.ascontiguousarray(base[y:y + h, x:x + w]))
        else:
            images[f"noise {h}x{w}"] = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return images


PHOTOS = _photos()


def _model_cfg(model: str, tag: str) -> dict:
    """open_clip's preprocessing of a released model, as Embedder.preprocess reports it."""
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    cfg = {"size": size, **{k: v for k, v in open_clip.get_pretrained_cfg(model, tag).items()
                            if k in ("mean", "std", "interpolation", "resize_mode", "fill_color")}}
    return cfg


MODELS = {
    "ViT-B-32/openai (OpenAI mean/std, 224, shortest)": _model_cfg("ViT-B-32", "openai"),
    "ViT-B-16-SigLIP/webli (0.5 mean/std, 224, squash)": _model_cfg("ViT-B-16-SigLIP", "webli"),
    "ViT-SO400M-14-SigLIP/webli": _model_cfg("ViT-SO400M-14-SigLIP", "webli"),
    "ViT-H-14-378-quickgelu/dfn5b (DFN5B, 378, squash)": _model_cfg("ViT-H-14-378-quickgelu", "dfn5b"),
    "ViT-L-14-CLIPA/datacomp1b (bilinear, squash)": _model_cfg("ViT-L-14-CLIPA", "datacomp1b"),
    "MobileCLIP-S1/datacompdr (bilinear, 256, shortest)": _model_cfg("MobileCLIP-S1", "datacompdr"),
    # resize modes / sizes no released config above uses
    "synthetic longest 224 fill 0": {"size": 224, "resize_mode": "longest"},
    "synthetic longest 160x224 fill 128": {"size": (160, 224), "resize_mode": "longest", "fill_color": 128},
    "synthetic shortest 224x160": {"size": (224, 160), "resize_mode": "shortest"},
    "synthetic squash 96x128": {"size": (96, 128), "resize_mode": "squash"},
}


def _oracle(cfg: dict):
    known = {k: v for k, v in cfg.items() if k in ("size", "mean", "std", "interpolation",
                                                    "resize_mode", "fill_color")}
    return image_transform_v2(PreprocessCfg(**known), is_train=False)


@pytest.mark.parametrize("name", list(MODELS))
def test_parity_with_open_clip(name):
    cfg = MODELS[name]
    oracle, ours = _oracle(cfg), Preprocessor(cfg)
    for photo, image in PHOTOS.items():
        want = oracle(image).numpy()
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == want.shape, (photo, got.shape, want.shape)
        err = float(np.abs(got - want).max())
        assert err <= TOL, f"{name} / {photo}: max abs diff {err}"


def test_parity_through_files_and_embedder_dict(tmp_path):
    """Encoded files through load_image, and the dict format of Embedder.preprocess."""
    cfg = {"size": [224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
           "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0, "mode": "RGB"}
    oracle, ours = _oracle({**cfg, "size": tuple(cfg["size"])}), Preprocessor(cfg)
    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        for ext in ("jpg", "png"):
            p = tmp_path / f"{name}.{ext}"
            Image.fromarray(getattr(skdata, name)()).save(p)
            paths.append(p)
    batch, errors = ours.load_batch(paths)
    assert errors == [None] * len(paths)
    for row, p in zip(batch, paths):
        with Image.open(p) as im:
            want = oracle(im).numpy()
        assert float(np.abs(row - want).max()) <= TOL, p


def test_tiny_embedder_preprocess_roundtrip():
    from novic.model.embedder import Embedder, tiny_spec

    emb = Embedder.load(tiny_spec())
    ours, oracle = Preprocessor(emb.preprocess), emb.image_transform()
    for photo in ("astronaut", "rocket", "camera (grayscale L)"):
        want = oracle(PHOTOS[photo]).numpy()
        assert float(np.abs(ours(PHOTOS[photo]) - want).max()) <= TOL
    assert PreprocessConfig.from_dict(ours.config.to_dict()) == ours.config


def test_extreme_aspect_ratio_does_not_materialise_huge_intermediate(monkeypatch):
    """Past MAX_INTERMEDIATE_PIXELS only the kept window is resized: within one 8-bit level."""
    cfg = MODELS["ViT-B-32/openai (OpenAI mean/std, 224, shortest)"]
    oracle, ours = _oracle(cfg), Preprocessor(cfg)
    monkeypatch.setattr(pre, "MAX_INTERMEDIATE_PIXELS", 1000)
    one_level = 1 / 255 / min(cfg["std"]) + TOL
    for photo in ("astronaut", "chelsea", "coffee crop 7x300", "coffee crop 300x7", "coffee crop 400x50"):
        err = float(np.abs(ours(PHOTOS[photo]) - oracle(PHOTOS[photo]).numpy()).max())
        assert err <= one_level, (photo, err)
    # a 40000 x 20 strip: open_clip would build a 224 x 448000 intermediate; we do not
    monkeypatch.undo()
    strip = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 40000, 3), dtype=np.uint8))
    out = ours(strip)
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()


def test_plan_geometry_matches_torchvision_rules():
    c = PreprocessConfig(size=(224, 224), resize_mode="shortest")
    assert c.plan(640, 427) == ((335, 224), (56, 0, 0, 0))
    assert c.plan(224, 224) == ((224, 224), (0, 0, 0, 0))
    c = PreprocessConfig(size=(224, 224), resize_mode="longest")
    (w, h), (left, top, pr, pb) = c.plan(640, 427)
    assert (w, h) == (224, 149) and left == 0 and top < 0 and pb > 0


def test_config_validation():
    with pytest.raises(ValueError, match="resize_mode"):
        PreprocessConfig.from_dict({"size": 224, "resize_mode": "crop"})
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig.from_dict({"size": 224, "interpolation": "lanczos"})
    with pytest.raises(ValueError, match="mode"):
        PreprocessConfig.from_dict({"size": 224, "mode": "L"})
    assert PreprocessConfig.from_dict({"image_size": 64}).size == (64, 64)
    assert PreprocessConfig.from_dict({"size": 64, "mean": 0.5}).mean == (0.5, 0.5, 0.5)


def test_batch_pool_matches_serial_and_isolates_errors(tmp_path):
    ours = Preprocessor(MODELS["ViT-B-32/openai (OpenAI mean/std, 224, shortest)"], threads=3)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    sources = [PHOTOS["astronaut"], empty, PHOTOS["chelsea"], "/no/such/file.png", PHOTOS["rocket"]]
    batch, errors = ours.load_batch(sources)
    assert [e is None for e in errors] == [True, False, True, False, True]
    assert all(isinstance(e, ImageError) and "\n" not in str(e) for e in errors if e is not None)
    for i in (0, 2, 4):
        assert np.array_equal(batch[i], ours(sources[i]))
    assert not batch[1].any() and not batch[3].any()
    ours.close()


def test_fast_decode_scales_large_jpegs_only_and_stays_close(tmp_path):
    """fast_decode: a large JPEG (file or bytes) decodes at a reduced DCT scale that keeps both
    sides >= 2x the target, EXIF orientation still applies, and the result stays within about a
    pixel level of the exact transform; PNGs, small JPEGs and PIL images are exactly as before."""
    from novic.runtime.images import load_image

    big = Image.fromarray(skdata.chelsea()).resize((2400, 1800), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)   # fine detail, so that a wrong scale would show
    big = Image.fromarray(np.clip(np.asarray(big, np.int16) + rng.integers(-10, 11, (1800, 2400, 3)), 0, 255).astype(np.uint8))
    jpg, png, small, turned = (tmp_path / n for n in ("big.jpg", "big.png", "small.jpg", "turned.jpg"))
    big.save(jpg, quality=92)
    big.save(png)
    Image.fromarray(skdata.chelsea()).save(small)        # 451x300: no smaller scale keeps 448
    exif = Image.Exif()
    exif[0x0112] = 6                                     # stored sideways: rotate 90 degrees
    big.save(turned, quality=92, exif=exif)
    assert load_image(jpg, draft=(448, 448)).size == (600, 450)              # 1/4 scale
    assert load_image(jpg.read_bytes(), draft=(448, 448)).size == (600, 450)
    assert load_image(turned, draft=(448, 448)).size == (450, 600)           # upright
    assert load_image(png, draft=(448, 448)).size == (2400, 1800)
    for name in ("ViT-B-32/openai (OpenAI mean/std, 224, shortest)", "ViT-B-16-SigLIP/webli (0.5 mean/std, 224, squash)"):
        exact, fast = Preprocessor(MODELS[name]), Preprocessor(MODELS[name], fast_decode=True)
        assert fast.draft == (2 * 224, 2 * 224) and exact.draft is None
        inputs = [jpg, png, small, turned, big, Image.open(jpg)]   # the last: a PIL image, not loaded yet
        got, errors = fast.load_batch(inputs)
        want, _ = exact.load_batch([jpg, png, small, turned, big, Image.open(jpg)])
        assert errors == [None] * 6
        level = 1 / 255 / min(MODELS[name].get("std", pre.OPENAI_STD))   # one 8-bit step, normalised
        for i in (0, 3):   # the large JPEGs: close, not equal
            diff = np.abs(got[i] - want[i])
            assert 0 < diff.mean() < 0.5 * level and diff.max() < 8 * level, (name, i, diff.mean() / level)
        for i in (1, 2, 4, 5):   # PNG, small JPEG, PIL images (even one opened from a JPEG): untouched
            assert np.array_equal(got[i], want[i]), (name, i)
