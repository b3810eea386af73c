"""How far reduced-scale JPEG decoding moves the prepared 256x256 images from a full-scale decode.

For each image the stored 256x256 image (before JPEG re-encoding: raw RGB) is computed with full-scale decoding
(``--no-draft``) and compared, as the mean absolute difference per pixel and channel (0..255), with:

- ``pipeline``: the default recipe, libjpeg-turbo via simplejpeg at Pillow's draft scales (1/2, 1/4, 1/8);
- ``pillow draft``: ``--decoder pillow`` (must equal ``pipeline`` exactly; checked, and printed as a count);
- ``M/8 scales``: libjpeg-turbo's finer scales (7/8, 6/8, 5/8, 3/8...), the smallest keeping the shorter side
  >= 256 (what simplejpeg's ``min_height``/``min_width`` pick), then the same resize: rejected, see docs;
- for scale: the same full-scale image resized with bicubic instead of bilinear (what a filter choice moves).

Image sets: photographs shipped inside installed packages (matplotlib's and scikit-learn's sample photos; skipped
when missing), as shipped, as 500x375 / 375x500 crops re-encoded at quality 92 (ImageNet's common size), and
upscaled 4x (camera-sized, decoded at 1/4 or 1/8); and the synthetic corpus of ``prepare_throughput.py``.

Usage: ``python benchmarks/decode_quality.py [--images 400]``
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipelines import imaging  # noqa: E402
from pipelines.imaging import ImageRecipe  # noqa: E402

PHOTOS = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)


def _photos() -> list[bytes]:
    import importlib.util

    found = []
    for package, rel in PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / rel
            if path.exists():
                found.append(path.read_bytes())
    return found


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def image_sets(corpus_images: int) -> dict[str, list[bytes]]:
    photos = _photos()
    sets: dict[str, list[bytes]] = {}
    if photos:
        sets["photos as shipped (512x600, 640x427)"] = photos
        crops, large = [], []
        for data in photos:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            w, h = img.size
            for cw, ch in ((500, 375), (375, 500)):
                if w >= cw and h >= ch:
                    for x, y in ((0, 0), (w - cw, h - ch), ((w - cw) // 2, (h - ch) // 2), (61 % (w - cw + 1), 17 % (h - ch + 1))):
                        crops.append(_jpeg(img.crop((x, y, x + cw, y + ch))))
            large.append(_jpeg(img.resize((4 * w, 4 * h), Image.Resampling.LANCZOS)))
        sets["photo crops 500x375 / 375x500, q92"] = crops
        sets["photos upscaled 4x (~2500 px), q92"] = large
    if corpus_images:
        import prepare_throughput

        with tempfile.TemporaryDirectory() as tmp:
            prepare_throughput.make_corpus(Path(tmp), corpus_images, 25)
            corpus = [p.read_bytes() for p in prepare_throughput.distinct_images(Path(tmp))]
        sets[f"benchmark corpus ({len(corpus)} synthetic, 4% large)"] = corpus
        sets["benchmark corpus, large images only"] = [b for b in corpus if len(b) > 500_000]
    return sets


def _raw(data: bytes, **kw) -> np.ndarray:
    out, _ = imaging.preprocess(data, ImageRecipe(image_format="raw", **kw))
    return np.frombuffer(out, np.uint8).reshape(256, 256, 3).astype(np.int16)


def _m8(data: bytes) -> np.ndarray:
    import simplejpeg

    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=256, min_width=256)
    out = imaging.resize_center_crop(Image.fromarray(pixels))
    return np.asarray(out).astype(np.int16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="synthetic corpus images (0: photos only)")
    args = parser.parse_args()

    print(f"{'image set':44s} {'n':>4s} {'pipeline':>9s} {'max':>6s} {'M/8':>6s} {'max':>6s} {'bicubic':>8s} "
          f"{'pillow!=':>8s}")
    for name, blobs in image_sets(args.images).items():
        if not blobs:
            continue
        pipe, m8, bicubic, differ = [], [], [], 0
        for data in blobs:
            full = _raw(data, draft=False)
            ours = _raw(data)
            differ += int(not np.array_equal(ours, _raw(data, decoder="pillow")))
            pipe.append(np.abs(ours - full).mean())
            m8.append(np.abs(_m8(data) - full).mean())
            bicubic.append(np.abs(_raw(data, draft=False, resample="bicubic") - full).mean())
        print(f"{name:44s} {len(blobs):4d} {np.mean(pipe):9.2f} {np.max(pipe):6.2f} {np.mean(m8):6.2f} "
              f"{np.max(m8):6.2f} {np.mean(bicubic):8.2f} {differ:8d}")
    print("\nmean absolute difference to a full-scale decode, per pixel and channel (0..255); pipeline: the default "
          "(libjpeg-turbo at 1/1, 1/2, 1/4, 1/8 scale); M/8: libjpeg-turbo's finer scales (not used); bicubic: full "
          "scale, bicubic instead of bilinear; pillow!=: images where --decoder pillow differs from the default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
