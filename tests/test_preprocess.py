"""vqt_edge.preprocess on real files written with pillow: modes, EXIF, limits, damaged files."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vqt_edge import preprocess as pp
from vqt_edge.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def _expected(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.array([(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD)], dtype=np.float64)


@pytest.mark.parametrize("rgb", [(255, 0, 0), (0, 128, 255), (7, 7, 7)])
@pytest.mark.parametrize("size", [(50, 30), (1, 1)])
def test_constant_colour_normalizes_exactly(rgb, size):
    out = pp.preprocess(Image.new("RGB", size, rgb), 16, MEAN, STD)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    want = np.broadcast_to(_expected(rgb)[:, None, None], out.shape)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_resize_is_direct_bicubic_squash():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8))
    ref = np.asarray(img.resize((24, 24), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    ref = ((ref - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(pp.preprocess(img, 24, MEAN, STD), ref, rtol=1e-5, atol=1e-5)


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (8, 6), 1)
    img.putpalette([0, 0, 0, 10, 200, 30])
    img.paste(0, (0, 0, 4, 6))
    if transparent:
        img.info["transparency"] = 0
    return img


def _rgba() -> Image.Image:
    img = Image.new("RGBA", (8, 6), (0, 0, 255, 255))
    img.paste((255, 0, 0, 0), (0, 0, 4, 6))  # fully transparent red
    return img


RED_INK = (0, 255, 255, 0)  # CMYK

# (name, file suffix, image factory, expected RGB at the left edge, at the right edge)
MODE_CASES = [
    ("L", ".png", lambda: Image.new("L", (8, 6), 100), (100,) * 3, (100,) * 3),
    ("LA", ".png", lambda: Image.new("LA", (8, 6), (0, 128)), (127,) * 3, (127,) * 3),
    ("P", ".png", lambda: _palette(False), (0, 0, 0), (10, 200, 30)),
    ("P+transparency", ".png", lambda: _palette(True), (255, 255, 255), (10, 200, 30)),
    ("RGBA", ".png", _rgba, (255, 255, 255), (0, 0, 255)),
    ("CMYK", ".tif", lambda: Image.new("CMYK", (8, 6), RED_INK), (255, 0, 0), (255, 0, 0)),
    ("CMYK-jpeg", ".jpg", lambda: Image.new("CMYK", (8, 6), RED_INK), (255, 0, 0), (255, 0, 0)),
    ("1", ".png", lambda: Image.new("1", (8, 6), 1), (255,) * 3, (255,) * 3),
]


@pytest.mark.parametrize("name,suffix,make,left,right", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_modes_convert_to_rgb(tmp_path, name, suffix, make, left, right):
    path = tmp_path / f"img{suffix}"
    make().save(path)
    img = pp.load_rgb(path)
    px = _pixels(img)
    assert img.size == (8, 6)
    tol = 3 if suffix == ".jpg" else 1
    np.testing.assert_allclose(px[3, 0], left, atol=tol)
    np.testing.assert_allclose(px[3, 7], right, atol=tol)
    out = pp.preprocess(img, 4, MEAN, STD)
    assert out.shape == (3, 4, 4) and out.dtype == np.float32


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")  # the case this test is about
    assert _pixels(pp.load_rgb(path))[0, :, 0].tolist() == [0, 4, 128, 255]


def test_float_and_int32_tiffs_are_scaled(tmp_path):
    Image.fromarray(np.array([[0, 0.25, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[0, 70000, 140000]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert _pixels(pp.load_rgb(tmp_path / "f.tif"))[0, :, 1].tolist() == [0, 64, 128, 255]
    assert _pixels(pp.load_rgb(tmp_path / "i.tif"))[0, :, 1].tolist() == [0, 128, 255]


def test_float_outside_unit_range_and_nan():
    img = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan, np.inf]], dtype=np.float32))
    # min..max stretch over the finite values; non-finite values count as 0
    assert _pixels(pp.to_rgb(img))[0, :, 2].tolist() == [0, 128, 255, 128, 128]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "o6.jpg", exif=exif)
    px = _pixels(pp.load_rgb(tmp_path / "o6.jpg"))
    assert px.shape == (40, 20, 3)  # portrait now
    np.testing.assert_allclose(px[5, 10], (255, 0, 0), atol=4)  # the left half went to the top
    np.testing.assert_allclose(px[35, 10], (0, 0, 255), atol=4)


def test_corrupt_exif_loads_quietly(tmp_path):
    path = tmp_path / "bad_exif.jpg"
    broken = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"  # IFD runs past the end
    Image.new("RGB", (5, 3), (0, 0, 255)).save(path, exif=broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = pp.load_rgb(path)
    assert img.size == (5, 3)
    np.testing.assert_allclose(_pixels(img)[1, 2], (0, 0, 255), atol=4)


def test_over_the_pixel_cap_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    monkeypatch.setattr(pp, "MAX_PIXELS", 100)
    assert pp.load_rgb(tmp_path / "ok.png").size == (10, 10)
    with pytest.raises(pp.ImageTooLarge, match=r"big\.png.*20x20.*limit") as err:
        pp.load_rgb(tmp_path / "big.png")
    assert isinstance(err.value, pp.UnreadableImage) and isinstance(err.value, UserError)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_header_is_our_error_without_allocating(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(60_000, 60_000))  # 3.6 gigapixels claimed, 45 bytes on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(pp.ImageTooLarge, match="bomb.png"):
            pp.load_rgb(path)


def test_pillow_limits_surface_as_our_error_and_our_cap_rules(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # pillow warns above 100, fails above 200
    Image.new("RGB", (12, 12)).save(tmp_path / "warn.png")
    Image.new("RGB", (15, 15)).save(tmp_path / "fail.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pp.load_rgb(tmp_path / "warn.png").size == (12, 12)  # under our cap: no warning
        with pytest.raises(pp.ImageTooLarge, match="fail.png"):
            pp.load_rgb(tmp_path / "fail.png")


def _noise_jpeg(path: Path, size: int = 128) -> bytes:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def test_damaged_files_raise_unreadable_naming_the_path(tmp_path):
    data = _noise_jpeg(tmp_path / "whole.jpg")
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ["truncated.jpg", "text.png", "empty.jpg", "missing.jpg"]:
        with pytest.raises(pp.UnreadableImage) as err:
            pp.load_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and err.value.reason
    with pytest.raises(pp.UnreadableImage, match="truncated"):
        pp.load_rgb(tmp_path / "truncated.jpg")


def test_load_batch_matches_preprocess(tmp_path):
    paths = []
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (9 + i, 5), rgb).save(paths[-1])
    batch = pp.load_batch(paths, 8, MEAN, STD)
    assert batch.shape == (3, 3, 8, 8) and batch.dtype == np.float32
    for row, path in zip(batch, paths):
        np.testing.assert_array_equal(row, pp.preprocess(pp.load_rgb(path), 8, MEAN, STD))
    assert pp.load_batch([], 8, MEAN, STD).shape == (0, 3, 8, 8)


def test_bad_arguments_are_programming_errors():
    img = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError):
        pp.preprocess(img, 0, MEAN, STD)
    with pytest.raises(ValueError):
        pp.preprocess(img, 4, MEAN, (0.2, 0.0, 0.2))


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**31), 2**31 - 1, shape, dtype=np.int32))
    if mode == "F":
        a = rng.normal(0, 10.0 ** rng.integers(-3, 8), shape).astype(np.float32)
        a[rng.random(shape) < 0.05] = rng.choice([np.nan, np.inf, -np.inf])
        return Image.fromarray(a)
    img = Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8))  # RGBA
    if mode == "P+transparency":
        img = img.convert("P")
        img.info["transparency"] = int(rng.integers(0, 256))
        return img
    return img.convert(mode)


MODES = ["1", "L", "LA", "P", "P+transparency", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"]


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    image_size=st.integers(1, 48),
    seed=st.integers(0, 2**32 - 1),
)
def test_preprocess_any_mode_and_size_is_finite(mode, width, height, image_size, seed):
    out = pp.preprocess(_random_image(mode, width, height, seed), image_size, MEAN, STD)
    assert out.shape == (3, image_size, image_size) and out.dtype == np.float32
    assert np.isfinite(out).all()
    lo, hi = _expected((0, 0, 0)), _expected((255, 255, 255))
    assert (out >= lo[:, None, None] - 1e-5).all() and (out <= hi[:, None, None] + 1e-5).all()
