"""distill.imageio's RGB rules: the training reader and the edge runtime share them (distill.preprocess)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from distill import imageio, preprocess
from distill.imageio import MAX_SIDE, load_rgb, to_rgb


def _file(img: Image.Image, fmt: str = "PNG", **kw) -> io.BytesIO:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    buf.seek(0)
    return buf


def test_training_reader_is_the_edge_reader():
    assert MAX_SIDE == preprocess.MAX_SIDE == preprocess.DEFAULT_RGB["max_side"]
    rng = np.random.default_rng(0)
    a = np.dstack([rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), rng.integers(0, 256, (20, 24), dtype=np.uint8)])
    img = Image.fromarray(a, "RGBA")
    assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(preprocess.to_rgb(img)))
    assert np.array_equal(np.asarray(load_rgb(_file(img))), np.asarray(preprocess.open_rgb(_file(img))))


def test_transparency_goes_onto_white():
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    half = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 128))).getpixel((0, 0))
    assert all(126 <= c <= 128 for c in half)  # halfway between black and white
    assert to_rgb(Image.new("LA", (4, 4), (10, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (10, 255))).getpixel((0, 0)) == (10, 10, 10)


def test_palette_transparency_index_and_alpha_table():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    assert to_rgb(p).getpixel((0, 0)) == (0, 200, 0)  # no transparency: plain convert
    back = load_rgb(_file(p, transparency=1))
    assert back.mode == "RGB" and back.getpixel((0, 0)) == (255, 255, 255)
    back = load_rgb(_file(p, transparency=bytes([255, 0])))  # a tRNS alpha table
    assert back.getpixel((0, 0)) == (255, 255, 255)
    gif = load_rgb(_file(p, "GIF", transparency=1))
    assert gif.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode,dtype,lo,hi", [("I;16", np.uint16, 1000, 3000), ("I", np.int32, -5, 10_000_000),
                                              ("F", np.float32, -1.5, 0.25)])
def test_high_bit_depth_is_rescaled_by_its_range(mode, dtype, lo, hi):
    def make(a):
        return Image.fromarray(a) if mode == "I;16" else Image.fromarray(a, mode)

    a = np.linspace(lo, hi, 64).reshape(8, 8).astype(dtype)
    img = make(a)
    assert img.mode == mode
    g = np.asarray(to_rgb(img))
    assert g.shape == (8, 8, 3) and g.min() == 0 and g.max() == 255
    want = np.round((a.astype(np.float64) - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
    assert np.array_equal(g[..., 0], want) and np.array_equal(g[..., 1], want)
    assert np.asarray(to_rgb(make(np.full((4, 4), 7, dtype)))).max() == 0  # flat: all zeros, no division


def test_16bit_png_file_is_rescaled_not_clipped():
    a = np.linspace(0, 65535, 100).reshape(10, 10).astype(np.uint16)
    g = np.asarray(load_rgb(_file(Image.fromarray(a))))
    assert g.min() == 0 and g.max() == 255 and len(np.unique(g)) > 50


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "LAB", "HSV"])
def test_other_modes_use_pils_conversion(mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    img = rgb.convert("L").convert("1") if mode == "1" else rgb.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def test_cmyk_jpeg_file():
    img = Image.new("CMYK", (16, 12), (0, 255, 255, 0))  # red in CMYK
    r, g, b = load_rgb(_file(img, "JPEG", quality=95)).getpixel((8, 6))
    assert r > 200 and g < 60 and b < 60


def test_huge_images_are_reduced():
    png = Image.new("RGB", (MAX_SIDE + 904, 4000), (10, 20, 30))
    got = load_rgb(_file(png, compress_level=1))
    assert got.size == (2500, 2000)  # reduce(ceil(5000 / 4096) = 2)
    jpg = Image.new("L", (2 * MAX_SIDE + 200, 2 * MAX_SIDE + 100), 90)
    got = load_rgb(_file(jpg, "JPEG"))
    assert got.mode == "RGB" and max(got.size) <= MAX_SIDE  # JPEG draft decodes at 1/2
    # an opened, not yet decoded image follows the same rule through rgb_image
    assert preprocess.rgb_image(Image.open(_file(jpg, "JPEG"))).size == got.size


def test_unreadable_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_rgb(tmp_path / "empty.png")
    good = _file(Image.new("RGB", (64, 64), "red"), "PNG").getvalue()
    (tmp_path / "cut.png").write_bytes(good[:60])
    with pytest.raises((OSError, SyntaxError)):
        load_rgb(tmp_path / "cut.png")
    assert not imageio.ImageFile.LOAD_TRUNCATED_IMAGES
