"""The offline image recipe: decode anything ImageNet contains, shorter side 256, centre 256x256 crop."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines import imaging
from pipelines.imaging import DecodeError, ImageRecipe


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 128.0)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (256, 256), (20, 15), (8, 8), (1000, 257)])
def test_resize_center_crop_equals_resize_then_crop(w, h):
    img = _gradient(w, h)
    got = np.asarray(imaging.resize_center_crop(img, size=256)).astype(int)
    scale = 256 / min(w, h)
    rw, rh = max(256, round(w * scale)), max(256, round(h * scale))
    full = np.asarray(img.resize((rw, rh), Image.Resampling.BILINEAR)).astype(int)
    left, top = round((rw - 256) / 2), round((rh - 256) / 2)
    ref = full[top : top + 256, left : left + 256]
    assert got.shape == (256, 256, 3)
    assert np.abs(got - ref).max() <= 2  # same filter and scale; only the float box offsets differ


def test_center_crop_keeps_the_centre():
    # a wide image whose left and right thirds are red and blue, centre green: the crop must be green
    img = Image.new("RGB", (900, 300), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 300, 300))
    img.paste((0, 0, 255), (600, 0, 900, 300))
    out = np.asarray(imaging.resize_center_crop(img, size=256)).astype(int)
    inner = out[:, 2:-2]  # the outermost columns blend with their neighbours, as in a full resize
    assert (inner[:, :, 1] > 250).all() and (inner[:, :, 0] < 5).all() and (inner[:, :, 2] < 5).all()
    assert (out[:, 0, 0] > 0).all()  # ... which shows the filter really reads outside the crop box


def test_cmyk_grayscale_png_and_alpha_become_rgb():
    rgb = _gradient(300, 200)
    for data in (
        _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        _encode(rgb.convert("L"), "JPEG"),
        _encode(rgb, "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(rgb.convert("P"), "PNG"),
    ):
        img = imaging.decode(data)
        assert img.mode == "RGB" and img.size == (300, 200)
    cmyk = np.asarray(imaging.decode(_encode(rgb.convert("CMYK"), "JPEG", quality=95))).astype(int)
    assert np.abs(cmyk - np.asarray(rgb).astype(int)).mean() < 4  # colours survive the CMYK round trip


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"not an image at all", "identify"),
        (_encode(_gradient(300, 200))[:2000], "truncated"),
    ],
)
def test_undecodable_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        imaging.preprocess(data)


def test_draft_decodes_large_jpegs_reduced_but_equivalent():
    big = _gradient(3000, 2250)
    data = _encode(big, quality=92)
    drafted = imaging.decode(data, min_side=256)
    assert min(drafted.size) >= 256 and drafted.size[0] < 3000  # libjpeg scaled it down
    full, size_full = imaging.preprocess(data, ImageRecipe(draft=False, image_format="raw"))
    fast, size_fast = imaging.preprocess(data, ImageRecipe(draft=True, image_format="raw"))
    assert size_full == size_fast == (3000, 2250)  # the source size is reported, not the draft's
    diff = np.abs(np.frombuffer(full, np.uint8).astype(int) - np.frombuffer(fast, np.uint8).astype(int))
    assert diff.mean() < 2.0


def test_stored_formats_round_trip():
    data = _encode(_gradient(500, 375))
    raw, _ = imaging.preprocess(data, ImageRecipe(image_format="raw"))
    jpeg, _ = imaging.preprocess(data, ImageRecipe(image_format="jpeg", quality=95))
    a = imaging.decode_stored(raw, image_format="raw")
    b = imaging.decode_stored(jpeg, image_format="jpeg")
    assert a.shape == b.shape == (256, 256, 3) and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


def test_recipe_validates_its_parameters():
    with pytest.raises(ValueError, match="resample"):
        ImageRecipe(resample="nearest-ish")
    with pytest.raises(ValueError, match="image_format"):
        ImageRecipe(image_format="webp")
    with pytest.raises(ValueError, match="quality"):
        ImageRecipe(quality=0)
