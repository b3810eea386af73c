"""The offline image recipe of the paper, defined once: decode, RGB, shorter side to 256, centre 256x256 crop.

Krizhevsky et al. 2012, section 2: "we down-sampled the images to a fixed resolution of 256 x 256. Given a
rectangular image, we first rescaled the image such that the shorter side was of length 256, and then cropped out
the central 256x256 patch from the resulting image."

Used by the Ray Data preprocessing (``pipelines.prepare``), the statistics pass, the transfer datasets, the
benchmarks and the tests alike. Three speed-ups keep the output equivalent to the plain recipe:

- JPEGs are decoded by libjpeg-turbo 3 through ``simplejpeg`` (``ImageRecipe.decoder="turbo"``, the default):
  the same pixels as Pillow's decoder (tested), in less time (docs/benchmarks.md). Everything else (PNG, CMYK,
  12-bit, lossless, damaged or oversized JPEGs) goes through Pillow, which also words the rejects;
  ``decoder="pillow"`` decodes every file with Pillow. (One byte-level difference: Pillow copies a source JPEG's
  comment into the stored JPEG; the turbo path stores none.)
- JPEG *draft mode*: libjpeg decodes large images directly at 1/2, 1/4 or 1/8 scale (in the DCT domain) when the
  result still has a shorter side of at least 256, so a 3000x2000 photo is never fully decoded. Both decoders
  choose the same scale (Pillow's ``draft`` rule). libjpeg-turbo's other M/8 scales (e.g. 6/8, which would cover
  the common 500x375) are not used: they differ from a full decode by about 5/255 per pixel on photos and are not
  faster (entropy decoding dominates, and only the 8x8 IDCT has SIMD code).
- the resize only computes the 256x256 output pixels of the centre crop (Pillow's ``box`` argument), with the same
  filter and scale as resizing the whole image and then cropping.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libjpeg-turbo 3 with a lean Python binding; a project dependency, optional only for a partial install
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only without the dependency
    simplejpeg = None

RESAMPLE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
IMAGE_FORMATS = ("jpeg", "raw")
DECODERS = ("turbo", "pillow")
#: JPEG colour spaces libjpeg-turbo converts to RGB itself; CMYK/YCCK (Adobe) files go through Pillow.
_TURBO_COLORSPACES = frozenset({"YCbCr", "Gray", "RGB"})
#: Pillow's modes of 16-bit grayscale images ("I" in Pillow < 10 for PNGs).
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class DecodeError(ValueError):
    """An input file that is not a decodable image; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class ImageRecipe:
    """Parameters of the offline preprocessing; stored in the manifest so every output says how it was made."""

    size: int = 256  #: shorter side after resizing, and the side of the centre crop
    resample: str = "bilinear"  #: Pillow filter (antialiased when downscaling)
    draft: bool = True  #: let libjpeg decode large JPEGs at a reduced scale
    image_format: str = "jpeg"  #: "jpeg" (encoded bytes) or "raw" (HWC uint8 RGB bytes)
    quality: int = 90  #: JPEG quality of the stored 256x256 image
    decoder: str = "turbo"  #: JPEG decoder: "turbo" (libjpeg-turbo 3 via simplejpeg) or "pillow"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, not {self.resample!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, not {self.quality}")
        if self.size < 1:
            raise ValueError(f"size must be positive, not {self.size}")


def decode(data: bytes, *, min_side: int | None = None, decoder: str = "turbo") -> Image.Image:
    """Decode any image Pillow reads (JPEG, PNG, CMYK or grayscale JPEGs...) to an RGB image.

    With ``min_side``, JPEGs are decoded at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) whose shorter side is still
    >= ``min_side``. ``decoder`` is ``"turbo"`` (libjpeg-turbo via simplejpeg for plain JPEGs) or ``"pillow"``.
    Raises ``DecodeError`` with a short reason for empty, truncated, corrupt or unknown files.
    """
    img = _decode(data, min_side, decoder)[0]
    return img if img.mode == "RGB" else img.convert("RGB")


