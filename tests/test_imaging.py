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
    with pytest.raises(ValueError, match="decoder"):
        ImageRecipe(decoder="djpeg")


def _photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth structure plus pixel noise: every DCT coefficient matters, so any decoding difference shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / (17 + 9 * c) + c) * np.cos(yy / (23 + 5 * c)) for c in range(3)], -1)
    return Image.fromarray(np.clip(128 + 80 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "w,h,kw",
    [
        (500, 375, {}),  # the common ImageNet size: full scale
        (375, 500, {"subsampling": 0}),  # 4:4:4
        (501, 333, {"subsampling": 1}),  # 4:2:2, odd sizes (partial MCUs)
        (640, 480, {"progressive": True}),
        (3000, 2250, {"quality": 92}),  # draft: 1/8
        (1100, 530, {}),  # draft: 1/2, the scale from the shorter side
        (20, 15, {}),  # smaller than 256: upscaled
    ],
)
def test_turbo_decoder_gives_pillows_pixels(w, h, kw):
    data = _encode(_photo_like(w, h), **kw)
    for draft in (True, False):
        turbo, size_t = imaging.preprocess(data, ImageRecipe(draft=draft, image_format="raw", decoder="turbo"))
        pillow, size_p = imaging.preprocess(data, ImageRecipe(draft=draft, image_format="raw", decoder="pillow"))
        assert size_t == size_p == (w, h)
        assert turbo == pillow  # byte for byte
    assert not isinstance(imaging.decode_turbo(data, 256), bool)  # ... and libjpeg-turbo really decoded it
    for min_side in (None, 256):
        a, b = imaging.decode(data, min_side=min_side), imaging.decode(data, min_side=min_side, decoder="pillow")
        assert a.mode == b.mode == "RGB" and a.size == b.size
        assert a.tobytes() == b.tobytes()


def test_turbo_decoder_gives_pillows_pixels_for_grayscale_and_stored_jpegs():
    gray = _encode(_photo_like(300, 280).convert("L"))
    assert not isinstance(imaging.decode_turbo(gray, 256), bool)
    assert imaging.decode(gray).tobytes() == imaging.decode(gray, decoder="pillow").tobytes()
    raw, _ = imaging.preprocess(gray, ImageRecipe(image_format="raw"))
    assert raw == imaging.preprocess(gray, ImageRecipe(image_format="raw", decoder="pillow"))[0]
    # the stored JPEG: the same encoder on the same pixels
    a, _ = imaging.preprocess(_encode(_photo_like(500, 375)))
    b, _ = imaging.preprocess(_encode(_photo_like(500, 375)), ImageRecipe(decoder="pillow"))
    assert a == b


def test_turbo_decoder_leaves_unusual_files_to_pillow():
    rgb = _photo_like(300, 200)
    cmyk = _encode(rgb.convert("CMYK"), "JPEG", quality=95)
    png = _encode(rgb, "PNG")
    truncated = _encode(rgb)[:2000]
    for data in (cmyk, png, truncated, b"\xff\xd8\xff garbage"):
        assert imaging.decode_turbo(data, 256) in (False, True)  # not an image: Pillow decides
    assert imaging.decode(cmyk).tobytes() == imaging.decode(cmyk, decoder="pillow").tobytes()
    assert imaging.decode(png).tobytes() == rgb.tobytes()
    for decoder in ("turbo", "pillow"):  # the same reasons for what cannot be decoded
        with pytest.raises(DecodeError, match="truncated or corrupt: image file is truncated"):
            imaging.preprocess(truncated, ImageRecipe(decoder=decoder))
        with pytest.raises(DecodeError, match="identify"):
            imaging.preprocess(b"\xff\xd8\xff garbage", ImageRecipe(decoder=decoder))


def test_turbo_decoder_keeps_pillows_pixel_limit(monkeypatch):
    data = _encode(_photo_like(600, 400))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 240,000 pixels: over twice the limit
    for decoder in ("turbo", "pillow"):
        with pytest.raises(DecodeError, match="too many pixels"):
            imaging.preprocess(data, ImageRecipe(decoder=decoder))


def test_decoded_images_are_independent_of_later_decodes():
    a, b = _encode(_photo_like(500, 375, seed=1)), _encode(_photo_like(500, 375, seed=2))
    img = imaging.decode(a)
    before = img.tobytes()
    imaging.preprocess(b)
    imaging.decode(b)
    assert img.tobytes() == before


def test_draft_scale_follows_pillows_rule():
    assert imaging.draft_scale(500, 375, 256) == 1
    assert imaging.draft_scale(512, 600, 256) == 2
    assert imaging.draft_scale(1100, 530, 256) == 2
    assert imaging.draft_scale(3000, 2250, 256) == 8
    assert imaging.draft_scale(20, 15, 256) == 1
    assert imaging.draft_scale(3000, 2250, None) == 1


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white():
    wide = np.linspace(0, 65535, 256 * 256).reshape(256, 256).astype(np.uint16)
    data = _encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    expected = np.round(wide / 257).astype(int)
    for decoder in ("turbo", "pillow"):
        got = np.asarray(imaging.decode(data, decoder=decoder)).astype(int)
        assert got.shape == (256, 256, 3) and (got == expected[:, :, None]).all()


def _cut_with_eoi(data: bytes) -> bytes:
    """``data`` with the second half of its entropy-coded scan removed and a proper EOI marker appended."""
    scan = data.index(b"\xff\xda")
    return data[: scan + (len(data) - scan) // 2] + b"\xff\xd9"


def test_a_jpeg_cut_short_but_ending_in_eoi_is_rejected_by_both_decoders():
    good = _encode(_gradient(400, 300), quality=90)
    for data in (_cut_with_eoi(good), _cut_with_eoi(_encode(_gradient(400, 300).convert("CMYK"), "JPEG"))):
        # libjpeg fills the missing half with grey and Pillow returns that image
        assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[-1].std() == 0
        for decoder in ("turbo", "pillow"):
            with pytest.raises(DecodeError, match="truncated or corrupt: .*premature end of data segment"):
                imaging.preprocess(data, ImageRecipe(decoder=decoder))
    for decoder in ("turbo", "pillow"):  # the complete file still decodes
        imaging.preprocess(good, ImageRecipe(decoder=decoder))
