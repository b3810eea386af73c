"""The statistics pass agrees with a brute-force float64 computation on the same shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import imaging, prepare, stats, storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def computed(prepared, ray_local):
    return stats.compute_stats(str(prepared), batch_size=7)  # batches that do not divide the shards


def _brute_force(prepared):
    manifest = prepare.load_manifest(str(prepared))
    blobs = pq.ParquetDataset(prepare.shard_uris(str(prepared), manifest, "train")).read()["image"].to_pylist()
    images = np.stack([imaging.decode_stored(b) for b in blobs]).astype(np.float64) / 255.0  # N,H,W,3
    pixels = images.reshape(-1, 3)
    return images, pixels


def test_stats_agree_with_numpy_float64(prepared, computed):
    images, pixels = _brute_force(prepared)
    mean = pixels.mean(axis=0)
    cov = np.cov(pixels, rowvar=False, bias=True)
    rel = lambda a, b: np.max(np.abs(np.asarray(a) - b) / np.maximum(np.abs(b), 1e-12))  # noqa: E731
    assert rel(computed["mean_rgb"], mean) < 1e-6
    assert rel(computed["cov"], cov) < 1e-6
    assert rel(computed["std_rgb"], pixels.std(axis=0)) < 1e-6
    eigval, eigvec = np.linalg.eigh(cov)
    assert rel(computed["eigval"], eigval[::-1]) < 1e-6
    assert computed["num_pixels"] == pixels.shape[0] and computed["num_images"] == images.shape[0]
    mean_image = stats.load_stats(str(prepared))[1]
    assert mean_image.dtype == np.float32 and mean_image.shape == (3, 256, 256)
    np.testing.assert_allclose(mean_image, images.mean(axis=0).transpose(2, 0, 1), rtol=1e-6, atol=1e-7)


def test_eigenvectors_are_columns_in_descending_order(computed):
    cov = np.array(computed["cov"])
    vec = np.array(computed["eigvec"])
    val = np.array(computed["eigval"])
    assert np.all(np.diff(val) <= 0) and np.all(val >= 0)
    np.testing.assert_allclose(vec.T @ vec, np.eye(3), atol=1e-10)
    for i in range(3):  # column i is the eigenvector of eigenvalue i
        np.testing.assert_allclose(cov @ vec[:, i], val[i] * vec[:, i], atol=1e-12)
        assert vec[np.argmax(np.abs(vec[:, i])), i] > 0  # documented sign convention


def test_files_follow_the_contract(prepared, computed):
    on_disk = json.loads((prepared / "stats.json").read_text())
    for key in ("mean_rgb", "std_rgb", "eigval", "eigvec", "num_pixels"):
        assert on_disk[key] == computed[key]
    assert on_disk["manifest_sha256"] == prepare.manifest_hash(str(prepared))
    assert np.load(prepared / "mean_image.npy").shape == (3, 256, 256)


def test_integer_sums_are_exact_whatever_the_batching():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    blobs = np.array([im.tobytes() for im in images], dtype=object)
    whole = stats.partial_sums({"image": blobs}, image_format="raw", size=8)
    parts = [stats.partial_sums({"image": blobs[i : i + 2]}, image_format="raw", size=8) for i in range(0, 5, 2)]
    for key in ("count", "sum_image", "sum_rgb", "sum_outer"):
        assert np.array_equal(whole[key], sum(p[key] for p in parts))
    s, mean_image = stats.finalize(5, whole["sum_image"][0], whole["sum_rgb"][0], whole["sum_outer"][0])
    flat = images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(s["cov"], np.cov(flat, rowvar=False, bias=True), rtol=1e-12)


def test_missing_manifest_is_a_clear_error(tmp_path, ray_local):
    with pytest.raises(prepare.PrepareError, match="not a complete prepared dataset.*alexnet prepare imagenet"):
        stats.compute_stats(str(tmp_path))


def test_stats_on_s3(prepared, computed, s3_endpoint, ray_local):
    import boto3

    from tests.conftest import upload_tree

    boto3.client("s3").create_bucket(Bucket="stats")
    uri = upload_tree(prepared, "stats", "prepared")
    remote = stats.compute_stats(uri)
    for key in ("mean_rgb", "cov", "eigval", "num_pixels"):
        assert remote[key] == computed[key]
    assert storage.exists(storage.join(uri, "mean_image.npy"))
