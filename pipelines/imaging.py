"""The offline image recipe of the paper, defined once: decode, RGB, shorter side to 256, centre 256x256 crop.

Krizhevsky et al. 2012, section 2: "we down-sampled the images to a fixed resolution of 256 x 256. Given a
rectangular image, we first rescaled the image such that the shorter side was of length 256, and then cropped out
the central 256x256 patch from the resulting image."

Used by the Ray Data preprocessing (``pipelines.prepare``), the statistics pass, the transfer datasets, the
benchmarks and the tests alike. Two speed-ups keep the output equivalent to the plain recipe:

- JPEG *draft mode*: libjpeg decodes large images directly at 1/2, 1/4 or 1/8 scale (in the DCT domain) when the
  result still has a shorter side of at least 256, so a 3000x2000 photo is never fully decoded.
- the resize only computes the 256x256 output pixels of the centre crop (Pillow's ``box`` argument), with the same
  filter and scale as resizing the whole image and then cropping.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
IMAGE_FORMATS = ("jpeg", "raw")


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

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, not {self.resample!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, not {self.quality}")
        if self.size < 1:
            raise ValueError(f"size must be positive, not {self.size}")


def decode(data: bytes, *, min_side: int | None = None) -> Image.Image:
    """Decode any image Pillow reads (JPEG, PNG, CMYK or grayscale JPEGs...) to an RGB image.

    With ``min_side``, JPEGs are decoded at the smallest DCT scale whose shorter side is still >= ``min_side``.
    Raises ``DecodeError`` with a short reason for empty, truncated, corrupt or unknown files.
    """
    return _decode(data, min_side)[0]


def _decode(data: bytes, min_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, size of the source as stored in the file); draft mode may return a smaller image."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
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
    if image_format == "raw":
        return img.tobytes()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def preprocess(data: bytes, recipe: ImageRecipe = ImageRecipe()) -> tuple[bytes, tuple[int, int]]:
    """Source file bytes -> (stored image bytes, original (width, height)). Raises ``DecodeError``."""
    img, source_size = _decode(data, recipe.size if recipe.draft else None)
    out = resize_center_crop(img, size=recipe.size, resample=recipe.resample)
    return encode(out, image_format=recipe.image_format, quality=recipe.quality), source_size


def decode_stored(blob: bytes, *, image_format: str = "jpeg", size: int = 256) -> np.ndarray:
    """A stored (prepared) image -> HWC uint8 RGB array."""
    if image_format == "raw":
        return np.frombuffer(blob, dtype=np.uint8).reshape(size, size, 3)
    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"))


def pillow_info() -> dict[str, object]:
    """Which Pillow build does the work (pillow-simd versions end in .postN)."""
    import PIL
    from PIL import features

    return {
        "pillow": PIL.__version__,
        "simd": ".post" in PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
    }
