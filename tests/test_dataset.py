"""PreparedDataset: the manifest, its sha256 and the statistics read once, then handed to readers and stages."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines import prepare, stats
from pipelines.dataset import PrepareError, PreparedDataset, manifest_hash


@pytest.fixture()
def copied(train_data, tmp_path) -> str:
    """A private copy of the prepared 10-class set (the tests delete its files)."""
    out = tmp_path / "prepared"
    shutil.copytree(train_data, out)
    return str(out)


def test_open_reads_the_manifest_and_its_sha256_from_the_same_bytes(copied):
    raw = (Path(copied) / "manifest.json").read_bytes()
    dataset = PreparedDataset.open(copied, stats=True)
    assert dataset.manifest == json.loads(raw) and dataset.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    # one definition of the hash, whichever module it is called from
    assert manifest_hash(copied) == prepare.manifest_hash(copied) == dataset.manifest_sha256
    assert dataset.num_classes == 10 and dataset.splits == ["train", "val"] and dataset.name == "imagenet"
    assert dataset.stats == stats.load_stats(copied)[0]
    assert np.array_equal(dataset.mean_image(), stats.load_stats(copied)[1])
    assert PreparedDataset.of(dataset) is dataset and PreparedDataset.of(dataset, stats=True) is dataset


def test_it_travels_as_plain_json_without_the_mean_image_or_credentials(copied, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-SECRET-of-the-test")
    dataset = PreparedDataset.open(copied, stats=True)
    text = json.dumps(dataset.to_dict())
    assert "s3-SECRET-of-the-test" not in text and len(text) < 100_000  # no 786 KB mean image inside
    assert PreparedDataset.from_dict(json.loads(text)) == dataset


def test_readers_and_stages_use_the_opened_dataset_without_reading_its_manifest_again(copied):
    from alexnet.data import ShardReader
    from alexnet.transfer import load_images

    dataset = PreparedDataset.open(copied, stats=True)
    (Path(copied) / "manifest.json").unlink()  # what is left to read are the shards
    reader = ShardReader(dataset, "val", batch_size=16, shuffle=False)
    batches = list(reader)
    assert sum(len(b.labels) for b in batches) == reader.num_rows == dataset.manifest["splits"]["val"]["rows"] > 0
    assert reader.data == copied and reader.num_classes == 10
    with pytest.raises(PrepareError, match="not a complete prepared dataset"):
        ShardReader(copied, "val", batch_size=16, shuffle=False)  # by URI it is read, and now it is missing
    with pytest.raises(KeyError, match="keys are not in"):
        load_images(dataset, ["no-such-key"])


def test_missing_files_are_clear_errors(copied):
    (Path(copied) / "stats.json").unlink()
    dataset = PreparedDataset.open(copied)
    with pytest.raises(FileNotFoundError, match="run `alexnet stats --data"):
        dataset.with_stats()
    with pytest.raises(FileNotFoundError, match="run `alexnet stats --data"):
        dataset.mean_image()
    (Path(copied) / "manifest.json").unlink()
    with pytest.raises(prepare.PrepareError, match="not a complete prepared dataset.*alexnet prepare imagenet"):
        PreparedDataset.open(copied)