def draft_scale(width: int, height: int, min_side: int | None) -> int:
    """The denominator (1, 2, 4 or 8) of the DCT scale Pillow's ``draft`` picks for ``min_side`` (its rule)."""
    if not min_side:
        return 1
    scale = min(width // min_side, height // min_side)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


#: libjpeg's warning for entropy-coded data that ends at a marker before the last pixel (JWRN_HIT_MARKER): it fills
#: the rest with grey and carries on, and Pillow returns that image. A file cut short but ending in a proper EOI
#: marker is a reject, like one cut short without it (JWRN_JPEG_EOF, which Pillow rejects itself).
_CUT_SHORT = "premature end of data segment"


def _cut_short(error: Exception) -> DecodeError | None:
    """The reject for libjpeg's warning that the data ended early; ``None`` for any other error or warning."""
    return DecodeError(f"truncated or corrupt: {error}") if _CUT_SHORT in str(error).lower() else None


def _check_jpeg_complete(data: bytes, img: Image.Image) -> None:
    """Raise ``DecodeError`` when libjpeg-turbo finds the entropy-coded data of this JPEG (decoded by Pillow as
    ``img``) cut short.

    Pillow's decoder keeps libjpeg's warnings to itself and returns the grey-filled image, so a JPEG that may have
    been filled is read once more by libjpeg-turbo (at 1/8 scale, one channel: the entropy decoding is the cost).
    The fill runs from the cut to the end of a sequential JPEG, so only images whose last row is flat from its
    middle on (and progressive ones, whose later scans refine the whole image) are read again.
    """
    if simplejpeg is None:
        return
    if not img.info.get("progressive") and not img.info.get("progression"):
        w, y = img.width, img.height - 1
        first = img.getpixel((w // 2, y))
        # 8 samples of the row's right half (a few microseconds; a crop of the row costs about 20 times more)
        if any(img.getpixel((w // 2 + (w - 1 - w // 2) * i // 7, y)) != first for i in range(1, 8)):
            return
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        out = "CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY"
        simplejpeg.decode_jpeg(data, colorspace=out, min_height=1, min_width=1, strict=True)
    except ValueError as e:
        if (reject := _cut_short(e)) is not None:
            raise reject from None


def decode_turbo(data: bytes, min_side: int | None) -> tuple[Image.Image, tuple[int, int]] | bool:
    """libjpeg-turbo's decode of a plain 8-bit JPEG at Pillow's draft scale; ``False``/``True``: leave the file to
    Pillow (``True``: libjpeg-turbo decoded its data and found no sign of it being cut short).

    A JPEG whose data ends early is rejected (``DecodeError``). Anything else unusual (not a JPEG, CMYK, more pixels
    than Pillow allows, any other libjpeg error or warning) is left to Pillow: it decodes what it can as before and
    words the reasons of what it cannot.

    The image is an "RGBX" view of the decoded array (Pillow's own layout of RGB: no copy into Pillow, about 5%
    of a preprocessed image's time).
    """
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff":
        return False
    decoding = False
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _TURBO_COLORSPACES or width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            return False
        s = draft_scale(width, height, min_side)
        out_h, out_w = -(-height // s), -(-width // s)  # libjpeg's size at scale 1/s
        # simplejpeg picks the smallest M/8 scale whose size is >= the minimum: exactly 1/s here
        decoding = True
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGBX", min_height=out_h, min_width=out_w, strict=True)
    except ValueError as e:  # simplejpeg's error for anything libjpeg-turbo rejects or warns about
        if decoding and (reject := _cut_short(e)) is not None:
            raise reject from None
        return decoding
    h, w = pixels.shape[:2]
    if h < 1 or w < 1:
        return True
    return Image.frombuffer("RGBX", (w, h), pixels, "raw", "RGBX", 0, 1), (width, height)


def _decode(data: bytes, min_side: int | None, decoder: str = "turbo") -> tuple[Image.Image, tuple[int, int]]:
    """(RGB or RGBX image, size of the source as stored in the file); draft mode may return a smaller image."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    checked = False
    if decoder == "turbo":
        decoded = decode_turbo(data, min_side)
        if not isinstance(decoded, bool):
            return decoded
        checked = decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            source_size = img.size
            if min_side and img.format == "JPEG":
                img.draft("RGB", (min_side, min_side))
            img.load()
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can identify") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DecodeError(f"too many pixels: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's errors for truncated/corrupt data
        raise DecodeError(f"truncated or corrupt: {e}") from None
    if img.width < 1 or img.height < 1:
        raise DecodeError(f"degenerate size {img.width}x{img.height}")
    if img.format == "JPEG" and not checked:
        _check_jpeg_complete(data, img)
    if img.mode in _SIXTEEN_BIT:
        # 16-bit grayscale (PNG): convert("RGB") would clip every value above 255 to white; scale 0..65535 instead
        wide = np.asarray(img).astype(np.uint32).clip(0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode != "RGB":
        # CMYK JPEGs, grayscale, palette and alpha PNGs all end as plain RGB (alpha dropped, as libjpeg would).
        img = img.convert("RGB")
    return img, source_size


def resize_center_crop(img: Image.Image, *, size: int = 256, resample: str = "bilinear") -> Image.Image:
    """Scale so the shorter side is ``size``, keep the central ``size`` x ``size`` patch."""
    w, h = img.size
    scale = size / min(w, h)
    # Dimensions the whole image would have after rescaling, and the centre crop in those coordinates
    # (torchvision's CenterCrop rounding), mapped back to the source for Pillow's box resize.
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = round((rw - size) / 2), round((rh - size) / 2)
    sx, sy = w / rw, h / rh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), RESAMPLE_FILTERS[resample], box=box)


def encode(img: Image.Image, *, image_format: str = "jpeg", quality: int = 90) -> bytes:
    """An RGB (or RGBX: the padding is dropped) image -> stored bytes."""
    if image_format == "raw":
        return (img if img.mode == "RGB" else img.convert("RGB")).tobytes()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def preprocess(data: bytes, recipe: ImageRecipe = ImageRecipe()) -> tuple[bytes, tuple[int, int]]:
    """Source file bytes -> (stored image bytes, original (width, height)). Raises ``DecodeError``."""
    img, source_size = _decode(data, recipe.size if recipe.draft else None, recipe.decoder)
    out = resize_center_crop(img, size=recipe.size, resample=recipe.resample)
    return encode(out, image_format=recipe.image_format, quality=recipe.quality), source_size


def decode_stored(blob: bytes, *, image_format: str = "jpeg", size: int = 256) -> np.ndarray:
    """A stored (prepared) image -> HWC uint8 RGB array."""
    if image_format == "raw":
        return np.frombuffer(blob, dtype=np.uint8).reshape(size, size, 3)
    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"))


def pillow_info() -> dict[str, object]:
    """Which Pillow build and JPEG decoder do the work (pillow-simd versions end in .postN)."""
    import PIL
    from PIL import features

    return {
        "pillow": PIL.__version__,
        "simd": ".post" in PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "simplejpeg": getattr(simplejpeg, "__version__", None),
    }
