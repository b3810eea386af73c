"""The training input pipeline: prepared Parquet shards -> batches of uint8 ``[N, 3, 256, 256]`` images.

Each Ray Train worker builds a :class:`ShardReader` in its own process, in place of Ray Data's
``get_dataset_shard``: it reads the shards written by ``pipelines.prepare`` directly (local or ``s3://``, through
``pipelines.storage``), so on small machines the training workers do not compete with Ray Data tasks for CPUs.
Augmentation is not done here: the batches go to the training device as uint8 and
:class:`alexnet.augment.Augmentation` crops, flips, lights and normalises them there.

How rows are split between ranks
    The dataset is a sequence of *units*, one per (shard, row group), whose sizes come from the manifest (shard
    row counts and the ``row_group_rows`` it was written with), so every rank computes the same plan without
    reading any data. Each epoch the unit order is permuted with ``(seed, epoch)``, identically on every rank
    (not permuted when ``shuffle=False``); the rows of that sequence are then cut into ``world_size`` contiguous,
    disjoint ranges, one per rank. Cutting rows rather than whole units keeps the ranks balanced to a row:

    - ``shuffle=False`` (evaluation): rank ``r`` gets rows ``[r*T//W, (r+1)*T//W)``, so the union over ranks is
      every row exactly once, with no padding or duplication (the caller all-reduces its sums);
    - ``shuffle=True`` or ``drop_last=True`` (training): every rank gets exactly ``T // W`` rows (the
      ``T mod W`` left over are the last ones of the epoch's permuted order, so different rows each epoch), and
      every rank yields the same number of batches, whatever the epoch, so DDP never waits on an uneven rank.

    A unit is read by one rank, except the at most ``W - 1`` units that straddle a boundary between two ranks'
    ranges, which both read and each keeps its own rows of.

Shuffling
    Units in the permuted order stream through a buffer of ``shuffle_buffer`` rows, from which rows leave in
    random order (with ``seed, epoch, world_size, rank``). ``pipelines.prepare`` already shuffled the training
    rows across shards once, so the buffer only has to mix neighbouring row groups.

Decoding and prefetching
    A background thread reads row groups, shuffles and cuts batches; a pool of ``decode_threads`` threads
    decodes them into a preallocated (optionally pinned) uint8 tensor while the training step runs. JPEGs are
    decoded by libjpeg-turbo, through simplejpeg (libjpeg-turbo 3) or torchvision's kernel (the op behind
    ``torchvision.io.decode_jpeg``), or by Pillow: ``jpeg_decoder="auto"`` times the available ones once per
    process on a 256x256 quality-90 JPEG and takes the fastest of those that decode it to the same pixels as
    Pillow (:func:`choose_jpeg_decoder`; here simplejpeg, about 370 us per image on one core against
    torchvision's 450 and pillow-simd's 870, all pixel-identical and all releasing the GIL). Raw images are a
    reshape of the stored bytes. With ``channels_last=True`` the batch's memory is NHWC (still shaped
    ``[N, 3, H, W]``, ``torch.channels_last`` strides) and simplejpeg decodes straight into it; otherwise the
    HWC -> CHW copy (about 0.1 ms per image) happens in the decode threads. Batch memory is reused once the
    consumer has dropped every reference to a batch (:class:`alexnet.augment.BufferPool`: fresh pages would cost
    a page fault per 4 KB).
    ``decode_device="cuda"`` decodes each batch at once with nvJPEG instead (``Batch.images`` is then on that
    device; not exercised by the CPU test suite).

Memory is a few row groups, the shuffle buffer, and ``prefetch + 2`` batches, never the dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from alexnet.augment import BufferPool
from alexnet.jpeg import (JPEG_DECODERS, choose_jpeg_decoder, decode_pillow, jpeg_decoders, sample_jpeg, simplejpeg,
                          torchvision_jpeg_op)
from alexnet.prefetch import THREAD_PREFIX, Batch, EpochRun
from pipelines import storage
from pipelines.dataset import PreparedDataset

__all__ = ["THREAD_PREFIX", "Batch", "ShardReader", "choose_jpeg_decoder", "jpeg_decoders", "sample_jpeg"]

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class _Unit:
    """One row group of one shard: the unit of reading and of the epoch's permutation."""

    shard: int
    group: int
    rows: int


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Rows ``[start, stop)`` of a unit, read by this rank."""

    unit: _Unit
    start: int
    stop: int


@dataclasses.dataclass
class _RawBatch:
    blobs: list[np.ndarray]
    labels: list[int]
    keys: list[str] | None


def _default_threads() -> int:
    """The cores this process is meant to use: torch's intra-op threads, which Ray Train sets from the
    worker's CPU resources (``OMP_NUM_THREADS``)."""
    return max(1, torch.get_num_threads())


