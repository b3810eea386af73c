"""Training-set statistics in one streaming Ray Data pass: mean image, RGB mean/std, RGB covariance and its PCA.

The paper subtracts "the mean activity over the training set from each pixel" (section 2) and adds multiples of
the principal components of the RGB pixel values (section 4.1). Both need, over every pixel of every 256x256
training image, only sums: the per-position sum (mean image), the per-channel sum and the 3x3 sum of products.
Each Ray Data task returns those sums for its shard as exact integers (uint8 products summed in float64 are exact
below 2**53, then kept as int64), and the driver adds them up. The result is therefore exact and independent
of the number of workers or the order of batches; the covariance is formed from the integer sums with Python's
arbitrary-precision integers before the single division.

Outputs (``conventions.md``), all on pixels scaled to [0, 1]:
``stats.json``: ``mean_rgb`` (3), ``std_rgb`` (3), ``eigval`` (3, descending), ``eigvec`` (3x3, **columns** are
the eigenvectors, as in fb.resnet.torch; each column's largest-magnitude entry is made positive), ``cov`` (3x3),
``num_pixels``, ``num_images``; and ``mean_image.npy`` (float32, 3x256x256, CHW).
"""

from __future__ import annotations

import hashlib
import logging
import time
from fractions import Fraction
from typing import Any

import numpy as np

from pipelines import imaging, storage
from pipelines.dataset import MEAN_IMAGE, STATS, PreparedDataset, load_stats  # noqa: F401 - load_stats re-exported

log = logging.getLogger(__name__)



def partial_sums(batch: dict[str, np.ndarray], *, image_format: str, size: int) -> dict[str, np.ndarray]:
    """Exact sums over one batch of stored images (a Ray Data ``map_batches`` function)."""
    sum_image = np.zeros((size, size, 3), dtype=np.int64)
    sum_rgb = np.zeros(3, dtype=np.float64)
    sum_outer = np.zeros((3, 3), dtype=np.float64)
    for blob in batch["image"]:
        pixels = imaging.decode_stored(blob, image_format=image_format, size=size)
        sum_image += pixels
        flat = pixels.reshape(-1, 3).astype(np.float64)
        sum_rgb += flat.sum(axis=0)
        sum_outer += flat.T @ flat  # < 65536 px * 255**2 per image: exact in float64
    return {
        "count": np.array([len(batch["image"])], dtype=np.int64),
        "sum_image": sum_image[None],
        "sum_rgb": np.rint(sum_rgb).astype(np.int64)[None],
        "sum_outer": np.rint(sum_outer).astype(np.int64)[None],
    }


def shard_sums(task: dict[str, Any]) -> dict[str, np.ndarray]:
    """Exact sums over one Parquet shard, read a row group at a time (a Ray Data ``map`` function)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(task["uri"])
    size = task["size"]
    total = {"count": np.zeros(1, np.int64), "sum_image": np.zeros((1, size, size, 3), np.int64),
             "sum_rgb": np.zeros((1, 3), np.int64), "sum_outer": np.zeros((1, 3, 3), np.int64)}
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=task["batch_size"], columns=["image"]):
            blobs = np.array(batch.column("image").to_pylist(), dtype=object)
            for key, value in partial_sums({"image": blobs}, image_format=task["image_format"], size=size).items():
                total[key] += value
    return {key: value[0] for key, value in total.items()}


def finalize(count: int, sum_image: np.ndarray, sum_rgb: np.ndarray, sum_outer: np.ndarray) -> tuple[dict, np.ndarray]:
    """Integer sums -> (stats dict, mean image CHW float32), on pixels in [0, 1]."""
    if count == 0:
        raise ValueError("no images to compute statistics from")
    height, width = sum_image.shape[:2]
    n = count * height * width  # pixels
    s1 = [int(v) for v in sum_rgb]
    s2 = [[int(v) for v in row] for row in sum_outer]
    mean = [Fraction(s1[i], n * 255) for i in range(3)]
    # population covariance (divide by N) of pixel/255, from exact integer sums
    cov = [[Fraction(n * s2[i][j] - s1[i] * s1[j], n * n * 255 * 255) for j in range(3)] for i in range(3)]
    cov_f = np.array([[float(c) for c in row] for row in cov], dtype=np.float64)
    eigval, eigvec = np.linalg.eigh(cov_f)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    signs = np.sign(eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(3)])
    eigvec = eigvec * signs
    stats = {
        "mean_rgb": [float(m) for m in mean],
        "std_rgb": [float(np.sqrt(cov_f[i, i])) for i in range(3)],
        "eigval": eigval.tolist(),
        "eigvec": eigvec.tolist(),
        "eigvec_layout": "columns are eigenvectors, in eigval order",
        "cov": cov_f.tolist(),
        "num_pixels": n,
        "num_images": count,
        "pixel_scale": "[0, 1] (uint8 / 255)",
    }
    mean_image = (sum_image.astype(np.float64) / (count * 255.0)).transpose(2, 0, 1).astype(np.float32)
    return stats, mean_image


def compute_stats(
    data: str, *, split: str = "train", batch_size: int = 64, ray_address: str | None = None
) -> dict[str, Any]:
    """One distributed pass over ``split`` of the prepared dataset at ``data``; writes ``stats.json`` and
    ``mean_image.npy`` next to the manifest and returns the stats."""
    import ray.data

    from pipelines.rayutil import cpu_concurrency, ensure_ray

    started = time.time()
    dataset = PreparedDataset.open(data)
    manifest = dataset.manifest
    image_format, size = manifest["image"]["format"], manifest["image"]["size"][0]
    uris = dataset.shard_uris(split)
    ensure_ray(ray_address)

    # One task per shard: every shard is read exactly once, in parallel, a row group at a time.
    tasks = [{"uri": u, "image_format": image_format, "size": size, "batch_size": batch_size} for u in uris]
    sums = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(
        shard_sums,
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=cpu_concurrency(len(tasks))),
        runtime_env=storage.worker_env(),
    )
    count = 0
    sum_image = np.zeros((size, size, 3), dtype=np.int64)
    sum_rgb = np.zeros(3, dtype=np.int64)
    sum_outer = np.zeros((3, 3), dtype=np.int64)
    for part in sums.iter_batches(batch_size=None, batch_format="numpy"):
        count += int(part["count"].sum())
        sum_image += part["sum_image"].sum(axis=0)
        sum_rgb += part["sum_rgb"].sum(axis=0)
        sum_outer += part["sum_outer"].sum(axis=0)
    expected = manifest["splits"][split]["rows"]
    if count != expected:
        raise RuntimeError(f"read {count} images from {data} {split} but the manifest lists {expected}")

    stats, mean_image = finalize(count, sum_image, sum_rgb, sum_outer)
    stats.update(
        split=split,
        data=data,
        manifest_sha256=dataset.manifest_sha256,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        elapsed_s=round(time.time() - started, 3),
    )
    written = storage.write_numpy(storage.join(data, MEAN_IMAGE), mean_image)
    stats["mean_image_sha256"] = hashlib.sha256(written).hexdigest()
    storage.write_json(storage.join(data, STATS), stats)  # written last: its presence means both are complete
    log.info("wrote %s: eigval %s", storage.join(data, STATS), np.round(stats["eigval"], 6).tolist())
    return stats
