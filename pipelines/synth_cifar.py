"""A tiny, learnable CIFAR-10 in the exact format of the official python tarball ``cifar-10-python.tar.gz``.

The archive holds ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta, readme.html}``. Each batch is
a pickled dict ``{b'batch_label': bytes, b'labels': [int], b'data': uint8 ndarray [N, 3072], b'filenames':
[bytes]}`` (3072 = three 32x32 planes, R then G then B, rows top to bottom); ``batches.meta`` holds
``b'label_names'`` (10 bytes), ``b'num_cases_per_batch'`` and ``b'num_vis'`` (3072). The official files were
pickled by Python 2 with numpy 1, so their keys are byte strings and their arrays name
``numpy.core.multiarray._reconstruct``: this writer produces the same (see ``_pickle_like_the_official_files``).

Each class is one (colour, orientation) pair of a bar over a noisy background, drawn at a random offset and width,
so a small CNN learns it in a few epochs but not in one step. Everything is a pure function of the parameters.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 210))


def _image(rng: np.random.Generator, label: int) -> np.ndarray:
    """One 32x32 image of ``label``: [3, 32, 32] uint8."""
    img = rng.normal(120, 30, size=(3, 32, 32)) + rng.normal(0, 25, size=(3, 1, 1))
    colour = np.array(_COLOURS[label % len(_COLOURS)], dtype=np.float64)[:, None]
    width = int(rng.integers(4, 9))
    start = int(rng.integers(2, 30 - width))
    yy, xx = np.mgrid[0:32, 0:32]
    mask = (yy >= start) & (yy < start + width) if label < 5 else (xx >= start) & (xx < start + width)
    img[:, mask] = colour * rng.uniform(0.7, 1.0) + rng.normal(0, 15, size=(3, int(mask.sum())))
    return np.clip(img, 0, 255).astype(np.uint8)


def _pickle_like_the_official_files(obj: dict[bytes, Any]) -> bytes:
    """Protocol 2 names bytes through ``_codecs.encode``; protocol 3 stores them as bytes, as Python 2's str read
    back with ``encoding="bytes"``. numpy 2 names ``_reconstruct`` by its new module; the official files, by the
    old one."""
    data = pickle.dumps(obj, protocol=3)
    new, old = b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
    if data.count(new) != (1 if any(isinstance(v, np.ndarray) for v in obj.values()) else 0):
        raise RuntimeError("unexpected pickle layout from this numpy; cannot name _reconstruct as the official files")
    return data.replace(new, old)


def write_synthetic_cifar10(out: str | Path, *, per_batch: int = 100, test: int = 100, seed: int = 0) -> Path:
    """Write ``out/cifar-10-python.tar.gz``: five training batches of ``per_batch`` images and a test batch of
    ``test``, classes balanced and shuffled. Returns the tarball's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n, name in enumerate(names):
        count = test if name == "test_batch" else per_batch
        labels = rng.permutation(np.arange(count) % 10)
        data = np.stack([_image(rng, int(c)) for c in labels]).reshape(count, 3072)
        label = b"testing batch 1 of 1" if name == "test_batch" else f"training batch {n + 1} of 5".encode()
        files[name] = _pickle_like_the_official_files({
            b"batch_label": label, b"labels": [int(c) for c in labels], b"data": data,
            b"filenames": [f"{LABEL_NAMES[c]}_s_{n:02d}{i:05d}.png".encode() for i, c in enumerate(labels)]})
    files["batches.meta"] = _pickle_like_the_official_files({
        b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in LABEL_NAMES], b"num_vis": 3072})
    files["readme.html"] = b"<meta HTTP-EQUIV='REFRESH' content='0; url=http://www.cs.toronto.edu/~kriz/cifar.html'>"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        directory = tarfile.TarInfo("cifar-10-batches-py")
        directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 1244160000
        tar.addfile(directory)
        for name in sorted(files):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 1244160000
            tar.addfile(info, io.BytesIO(files[name]))
    path = out / "cifar-10-python.tar.gz"
    path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))  # mtime 0: the same bytes on every call
    return path