def _binary_rows(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """Each value of a binary column as its own writable uint8 array (copied: a row kept in the shuffle buffer
    must not keep its whole row group alive)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError("the image column holds nulls")
    offset_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if len(arr) else np.empty(0, np.uint8)
    return [data[offsets[i] : offsets[i + 1]].copy() for i in range(len(arr))]


class ShardReader:
    """Batches of one split of a prepared dataset for one rank: see the module docstring.

    Args:
        data: the prepared dataset: its URI (local folder or ``s3://``, holding ``manifest.json``) or a
            ``PreparedDataset`` already opened (its manifest is not read again).
        split: ``"train"`` or ``"val"``.
        batch_size: images per batch (per rank).
        rank, world_size: this worker's place among the data-parallel workers.
        shuffle: permute the units each epoch and shuffle rows through the buffer (training).
        seed: with the epoch (:meth:`set_epoch`), determines the order completely.
        drop_last: drop the last partial batch, and trim every rank to the same row count; defaults to
            ``shuffle``.
        shuffle_buffer: rows held for row-level shuffling (a few thousand: JPEG rows are ~30 KB, raw 192 KB).
        decode_threads: threads decoding JPEGs; defaults to ``torch.get_num_threads()``.
        pin_memory: allocate the batches in pinned memory (only where CUDA is available), for
            ``images.to(device, non_blocking=True)``.
        limit: at most this many rows per epoch for this rank (smoke runs, tests).
        with_keys: also return each row's ``key``.
        prefetch: batches kept ready ahead of the consumer (at least 1).
        decode_device: ``"cpu"``, or a CUDA device to decode each JPEG batch there with nvJPEG.
        jpeg_decoder: ``"simplejpeg"`` (libjpeg-turbo 3), ``"torchvision"`` (libjpeg-turbo through
            torchvision's kernel), ``"pillow"``, or ``"auto"``: the fastest of them on this machine among those
            that give Pillow's pixels (:func:`choose_jpeg_decoder`).
        channels_last: batches whose memory is NHWC (``images.is_contiguous(memory_format=torch.channels_last)``,
            the shape is still ``[N, 3, H, W]``): JPEGs decode straight into the batch, without the CHW copy, and
            a channels-last model takes them as they are. Default: contiguous NCHW.

    Attributes:
        num_rows: rows this rank yields per epoch (the same every epoch).
        image_format, image_size, num_classes: from the manifest.
    """

    def __init__(
        self,
        data: str | PreparedDataset,
        split: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool | None = None,
        shuffle_buffer: int = 4096,
        decode_threads: int | None = None,
        pin_memory: bool = False,
        limit: int | None = None,
        with_keys: bool = False,
        prefetch: int = 2,
        decode_device: str | torch.device = "cpu",
        jpeg_decoder: str = "auto",
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"jpeg_decoder must be one of {JPEG_DECODERS}, got {jpeg_decoder!r}")
        self._tv_decode = torchvision_jpeg_op()
        if jpeg_decoder == "torchvision" and self._tv_decode is None:
            raise ValueError("jpeg_decoder='torchvision': this torchvision has no JPEG decoding kernel")
        if jpeg_decoder == "simplejpeg" and simplejpeg is None:
            raise ValueError("jpeg_decoder='simplejpeg': simplejpeg is not installed (pip install simplejpeg)")
        self.jpeg_decoder: str = choose_jpeg_decoder()[0] if jpeg_decoder == "auto" else jpeg_decoder
        self.channels_last = bool(channels_last)
        self._pool = BufferPool(keep=prefetch + 4)
        dataset = PreparedDataset.of(data)  # an opened dataset is not read again
        self.dataset, self.data, self.split = dataset, dataset.uri, split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.drop_last = shuffle if drop_last is None else drop_last
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.decode_threads = decode_threads or _default_threads()
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.limit, self.with_keys, self.prefetch = limit, with_keys, prefetch
        self.decode_device = torch.device(decode_device)
        self.epoch = 0

        manifest = dataset.manifest
        if split not in manifest["splits"]:
            raise ValueError(f"{self.data} has no split {split!r}; it has {sorted(manifest['splits'])}")
        image = manifest["image"]
        self.image_format: str = image["format"]
        if self.image_format not in ("jpeg", "raw"):
            raise ValueError(f"{self.data}: unknown image format {self.image_format!r}")
        height, width = image["size"]
        if height != width:
            raise ValueError(f"{self.data}: expected square images, the manifest says {height}x{width}")
        self.image_size: int = int(height)
        self.num_classes: int = int(manifest["num_classes"])
        if self.decode_device.type != "cpu":
            if self.image_format != "jpeg":
                raise ValueError("decode_device applies to JPEG datasets only")
            if self._tv_decode is None or not hasattr(torch.ops.image, "decode_jpegs_cuda"):
                raise ValueError(f"decode_device={decode_device!r} needs torchvision's nvJPEG kernel")
        self._runs: weakref.WeakSet[EpochRun] = weakref.WeakSet()
        self._meta: dict[int, pq.FileMetaData] = {}  # shard footers, read once each
        self._meta_lock = threading.Lock()
        self._uris = dataset.shard_uris(split)
        self._units = self._plan_units(manifest)
        self._total = sum(u.rows for u in self._units)

        lo, hi = self._row_range()
        rows = hi - lo
        if limit is not None:
            rows = min(rows, limit)
        if self.drop_last:
            rows -= rows % batch_size
        self.num_rows: int = rows
        if self._total and rows == 0 and (shuffle or self.drop_last):
            raise ValueError(
                f"{split}: {self._total} rows over {world_size} ranks"
                + (f" (limit {limit})" if limit is not None else "")
                + f" leave no full batch of {batch_size} per rank; lower batch_size or pass drop_last=False"
            )

    # -- the plan (manifest only, no data read) -----------------------------------------------------------------

    def _plan_units(self, manifest: dict[str, Any]) -> list[_Unit]:
        group_rows = manifest.get("preprocessing", {}).get("row_group_rows")
        units = []
        for shard, entry in enumerate(manifest["splits"][self.split]["shards"]):
            rows = int(entry["rows"])
            if group_rows:  # pq.write_table(row_group_size=...) cuts a shard into groups of exactly that size
                sizes = [min(group_rows, rows - start) for start in range(0, rows, group_rows)]
            else:  # a manifest without the parameter: ask the footers
                meta = self._metadata(shard)
                sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            units += [_Unit(shard, group, n) for group, n in enumerate(sizes) if n]
        return units

    def _row_range(self) -> tuple[int, int]:
        """This rank's rows in the epoch's unit order."""
        total, world, rank = self._total, self.world_size, self.rank
        if self.shuffle or self.drop_last:
            per = total // world
            return rank * per, (rank + 1) * per
        return rank * total // world, (rank + 1) * total // world

    def _pieces(self, epoch: int) -> list[_Piece]:
        units = self._units
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
            units = [units[i] for i in order]
        lo, hi = self._row_range()
        pieces, pos = [], 0
        for unit in units:
            if pos >= hi:
                break
            start, stop = max(lo, pos), min(hi, pos + unit.rows)
            if start < stop:
                pieces.append(_Piece(unit, start - pos, stop - pos))
            pos += unit.rows
        return pieces

    # -- public --------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows (call on every rank with the same value)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self.num_rows // self.batch_size
        return math.ceil(self.num_rows / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        run = EpochRun(self, self.epoch)
        self._runs.add(run)
        return run.batches()

    def close(self) -> None:
        """Stop the threads of every iteration still running (an abandoned iterator stops them itself)."""
        for run in list(self._runs):
            run.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if hasattr(self, "_runs"):  # not when __init__ failed
                self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (
            f"ShardReader({self.data!r}, {self.split!r}, batch_size={self.batch_size}, rank={self.rank}, "
            f"world_size={self.world_size}, shuffle={self.shuffle}, rows={self.num_rows}, batches={len(self)})"
        )

    # -- reading -------------------------------------------------------------------------------------------------

    def _metadata(self, shard: int) -> pq.FileMetaData:
        with self._meta_lock:
            meta = self._meta.get(shard)
        if meta is None:
            fs, path = storage.filesystem(self._uris[shard])
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            with self._meta_lock:
                self._meta[shard] = meta
        return meta

    def _read_piece(self, piece: _Piece) -> pa.Table:
        unit = piece.unit
        meta = self._metadata(unit.shard)
        uri = self._uris[unit.shard]
        found = meta.row_group(unit.group).num_rows if unit.group < meta.num_row_groups else 0
        if found != unit.rows:
            raise RuntimeError(
                f"{uri}: row group {unit.group} holds {found} rows, the manifest implies {unit.rows}; "
                "the shard does not match its manifest (re-run prepare with --overwrite)"
            )
        columns = ["label", "image"] + (["key"] if self.with_keys else [])
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f, metadata=meta, pre_buffer=True).read_row_group(unit.group, columns=columns)
        return table.slice(piece.start, piece.stop - piece.start)

    def _rows(self, epoch: int, stop: threading.Event) -> Iterator[tuple[np.ndarray, int, str | None]]:
        for piece in self._pieces(epoch):
            if stop.is_set():
                return
            table = self._read_piece(piece)
            blobs = _binary_rows(table.column("image"))
            labels = table.column("label").to_numpy().tolist()
            keys = table.column("key").to_pylist() if self.with_keys else [None] * len(labels)
            del table
            yield from zip(blobs, labels, keys)

    def _shuffled_rows(self, epoch: int, stop: threading.Event) -> Iterator[tuple[np.ndarray, int, str | None]]:
        rows = self._rows(epoch, stop)
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from rows
            return
        rng = np.random.default_rng([self.seed, epoch, self.world_size, self.rank])
        capacity = self.shuffle_buffer
        buffer: list[tuple[np.ndarray, int, str | None]] = []
        draws = iter(())
        for row in rows:
            if len(buffer) < capacity:
                buffer.append(row)
                continue
            j = next(draws, None)
            if j is None:
                draws = iter(rng.integers(0, capacity, 4096).tolist())
                j = next(draws)
            yield buffer[j]
            buffer[j] = row
        for i in rng.permutation(len(buffer)).tolist():
            yield buffer[i]

    def raw_batches(self, epoch: int, stop: threading.Event) -> Iterator[_RawBatch]:
        remaining = self.num_rows
        batch = _RawBatch([], [], [] if self.with_keys else None)
        for blob, label, key in self._shuffled_rows(epoch, stop):
            if remaining == 0:
                break
            batch.blobs.append(blob)
            batch.labels.append(label)
            if batch.keys is not None:
                batch.keys.append(key)
            remaining -= 1
            if len(batch.blobs) == self.batch_size or remaining == 0:
                yield batch
                batch = _RawBatch([], [], [] if self.with_keys else None)
        if remaining and not stop.is_set():
            raise RuntimeError(
                f"{self.data} {self.split}: the shards held {remaining} rows fewer than the manifest says"
            )

    # -- decoding ------------------------------------------------------------------------------------------------

    def decode_into(self, out: np.ndarray, blobs: list[np.ndarray]) -> None:
        """Decode ``blobs`` into ``out``, a view of the batch: uint8 ``[len(blobs), S, S, 3]`` for channels-last
        batches, ``[len(blobs), 3, S, S]`` otherwise."""
        size = self.image_size
        hwc = self.channels_last
        shape = (size, size, 3)
        if self.image_format == "raw":
            for dst, blob in zip(out, blobs):
                if blob.size != size * size * 3:
                    raise ValueError(f"raw image of {blob.size} bytes, expected {size}x{size}x3")
                image = blob.reshape(shape)
                np.copyto(dst, image if hwc else image.transpose(2, 0, 1))
            return
        decoder = self.jpeg_decoder
        scratch = np.empty(shape, np.uint8) if decoder == "simplejpeg" and not hwc else None
        for dst, blob in zip(out, blobs):
            if decoder == "simplejpeg":
                height, width = simplejpeg.decode_jpeg_header(blob)[:2]
                if (height, width) != (size, size):
                    raise ValueError(f"stored image is {width}x{height}, the manifest says {size}x{size}")
                target = dst if hwc else scratch
                simplejpeg.decode_jpeg(blob, colorspace="RGB", buffer=target)
                if not hwc:
                    np.copyto(dst, scratch.transpose(2, 0, 1))
                continue
            if decoder == "torchvision":
                # mode 3 is ImageReadMode.RGB; the result is a CHW view of HWC memory
                image = self._tv_decode(torch.from_numpy(blob), 3, False).numpy().transpose(1, 2, 0)
            else:
                image = decode_pillow(blob)
            if image.shape != shape:
                raise ValueError(
                    f"stored image is {image.shape[1]}x{image.shape[0]}, the manifest says {size}x{size}"
                )
            np.copyto(dst, image if hwc else image.transpose(2, 0, 1))

    def new_batch(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        """(the batch tensor ``[n, 3, S, S]``, the array the decode threads write: NHWC or NCHW)."""
        size = self.image_size
        shape = (n, size, size, 3) if self.channels_last else (n, 3, size, size)
        if self.pin_memory:  # torch caches pinned blocks itself
            memory = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        else:
            memory = torch.from_numpy(self._pool.take(shape, np.uint8))
        images = memory.permute(0, 3, 1, 2) if self.channels_last else memory
        return images, memory.numpy()

    def decode_on_device(self, blobs: list[np.ndarray]) -> torch.Tensor:  # pragma: no cover - needs a GPU
        images = torch.ops.image.decode_jpegs_cuda([torch.from_numpy(b) for b in blobs], 3, self.decode_device)
        return torch.stack(images)
