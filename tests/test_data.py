"""The training input pipeline (``alexnet.data.ShardReader``) over a small dataset prepared with the real pipeline."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from alexnet.data import THREAD_PREFIX, Batch, ShardReader, choose_jpeg_decoder, jpeg_decoders, sample_jpeg
from pipelines import imaging, prepare

pytestmark = pytest.mark.slow

SIZES = {"train": 48, "val": 16}  # classes=4 x (12 train, 4 val)


def _rows(data: str, split: str) -> dict[str, tuple[int, bytes]]:
    """key -> (label, stored image bytes), straight from the Parquet files."""
    manifest = prepare.load_manifest(data)
    table = pq.ParquetDataset(prepare.shard_uris(data, manifest, split)).read(columns=["key", "label", "image"])
    return {k: (l, b) for k, l, b in zip(*(table.column(c).to_pylist() for c in ("key", "label", "image")))}


def _keys(reader: ShardReader) -> list[str]:
    return [k for batch in reader for k in batch.keys]


def _our_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _no_threads_left(timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _our_threads() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.02)
    return not _our_threads()


def test_shapes_and_dtypes(reader_shards):
    reader = ShardReader(reader_shards["jpeg"], "train", batch_size=8, shuffle=True)
    batches = list(reader)
    assert len(batches) == len(reader) == SIZES["train"] // 8
    batch = batches[0]
    assert isinstance(batch, Batch) and batch.keys is None
    assert batch.images.shape == (8, 3, 256, 256) and batch.images.dtype == torch.uint8
    assert batch.images.is_contiguous()
    assert batch.labels.shape == (8,) and batch.labels.dtype == torch.int64
    assert reader.num_classes == 4 and reader.image_format == "jpeg" and reader.image_size == 256


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_epoch_covers_every_row_once(reader_shards, world_size):
    rows = _rows(reader_shards["jpeg"], "val")
    seen, labels = [], {}
    for rank in range(world_size):
        reader = ShardReader(reader_shards["jpeg"], "val", batch_size=3, rank=rank, world_size=world_size,
                             shuffle=False, with_keys=True)
        count = 0
        for batch in reader:
            seen += batch.keys
            labels.update(zip(batch.keys, batch.labels.tolist()))
            count += 1
        assert count == len(reader)
    assert len(seen) == len(set(seen)) == len(rows) == SIZES["val"]  # no duplicates, no padding
    assert set(seen) == set(rows)
    assert labels == {k: label for k, (label, _) in rows.items()}


def test_plan_partitions_rows_for_many_world_sizes(reader_shards):
    """The manifest-only plan: without shuffling every row exactly once; shuffled, disjoint and equal sizes."""
    for world_size in range(1, 9):
        for shuffle in (False, True):
            covered: list[tuple[int, int, int]] = []
            sizes = []
            for rank in range(world_size):
                reader = ShardReader(reader_shards["jpeg"], "train", batch_size=1, rank=rank, world_size=world_size,
                                     shuffle=shuffle)
                pieces = reader._pieces(epoch=3)
                rows = [(p.unit.shard, p.unit.group, i) for p in pieces for i in range(p.start, p.stop)]
                covered += rows
                sizes.append(len(rows))
                assert reader.num_rows == len(rows)
            assert len(covered) == len(set(covered))
            if shuffle:
                assert set(sizes) == {SIZES["train"] // world_size}
            else:
                assert len(covered) == SIZES["train"]


def test_shuffled_epochs_are_reproducible_and_differ(reader_shards):
    def epoch_keys(epoch: int, seed: int = 0) -> list[str]:
        reader = ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=True, seed=seed, with_keys=True,
                             shuffle_buffer=16)
        reader.set_epoch(epoch)
        return _keys(reader)

    first = epoch_keys(0)
    assert epoch_keys(0) == first
    assert sorted(first) == sorted(_rows(reader_shards["jpeg"], "train"))  # one rank, 48 rows, batch 4: all of them
    assert epoch_keys(1) != first
    assert epoch_keys(0, seed=1) != first
    # the same batch pixels too, not just the same keys
    a = next(iter(ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=True)))
    b = next(iter(ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=True)))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_ranks_disjoint_with_equal_batch_counts(reader_shards):
    for world_size in (2, 3, 5):
        for epoch in (0, 1):
            keys, lengths = [], []
            for rank in range(world_size):
                reader = ShardReader(reader_shards["jpeg"], "train", batch_size=4, rank=rank, world_size=world_size,
                                     shuffle=True, with_keys=True, seed=7)
                reader.set_epoch(epoch)
                batches = list(reader)
                assert len(batches) == len(reader)
                assert all(len(b.keys) == 4 for b in batches)  # drop_last is the default when shuffling
                lengths.append(len(batches))
                keys += [k for b in batches for k in b.keys]
            assert len(set(lengths)) == 1 and lengths[0] == SIZES["train"] // world_size // 4
            assert len(keys) == len(set(keys))


@pytest.mark.parametrize(
    "split,batch_size,world_size,shuffle,drop_last,limit",
    [
        ("train", 5, 1, False, False, None),
        ("train", 5, 1, False, True, None),
        ("train", 7, 2, True, False, None),
        ("train", 7, 3, True, True, None),
        ("val", 4, 3, False, None, None),
        ("train", 4, 2, True, None, 10),
        ("val", 3, 1, False, None, 7),
    ],
)
def test_len_matches_iteration(reader_shards, split, batch_size, world_size, shuffle, drop_last, limit):
    for rank in range(world_size):
        reader = ShardReader(reader_shards["jpeg"], split, batch_size=batch_size, rank=rank, world_size=world_size,
                             shuffle=shuffle, drop_last=drop_last, limit=limit)
        sizes = [len(b.labels) for b in reader]
        assert len(sizes) == len(reader)
        assert sum(sizes) == reader.num_rows
        if limit is not None:
            assert reader.num_rows <= limit
        if reader.drop_last:
            assert set(sizes) <= {batch_size}


def test_limit(reader_shards):
    reader = ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=False, limit=10, with_keys=True)
    assert reader.num_rows == 10 and len(reader) == 3
    keys = _keys(reader)
    assert len(keys) == 10
    full = _keys(ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=False, with_keys=True))
    assert keys == full[:10]  # unshuffled, the limit keeps the first rows
    assert len(ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=True, limit=10)) == 2  # drop_last


@pytest.mark.parametrize("fmt,decoder,channels_last", [
    ("jpeg", "auto", False), ("jpeg", "pillow", False), ("raw", "auto", False),
    ("jpeg", "simplejpeg", False), ("jpeg", "simplejpeg", True), ("jpeg", "torchvision", True), ("raw", "auto", True),
])
def test_pixels_equal_decode_stored(reader_shards, fmt, decoder, channels_last):
    rows = _rows(reader_shards[fmt], "train")
    reader = ShardReader(reader_shards[fmt], "train", batch_size=8, shuffle=True, with_keys=True, decode_threads=2,
                         jpeg_decoder=decoder, channels_last=channels_last)
    assert reader.image_format == fmt
    # "auto" is the decoder measured fastest here among those giving Pillow's pixels
    assert reader.jpeg_decoder == (choose_jpeg_decoder()[0] if decoder == "auto" else decoder)
    checked = 0
    for batch in reader:
        for key, label, image in zip(batch.keys, batch.labels.tolist(), batch.images):
            stored_label, blob = rows[key]
            expected = imaging.decode_stored(blob, image_format=fmt)
            assert label == stored_label
            assert np.array_equal(image.permute(1, 2, 0).numpy(), expected), key
            checked += 1
        assert batch.images.shape == (len(batch.keys), 3, 256, 256)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        assert batch.images.is_contiguous(memory_format=memory_format)
    assert checked == SIZES["train"]


def test_auto_decoder_is_measured_and_pixel_identical():
    name, timings = choose_jpeg_decoder()
    assert "pillow" in timings and name in timings
    assert timings[name] == min(timings.values()) < float("inf")  # the fastest of those with Pillow's pixels
    blob = np.frombuffer(sample_jpeg(), dtype=np.uint8).copy()  # writable, as the reader's rows are
    decoders = jpeg_decoders()
    reference = decoders["pillow"](blob)
    assert np.array_equal(decoders[name](blob), reference)


def test_batches_still_held_are_not_overwritten(reader_shards):
    reader = ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=False, with_keys=True, prefetch=1)
    first = []
    for epoch in range(2):  # the second epoch reuses the memory of the batches dropped in the first
        kept = [(b.keys, b.images.clone(), b.images) for b in reader]
        if epoch == 0:
            first = [(keys, copy) for keys, copy, _ in kept]
        for keys, copy, images in kept:  # every batch held to the end is intact
            assert torch.equal(copy, images)
    again = list(ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=False, with_keys=True, prefetch=1))
    assert [(b.keys) for b in again] == [keys for keys, _ in first]
    assert all(torch.equal(b.images, copy) for b, (_, copy) in zip(again, first))


def test_reads_from_s3(reader_shards, s3_endpoint):
    from tests.conftest import upload_tree

    uri = upload_tree(Path(reader_shards["jpeg"]), "alexnet-data-reader", "prepared")
    local = ShardReader(reader_shards["jpeg"], "val", batch_size=5, shuffle=False, with_keys=True)
    remote = ShardReader(uri, "val", batch_size=5, shuffle=False, with_keys=True)
    for a, b in zip(local, remote, strict=True):
        assert a.keys == b.keys and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def test_abandoned_iterator_leaves_no_thread(reader_shards):
    reader = ShardReader(reader_shards["jpeg"], "train", batch_size=2, shuffle=True, prefetch=2, decode_threads=2)
    it = iter(reader)
    next(it)
    assert _our_threads()  # producer and decoders are running, the queue is full
    del it
    assert _no_threads_left()

    gen = iter(reader)
    next(gen)
    gen.close()
    assert _no_threads_left()

    with ShardReader(reader_shards["jpeg"], "val", batch_size=2, shuffle=False) as r:
        held = iter(r)
        next(held)
    assert _no_threads_left()  # closed by the with block although `held` is still referenced
    assert list(held) == []


def test_errors_reach_the_consumer_and_stop_the_threads(reader_shards, monkeypatch):
    reader = ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=False)

    def broken(out, blobs):
        raise ValueError("corrupt image")

    monkeypatch.setattr(reader, "decode_into", broken)
    with pytest.raises(ValueError, match="corrupt image"):
        next(iter(reader))
    assert _no_threads_left()


def test_argument_errors(reader_shards):
    with pytest.raises(ValueError, match="no split"):
        ShardReader(reader_shards["jpeg"], "test", batch_size=4, shuffle=False)
    with pytest.raises(ValueError, match="rank"):
        ShardReader(reader_shards["jpeg"], "train", batch_size=4, shuffle=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no full batch"):
        ShardReader(reader_shards["jpeg"], "val", batch_size=64, shuffle=True)
    with pytest.raises(prepare.PrepareError):
        ShardReader(str(Path(reader_shards["jpeg"]).parent / "missing"), "train", batch_size=4, shuffle=False)
