"""One epoch of a shard reader as a pipeline of threads: a producer (read, shuffle, batch, submit decoding) and a
decode pool, handing batches to the consuming generator through a bounded queue (``prefetch`` batches ahead).

The reader (``alexnet.data.ShardReader``) supplies the steps: ``raw_batches`` (encoded rows of an epoch, in
batches), ``new_batch`` (the batch memory), ``decode_into`` (decode a slice of a batch on the CPU) and
``decode_on_device`` (nvJPEG).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from alexnet.data import ShardReader

#: Name prefix of every thread the reader starts (the tests look for leftovers by it).
THREAD_PREFIX = "alexnet-data"


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch: ``images`` uint8 ``[N, 3, H, W]`` RGB (pinned memory when asked for), ``labels`` int64 ``[N]``,
    ``keys`` the rows' ``key`` column when the reader was built with ``with_keys=True``."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str] | None = None


#: The producer's last item of an epoch.
END = object()


class Failure:
    """An exception of the producer thread, handed to the consumer, which re-raises it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class EpochRun:
    """One iteration over an epoch: a producer thread (read, shuffle, batch, submit decoding) and a decode pool,
    handing batches to the consuming generator through a bounded queue."""

    def __init__(self, reader: ShardReader, epoch: int) -> None:
        self.reader, self.epoch = reader, epoch
        self.stop = threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=reader.prefetch)
        self.pool: ThreadPoolExecutor | None = None
        self.thread: threading.Thread | None = None
        self.closed = False

    def batches(self) -> Iterator[Batch]:
        reader = self.reader
        if reader.decode_device.type == "cpu" and reader.image_format == "jpeg":
            self.pool = ThreadPoolExecutor(reader.decode_threads, thread_name_prefix=f"{THREAD_PREFIX}-decode")
        elif reader.decode_device.type == "cpu":  # raw: a copy per image, not worth more than a couple of threads
            self.pool = ThreadPoolExecutor(min(2, reader.decode_threads), thread_name_prefix=f"{THREAD_PREFIX}-decode")
        self.thread = threading.Thread(target=self._produce, name=f"{THREAD_PREFIX}-producer", daemon=True)
        self.thread.start()
        try:
            while not self.closed:
                item = self.queue.get()
                if item is END:
                    return
                if isinstance(item, Failure):
                    raise item.error
                images, labels, keys, futures = item
                for future in futures:
                    future.result()
                yield Batch(images, labels, keys)
        finally:
            self.close()

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        reader = self.reader
        try:
            for raw in reader.raw_batches(self.epoch, self.stop):
                if self.stop.is_set():
                    return
                labels = torch.tensor(raw.labels, dtype=torch.int64)
                futures: list[Future] = []
                if reader.decode_device.type != "cpu":
                    images = reader.decode_on_device(raw.blobs)
                else:
                    assert self.pool is not None
                    n = len(raw.blobs)
                    images, out = reader.new_batch(n)
                    # a few chunks per thread: balanced, without a future per image
                    chunk = max(1, math.ceil(n / (4 * reader.decode_threads)))
                    for start in range(0, n, chunk):
                        part = slice(start, start + chunk)
                        futures.append(self.pool.submit(reader.decode_into, out[part], raw.blobs[part]))
                if not self._put((images, labels, raw.keys, futures)):
                    return
            self._put(END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(Failure(e))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        try:  # unblock a producer waiting on a full queue
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        # a consumer suspended in this run (closed from outside, e.g. by ``with reader:``) ends its iteration
        try:
            self.queue.put_nowait(END)
        except queue.Full:  # pragma: no cover - drained above, and the producer has stopped
            pass
