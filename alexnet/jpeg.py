"""The JPEG decoders the shard reader can use, and the choice among them by measurement on this machine.

Every candidate must decode to Pillow's pixels (the ones ``alexnet prepare`` checked when it stored the image);
the fastest of those is chosen once per process (:func:`choose_jpeg_decoder`).
"""

from __future__ import annotations

import io
import math
import threading
import time
from typing import Any

import numpy as np
import torch

try:  # libjpeg-turbo 3 with a lean binding (a project dependency, pipelines.imaging uses it too)
    import simplejpeg
except ImportError:  # pragma: no cover - a partial install
    simplejpeg = None

JPEG_DECODERS = ("auto", "simplejpeg", "torchvision", "pillow")


def torchvision_jpeg_op() -> Any | None:
    """torchvision's libjpeg-turbo decode kernel, or None where torchvision lacks it.

    Called as the registered op rather than ``torchvision.io.decode_jpeg``: that wrapper only adds a
    ``DeprecationWarning`` per call (torchvision 0.29 deprecates its decoders in favour of TorchCodec) and
    argument checks done here once. When a later torchvision drops the op, Pillow takes over.
    """
    try:
        import torchvision.io.image as tv_image
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if not tv_image._has_image_ops():  # pragma: no cover
        return None
    return getattr(getattr(torch.ops, "image", None), "decode_jpeg", None)


def sample_jpeg(size: int = 256) -> bytes:
    """A photo-like 256x256 JPEG at prepare's quality 90 (smooth structure, texture, noise), encoded by Pillow."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([np.sin(xx / (23 + 9 * c) + c) * np.cos(yy / (31 + 7 * c) - c) for c in range(3)], -1)
    texture = rng.normal(0, 1, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
    pixels = np.clip(128 + 60 * base + 25 * texture + rng.normal(0, 9, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decode_pillow(blob: np.ndarray | bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(memoryview(blob))) as img:
        return np.asarray(img.convert("RGB"))


def jpeg_decoders() -> dict[str, Any]:
    """The JPEG decoders available here: name -> function of the encoded bytes (uint8 array) -> HWC uint8 RGB."""
    decoders: dict[str, Any] = {}
    if simplejpeg is not None:
        decoders["simplejpeg"] = lambda blob: simplejpeg.decode_jpeg(blob, colorspace="RGB")
    op = torchvision_jpeg_op()
    if op is not None:  # mode 3 is ImageReadMode.RGB; the result is a CHW view of HWC memory
        decoders["torchvision"] = lambda blob: op(torch.from_numpy(np.asarray(blob)), 3, False).numpy().transpose(1, 2, 0)
    decoders["pillow"] = decode_pillow
    return decoders


_CHOICE: dict[str, Any] = {}
_CHOICE_LOCK = threading.Lock()


def choose_jpeg_decoder(repeat: int = 12) -> tuple[str, dict[str, float]]:
    """The fastest JPEG decoder here that decodes a 256x256 quality-90 JPEG to the same pixels as Pillow, and the
    microseconds per image each decoder took (``inf`` for one whose pixels differ). Measured once per process
    (about 30 ms), on this machine's libraries; Pillow is the reference, and the fallback."""
    with _CHOICE_LOCK:
        if not _CHOICE:
            blob = np.frombuffer(sample_jpeg(), dtype=np.uint8).copy()  # writable, as the reader's rows are
            reference = decode_pillow(blob)
            timings: dict[str, float] = {}
            for name, decode in jpeg_decoders().items():
                try:
                    same = np.array_equal(decode(blob), reference)
                except Exception:  # noqa: BLE001 - a decoder that fails here is not chosen
                    same = False
                if not same:
                    timings[name] = math.inf
                    continue
                best = math.inf
                for _ in range(3):  # best of three rounds: the machine may be busy
                    start = time.thread_time()
                    for _ in range(repeat):
                        decode(blob)
                    best = min(best, (time.thread_time() - start) / repeat)
                timings[name] = round(best * 1e6, 1)
            _CHOICE.update(name=min(timings, key=timings.__getitem__), timings=timings)
        return _CHOICE["name"], dict(_CHOICE["timings"])
