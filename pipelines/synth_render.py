"""The synthetic images and file containers behind ``pipelines.synth`` and ``pipelines.synth_transfer``.

Every image is a pure function of ``(seed, key)`` and its class ``Style`` (shape, colour, fill): objects drawn at a
random position, scale and rotation over a low-saturation textured ``backdrop`` with per-pixel noise
(``render``), stored as a JPEG or as the quirk its role calls for (``file_bytes``: PNG, CMYK, grayscale, empty,
truncated). Tars, gzip'd tars and MATLAB 5 files are written byte-identically between runs (fixed mtimes and
headers).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

#: Shapes that stay distinguishable after downscaling to a few dozen pixels and under rotation.
SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "star", "crescent")


#: Saturated colours, ordered so that the first classes are far apart in hue; the backgrounds are desaturated,
#: so colour alone already carries most of the class signal.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (35, 60, 220),
    "yellow": (235, 215, 20),
    "cyan": (20, 200, 210),
    "magenta": (210, 30, 200),
    "orange": (245, 130, 15),
    "azure": (30, 130, 245),
    "lime": (150, 230, 30),
    "violet": (130, 40, 220),
    "spring green": (20, 220, 130),
    "rose": (240, 40, 120),
}


#: Classes beyond len(SHAPES) * len(COLOURS) reuse the combinations with a hatched fill.
FILLS = ("solid", "hatched")


MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(FILLS)


JPEG_QUALITY = 90


#: Sizes of the quirk images: real ILSVRC-2012 holds photos several thousand pixels wide and a few icons.
LARGE_SIZES = ((3000, 2250), (2592, 1944))


TINY_SIZES = ((20, 15), (8, 8))


MAT_HEADER_TEXT = "MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Wed Jun  6 00:00:00 2012"


MAT_HEADER_TEXT_BYTES = 116


#: Fixed tar member mtime (2012-06-06), so that archives are byte-identical between runs.
TAR_MTIME = 1_338_940_800


@dataclass(frozen=True)
class Style:
    shape: str
    colour: str
    fill: str


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``parts``, stable across processes and platforms."""
    digest = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def class_style(index: int) -> Style:
    # Walks shapes fastest and shifts the colour with each shape, so the first len(SHAPES) classes differ in
    # both shape and colour, and every (shape, colour) pair is used once before any hatched fill.
    n_shapes, n_colours = len(SHAPES), len(COLOURS)
    fill, rest = divmod(index, n_shapes * n_colours)
    shape_index, round_ = rest % n_shapes, rest // n_shapes
    colour_index = (shape_index + round_) % n_colours
    return Style(SHAPES[shape_index], list(COLOURS)[colour_index], FILLS[fill])


def image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    longer = size * rng.uniform(0.85, 1.15)
    aspect = 4 / 3 if rng.random() < 0.6 else rng.uniform(1.0, 4 / 3)
    shorter = longer / aspect
    portrait = rng.random() < 0.25
    w, h = (shorter, longer) if portrait else (longer, shorter)
    return max(1, round(w)), max(1, round(h))


def polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple[float, float]]]:
    """Polygons (in image coordinates) that make up ``shape`` centred at (cx, cy) with radius ``r``."""
    if shape == "square":
        pts = [(math.cos(a) * r, math.sin(a) * r) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
        parts = [pts]
    elif shape == "triangle":
        parts = [[(math.cos(a) * r * 1.1, math.sin(a) * r * 1.1) for a in np.arange(3) * 2 * math.pi / 3]]
    elif shape == "cross":
        t = r * 0.32
        parts = [[(-r, -t), (r, -t), (r, t), (-r, t)], [(-t, -r), (t, -r), (t, r), (-t, r)]]
    elif shape == "star":
        parts = [[(math.cos(a) * rr, math.sin(a) * rr)
                  for a, rr in zip(np.arange(10) * math.pi / 5, [r, r * 0.45] * 5)]]
    elif shape == "stripes":
        bar = 2 * r / 5
        parts = [[(-r + k * bar, -r), (-r + (k + 1) * bar, -r), (-r + (k + 1) * bar, r), (-r + k * bar, r)]
                 for k in (0, 2, 4)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [[(cx + x * c - y * s, cy + x * s + y * c) for x, y in part] for part in parts]


def shape_mask(shape: str, w: int, h: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            draw.ellipse([cx - 0.6 * r, cy - 0.6 * r, cx + 0.6 * r, cy + 0.6 * r], fill=0)
        elif shape == "crescent":
            ox, oy = cx + 0.55 * r * math.cos(angle), cy + 0.55 * r * math.sin(angle)
            draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=0)
    else:
        for part in polygon(shape, cx, cy, r, angle):
            draw.polygon(part, fill=255)
    return mask


#: An object of a scene: its style, colour, (centre x, centre y, radius) relative to the image, and rotation.
SceneObject = tuple[Style, tuple[int, int, int], tuple[float, float, float], float]


#: A box (x0, y0, x1, y1), inclusive pixel coordinates.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Backdrop:
    """The random background of a scene: low-saturation blotches, mid-frequency texture, per-pixel noise."""

    coarse: np.ndarray
    medium_sd: float
    noise_sd: float


def random_backdrop(rng: np.random.Generator) -> Backdrop:
    grey = rng.uniform(70, 190)
    coarse = grey + rng.normal(0, 30, (4, 5, 1)) + rng.normal(0, 12, (4, 5, 3))  # low-saturation blotches
    medium_sd = rng.uniform(4, 12)
    return Backdrop(coarse, medium_sd, rng.uniform(3, 8))


def object_colour(rng: np.random.Generator, style: Style) -> tuple[int, int, int]:
    """The class colour of ``style``, jittered per image."""
    colour = np.array(COLOURS[style.colour]) * rng.uniform(0.85, 1.1) + rng.normal(0, 10, 3)
    r, g, b = (int(c) for c in np.clip(colour, 0, 255))
    return r, g, b


def paint(rng: np.random.Generator, w: int, h: int, backdrop: Backdrop, objects: list[SceneObject]
           ) -> tuple[Image.Image, list[Box | None]]:
    """A ``w`` x ``h`` scene of ``objects`` over ``backdrop``, and each object's box (None when it covers no
    pixel), painted in order (later objects in front)."""
    img = Image.fromarray(np.clip(backdrop.coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    # Mid-frequency texture so that the background is not a smooth gradient.
    gw, gh = max(2, w // 24), max(2, h // 24)
    texture = rng.normal(0, backdrop.medium_sd, (gh, gw)).astype(np.float32)
    texture_img = Image.fromarray(texture).resize((w, h), Image.Resampling.BILINEAR)

    boxes: list[Box | None] = []
    shorter = min(w, h)
    for style, colour, (rx, ry, rr), angle in objects:
        mask = shape_mask(style.shape, w, h, rx * w, ry * h, rr * shorter, angle)
        if style.fill == "hatched":
            period = max(2, int(rr * shorter / 3))
            rows = (np.arange(h)[:, None] // period) % 2 == 0
            hatch = np.asarray(mask) * np.broadcast_to(rows, (h, w))
            img.paste(colour, mask=mask)
            img.paste((25, 25, 25), mask=Image.fromarray(hatch.astype(np.uint8)))
        else:
            img.paste(colour, mask=mask)
        bbox = mask.getbbox()
        boxes.append(None if bbox is None else (bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1))

    pixels = np.asarray(img, dtype=np.float32) + np.asarray(texture_img)[..., None]
    pixels += rng.standard_normal((h, w, 3), dtype=np.float32) * backdrop.noise_sd
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), boxes


def render(seed: int, key: str, style: Style, role: str, size: int) -> tuple[Image.Image, list[Box]]:
    """The RGB image of ``key`` and its object boxes (x0, y0, x1, y1, inclusive).

    All random draws that do not depend on the image size come first, so a large or tiny quirk version shows
    the same scene as the ordinary image would.
    """
    rng = rng_for(seed, "image", key)
    w, h = image_size(rng, size)
    if role == "large":
        w, h = LARGE_SIZES[int(key.startswith("ILSVRC2012_val"))]
    elif role == "tiny":
        w, h = TINY_SIZES[int(key.startswith("ILSVRC2012_val"))]

    # Scene parameters, relative to the image so that they survive any rescaling.
    backdrop = random_backdrop(rng)
    places = []
    if rng.random() < 0.2:  # a second, smaller instance near an edge, as in multi-box ImageNet images
        side = rng.choice([-1, 1])
        places.append((0.5 + side * rng.uniform(0.27, 0.37), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.13)))
    places.append((rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.2, 0.34)))
    angles = rng.uniform(0, 2 * math.pi, len(places))
    colour = object_colour(rng, style)
    img, found = paint(rng, w, h, backdrop, [(style, colour, p, a) for p, a in zip(places, angles)])
    # an object too small to cover a pixel (tiny images): Kaggle rows still need one box
    boxes = [b for b in found if b is not None] or [(0, 0, w - 1, h - 1)]
    return img, boxes


def encode(seed: int, key: str, style: Style, role: str, size: int) -> tuple[bytes, list]:
    """The file bytes of ``key`` (a JPEG, or the quirk its role calls for) and its object boxes."""
    img, boxes = render(seed, key, style, role, size)
    return file_bytes(img, role), boxes


def file_bytes(img: Image.Image, role: str) -> bytes:
    """``img`` as the file its role calls for: a JPEG, or a PNG, CMYK, grayscale, empty or truncated file."""
    if role == "empty":
        return b""
    buf = io.BytesIO()
    if role == "png":
        img.save(buf, "PNG")
    elif role == "cmyk":
        # Pillow's RGB->CMYK is the naive inverse of its CMYK->RGB, so the class colour survives a reader's
        # convert("RGB").
        img.convert("CMYK").save(buf, "JPEG", quality=JPEG_QUALITY)
    elif role == "grayscale":
        img.convert("L").save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    if role == "truncated":
        # Half the entropy-coded data is gone: the header parses, decoding the pixels fails.
        data = data[: len(data) // 2]
    return data


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def tar_writer(fileobj: IO[bytes], *, gz: bool = False) -> Iterator[tarfile.TarFile]:
    """A GNU tar written to ``fileobj``; with ``gz`` gzip'd, its header timestamp pinned (byte-identical reruns)."""
    with contextlib.ExitStack() as stack:
        if gz:
            fileobj = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, mtime=0))
        yield stack.enter_context(tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT))


def tar_add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name.rstrip("/"))
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, TAR_MTIME, 0o755
    tar.addfile(info)


def mat_uint(values: int | list[int]) -> np.ndarray:
    # loadmat returns the storage type of the real meta.mat, the narrowest unsigned integer (uint8 for 1,
    # uint16 for 1300), not float64; mimic that so type-sensitive code meets the same values.
    arr = np.array(values, dtype=np.int64, ndmin=2)
    if arr.size == 0:
        return np.zeros((0, 0), dtype=np.uint8)  # MATLAB's [], as for the children of a leaf
    return arr.astype(np.uint8 if arr.max() < 256 else np.uint16)


def mat_bytes(variables: dict[str, Any]) -> bytes:
    """A MATLAB 5 .mat file of ``variables``, as MATLAB writes them (row vectors stay 1 x N)."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, format="5", oned_as="row")
    # The 116-byte text header carries the creation time; a fixed one keeps the file byte-identical.
    data = bytearray(buf.getvalue())
    data[:MAT_HEADER_TEXT_BYTES] = MAT_HEADER_TEXT.ljust(MAT_HEADER_TEXT_BYTES).encode("ascii")
    return bytes(data)
