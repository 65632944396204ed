"""Odd and bad image inputs: each odd-but-valid one classifies, each bad one gets one clear line
(naming the input and the fix) and does not stop the batch."""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from novic.runtime.images import ImageError, describe, load_image

skdata = pytest.importorskip("skimage.data")

from fixtures_runtime import classifier, runtime_bundle  # noqa: E402,F401  (fixtures)


# ---- building the inputs ------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no pixel data to be
    refused: Pillow checks the size when it opens the file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _exif_rotated_jpeg(path: Path, upright: Image.Image) -> None:
    """Store the photo turned 90 degrees counter-clockwise with EXIF Orientation 6 ("rotate 90
    clockwise to view"), as a phone held sideways does."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif)


def make_inputs(root: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (file, valid?) for every case of the issue's list."""
    root.mkdir(parents=True, exist_ok=True)
    chelsea, coffee, camera = skdata.chelsea(), skdata.coffee(), skdata.camera()
    cases: dict[str, tuple[Path, bool]] = {}

    def add(name, valid, filename, writer):
        path = root / filename
        writer(path)
        cases[name] = (path, valid)

    buf = io.BytesIO()
    Image.fromarray(chelsea).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()

    add("0-byte file", False, "empty.jpg", lambda p: p.write_bytes(b""))
    add("truncated JPEG", False, "truncated.jpg", lambda p: p.write_bytes(jpeg[: len(jpeg) // 2]))
    add("text file named .jpg", False, "notes.jpg", lambda p: p.write_text("shopping list: milk, eggs\n"))
    add("decompression bomb", False, "bomb.png", lambda p: p.write_bytes(_png_header_only(30000, 30000)))
    add("huge dimensions (40000x20 strip)", True, "strip.png",
        lambda p: Image.fromarray(np.tile(coffee[200:220, :, :], (1, 67, 1))[:, :40000]).save(p))
    add("plain JPEG", True, "chelsea.jpg", lambda p: p.write_bytes(jpeg))
    add("grayscale", True, "camera_gray.jpg", lambda p: Image.fromarray(camera).save(p, quality=95))
    add("palette", True, "coffee_palette.png",
        lambda p: Image.fromarray(coffee).quantize(64).save(p))

    def palette_transparent(p):
        im = Image.fromarray(coffee).quantize(64)
        im.info["transparency"] = 0
        im.save(p, transparency=0)
    add("palette with transparency", True, "coffee_palette_t.png", palette_transparent)
    add("RGBA", True, "logo_rgba.png", lambda p: Image.fromarray(skdata.logo()).save(p))
    add("CMYK", True, "chelsea_cmyk.jpg",
        lambda p: Image.fromarray(chelsea).convert("CMYK").save(p, quality=95))
    add("16-bit PNG", True, "camera16.png",
        lambda p: Image.fromarray(camera.astype(np.uint16) * 257).save(p))

    def gif(p):
        frames = [Image.new("RGB", (64, 48), c) for c in ((200, 30, 30), (30, 30, 200), (30, 200, 30))]
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated GIF", True, "anim.gif", gif)
    add("EXIF-rotated photo", True, "rotated.jpg", lambda p: _exif_rotated_jpeg(p, Image.fromarray(chelsea)))
    return cases


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("odd_images"))


def _one_clear_line(message: str, path: Path):
    assert "\n" not in message, message
    assert str(path) in message, message
    assert "; " in message and len(message) < 300, message  # "<input>: <problem>; <fix>"


# ---- load_image: each case --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["0-byte file", "truncated JPEG", "text file named .jpg", "decompression bomb"])
def test_bad_files_raise_one_clear_line(inputs, name):
    path, _ = inputs[name]
    with pytest.raises(ImageError) as info:
        load_image(path)
    _one_clear_line(str(info.value), path)
    # the same data as bytes and as a file object
    data = path.read_bytes()
    with pytest.raises(ImageError):
        load_image(data)
    with open(path, "rb") as f, pytest.raises(ImageError):
        load_image(f)


def test_bad_file_messages_say_what_is_wrong(inputs):
    msg = {name: str(pytest.raises(ImageError, load_image, inputs[name][0]).value)
           for name in ("0-byte file", "truncated JPEG", "text file named .jpg", "decompression bomb")}
    assert "empty" in msg["0-byte file"]
    assert "truncated" in msg["truncated JPEG"]
    assert "not an image" in msg["text file named .jpg"]
    assert "too large" in msg["decompression bomb"] and "MAX_IMAGE_PIXELS" in msg["decompression bomb"]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_grayscale_palette_rgba_cmyk(inputs):
    gray = np.asarray(load_image(inputs["grayscale"][0]))
    assert gray.shape == (512, 512, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    for name in ("palette", "palette with transparency"):
        path = inputs[name][0]
        with Image.open(path) as im:
            assert im.mode == "P"
            want = np.asarray(im.convert("RGB"))
        assert np.array_equal(np.asarray(load_image(path)), want)  # open_clip's .convert('RGB')
    with Image.open(inputs["RGBA"][0]) as im:
        assert im.mode == "RGBA"
        want = np.asarray(im)[..., :3]  # alpha dropped, like open_clip (no compositing)
    assert np.array_equal(np.asarray(load_image(inputs["RGBA"][0])), want)
    with Image.open(inputs["CMYK"][0]) as im:
        assert im.mode == "CMYK"
    cmyk = np.asarray(load_image(inputs["CMYK"][0])).astype(int)
    assert np.abs(cmyk - skdata.chelsea()).mean() < 6


def test_16bit_png_is_rescaled_not_clipped(inputs):
    with Image.open(inputs["16-bit PNG"][0]) as im:
        assert im.mode.startswith("I")
    got = np.asarray(load_image(inputs["16-bit PNG"][0]))
    assert np.array_equal(got[..., 0], skdata.camera())  # camera * 257 / 257, exactly


def test_animated_gif_first_frame(inputs):
    got = np.asarray(load_image(inputs["animated GIF"][0]))
    assert got.shape == (48, 64, 3)
    r, g, b = got.reshape(-1, 3).mean(0)
    assert r > 150 and g < 80 and b < 80  # the red first frame


def test_exif_orientation_is_applied(inputs):
    path = inputs["EXIF-rotated photo"][0]
    with Image.open(path) as raw:
        assert raw.size == (300, 451)  # stored sideways
    got = load_image(path)
    assert got.size == (451, 300)
    assert np.abs(np.asarray(got).astype(int) - skdata.chelsea()).mean() < 4


def test_pil_limit_warning_zone_loads_and_hard_limit_errors(tmp_path, monkeypatch):
    """Pillow warns above MAX_IMAGE_PIXELS (we load) and refuses above twice it (ImageError)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    ok, bomb = tmp_path / "big.png", tmp_path / "bigger.png"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(ok)      # 60k pixels: warning zone
    Image.new("RGB", (400, 300), (10, 20, 30)).save(bomb)    # 120k pixels: over 2x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert load_image(ok).size == (300, 200)
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)


def test_in_memory_inputs():
    coffee = skdata.coffee()
    assert np.array_equal(np.asarray(load_image(coffee)), coffee)
    assert np.array_equal(np.asarray(load_image(skdata.camera()))[..., 2], skdata.camera())
    assert np.array_equal(np.asarray(load_image(coffee[..., :1])), np.repeat(coffee[..., :1], 3, 2))
    assert np.array_equal(np.asarray(load_image(coffee / 255.0)), coffee)
    assert np.array_equal(np.asarray(load_image(coffee.astype(np.uint16) * 257)), coffee)
    rgba = np.dstack([coffee, np.zeros(coffee.shape[:2], np.uint8)])
    assert np.array_equal(np.asarray(load_image(rgba)), coffee)
    pil = Image.fromarray(coffee).convert("P")
    assert load_image(pil).mode == "RGB" and pil.mode == "P"  # the caller's image is not changed
    buf = io.BytesIO()
    Image.fromarray(coffee).save(buf, "PNG")
    assert np.array_equal(np.asarray(load_image(buf.getvalue())), coffee)
    assert np.array_equal(np.asarray(load_image(io.BytesIO(buf.getvalue()))), coffee)
    assert np.array_equal(np.asarray(load_image(memoryview(buf.getvalue()))), coffee)
    for bad, match in [(coffee.transpose(2, 0, 1), "channel-first"), (coffee * 2.0, r"\[0, 1\]"),
                       (np.zeros((0, 5, 3), np.uint8), "no pixels"), (np.zeros((6, 6, 5), np.uint8), "not an image"),
                       (np.full((4, 4), np.nan), "NaN"), (12345, "unsupported input type"),
                       ("https://example.com/cat.jpg", "URLs")]:
        with pytest.raises(ImageError, match=match):
            load_image(bad)
    assert describe(b"abc") == "<bytes len=3>"


# ---- through the classifier and novic-run --------------------------------------------------------
def test_batch_with_every_odd_and_bad_input(inputs, classifier):
    names = list(inputs)
    results = classifier.classify([inputs[n][0] for n in names], topk=3, batch_size=5)
    assert [r.source for r in results] == [str(inputs[n][0]) for n in names]
    for name, r in zip(names, results):
        path, valid = inputs[name]
        if valid:
            assert r.error is None, (name, r.error)
            assert 1 <= len(r.labels) <= 3 and all(l.text for l in r.labels), name
        else:
            assert r.labels == [], name
            _one_clear_line(r.error, path)


def test_cli_reports_each_bad_file_and_exits_1(inputs, runtime_bundle):
    import json

    from typer.testing import CliRunner

    from novic.cli.run import app

    paths = [str(p) for p, _ in inputs.values()]
    out = CliRunner().invoke(app, ["--bundle", str(runtime_bundle.bundle), "--json", "--topk", "2", *paths])
    assert out.exit_code == 1, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["source"] for r in rows] == paths
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    bad = [str(p) for p, valid in inputs.values() if not valid]
    assert len(errors) == len(bad)
    for path, line in zip(bad, errors):
        assert path in line
    for row, (path, valid) in zip(rows, inputs.values()):
        assert (row["error"] is None) == valid and (len(row["labels"]) == 2) == valid


def test_file_objects_text_mode_and_empty(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(skdata.chelsea()).save(path)
    with open(path) as text_mode, pytest.raises(ImageError, match="opened in text mode; open the image with mode 'rb'"):
        load_image(text_mode)
    with open(path, "rb") as binary:
        assert load_image(binary).size == (451, 300)
    with pytest.raises(ImageError, match=r"empty data \(0 bytes\)"):
        load_image(io.BytesIO(b""))
