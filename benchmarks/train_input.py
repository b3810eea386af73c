"""Training input throughput, images/s per core, side by side in one run.

Two ways to feed the paper's training augmentation (random 224x224 crop, horizontal flip, PCA lighting, mean
subtraction), over the same ImageNet-like corpus (mostly ~500x375 photo-like JPEGs of ~110 KB, plus every
``--large-every``-th image several thousand pixels wide; ``make_corpus`` of ``prepare_throughput.py``):

- ``ours``: the corpus prepared once by ``pipelines.prepare`` into 256x256 JPEG Parquet shards, read by
  ``alexnet.data.ShardReader`` (in-process, ``--threads`` decode threads, prefetching), then
  ``Augmentation.train`` on the uint8 batch, on CPU tensors (in training it runs on the GPU instead);
- ``torchvision``: ``ImageFolder`` over the original JPEGs + ``DataLoader(num_workers=--threads)`` with the same
  augmentation the usual per-image way: ``Resize(256), CenterCrop(256), RandomCrop(224),
  RandomHorizontalFlip(), ToTensor(), Lighting(0.1, eigval, eigvec), Normalize(mean, std=1)``.

How cores are counted: this process is pinned (``sched_setaffinity``) to ``--threads`` CPUs before either
measurement, and DataLoader workers inherit the pinning, so each side can use at most ``--threads`` cores; ``per
core`` is images/s divided by ``--threads``. Ours runs ``--threads`` decode threads and ``torch.set_num_threads
(--threads)`` for the augmentation; theirs ``--threads`` worker processes (the main process only collates). The
CPU seconds each side actually consumed (``/proc`` accounting of the process and its workers) are printed too,
as images per CPU-second, a steadier figure on a shared machine. A third line, for information, times ours
without the augmentation: the CPU cost of the input side when the augmentation runs on the GPU. Preparing the
shards is a one-off cost (``benchmarks/prepare_throughput.py``) and is not timed here.

Target (issue acceptance): ours >= 4x torchvision per core.

Usage: ``python benchmarks/train_input.py [--images 400] [--large-every 25] [--threads 2] [--epochs 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alexnet.augment import IMAGENET_MEAN_RGB, IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC, Augmentation  # noqa: E402
from benchmarks.prepare_throughput import make_corpus  # noqa: E402

TARGET = 4.0
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a live process (all its threads) from /proc."""
    with open(f"/proc/{pid or os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)


def pin_cores(threads: int) -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads} but only {len(cpus)} CPUs are available")
    os.sched_setaffinity(0, cpus[:threads])
    return cpus[:threads]


def prepare_corpus(corpus: Path, out: Path, cpus: int) -> dict:
    import ray

    from pipelines.prepare import prepare_imagenet

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        return prepare_imagenet(str(corpus), str(out), layout="imagefolder")
    finally:
        ray.shutdown()


def augmentation() -> Augmentation:
    # The cost does not depend on the statistics' values: ImageNet's, and a mean image made of the channel means.
    mean_image = torch.tensor(IMAGENET_MEAN_RGB, dtype=torch.float32)[:, None, None].expand(3, 256, 256).clone()
    return Augmentation.imagenet_default(mean_image, normalize="mean_image")


def ours(data: Path, threads: int, batch_size: int, epochs: int, *, augment: bool = True) -> dict:
    from alexnet.data import ShardReader

    torch.set_num_threads(threads)
    aug = augmentation()
    generator = torch.Generator().manual_seed(0)
    reader = ShardReader(str(data), "train", batch_size=batch_size, shuffle=True, decode_threads=threads)
    checksum = 0.0
    for epoch in range(epochs + 1):  # epoch 0 warms up (thread pools, page cache, allocator)
        if epoch == 1:
            t, cpu = time.perf_counter(), cpu_seconds()
            images = 0
        reader.set_epoch(epoch)
        for batch in reader:
            x = aug.train(batch.images, generator) if augment else batch.images
            checksum += float(x[:, :, 0, 0].sum())  # use the output
            if epoch:
                images += len(batch.labels)
    return {"images": images, "seconds": time.perf_counter() - t, "cpu_seconds": cpu_seconds() - cpu,
            "decoder": reader.jpeg_decoder}


class Lighting:
    """AlexNet-style PCA lighting on a CHW float tensor, the way torchvision-based ImageNet scripts write it."""

    def __init__(self, alphastd: float, eigval, eigvec) -> None:
        self.alphastd = alphastd
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)  # columns are the eigenvectors

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd
        rgb = (self.eigvec * (alpha * self.eigval)[None, :]).sum(1)
        return img + rgb[:, None, None]


def torchvision_loader(corpus: Path, threads: int, batch_size: int, epochs: int) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.set_num_threads(1)  # the main process only collates; the workers do the work
    transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(256),
            transforms.RandomCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            Lighting(0.1, IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC),
            transforms.Normalize(IMAGENET_MEAN_RGB, (1.0, 1.0, 1.0)),
        ]
    )
    dataset = datasets.ImageFolder(str(corpus / "train"), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=threads, drop_last=True,
                        persistent_workers=True, generator=torch.Generator().manual_seed(0))
    checksum = 0.0
    it = None
    for epoch in range(epochs + 1):  # epoch 0 warms up (worker start, imports, page cache)
        it = iter(loader)
        if epoch == 1:
            workers = [w.pid for w in it._workers]  # noqa: SLF001 - CPU accounting of the worker processes
            t = time.perf_counter()
            cpu = cpu_seconds() + sum(cpu_seconds(p) for p in workers)
            images = 0
        for x, y in it:
            checksum += float(x[:, :, 0, 0].sum())
            if epoch:
                images += len(y)
    seconds = time.perf_counter() - t
    used = cpu_seconds() + sum(cpu_seconds(p) for p in workers) - cpu
    del it, loader
    return {"images": images, "seconds": seconds, "cpu_seconds": used}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--large-every", type=int, default=25, help="every N-th image is several thousand px wide")
    parser.add_argument("--threads", type=int, default=2, help="cores for each side (see the docstring)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--keep", help="write the corpus and shards here and keep them")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="alexnet-bench-input-"))
    corpus, shards = work / "corpus", work / "prepared"
    try:
        if not (corpus / "train").exists():
            info = make_corpus(corpus, args.images, args.large_every)
            print(f"corpus: {info['images']} JPEGs ({info['large']} large), mean {info['mean_kb']:.0f} KB, in {corpus}")
        t = time.perf_counter()
        manifest = prepare_corpus(corpus, shards, os.cpu_count() or 2)
        print(f"prepared {manifest['splits']['train']['rows']} rows into {shards} "
              f"({time.perf_counter() - t:.1f} s, not part of the comparison)")

        pinned = pin_cores(args.threads)
        print(f"pinned to CPUs {pinned}; batch {args.batch_size}; {args.epochs} timed epochs after a warm-up epoch")
        mine = ours(shards, args.threads, args.batch_size, args.epochs)
        reader_only = ours(shards, args.threads, args.batch_size, args.epochs, augment=False)
        theirs = torchvision_loader(corpus, args.threads, args.batch_size, args.epochs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [
        (f"ours: Parquet shards -> ShardReader ({mine['decoder']}) -> Augmentation.train", mine),
        ("torchvision: ImageFolder JPEGs -> DataLoader, per-image transforms", theirs),
        ("(ours without Augmentation.train: the CPU side when it runs on the GPU)", reader_only),
    ]
    print(f"\n{'pipeline':70s} {'images/s':>9s} {'cores':>6s} {'per core':>9s} {'img/CPU-s':>10s}")
    result = {"threads": args.threads, "batch_size": args.batch_size, "images": args.images}
    for (name, r), key in zip(rows, ("ours", "torchvision", "ours_reader_only")):
        rate, per_cpu_s = r["images"] / r["seconds"], r["images"] / r["cpu_seconds"]
        print(f"{name:70s} {rate:9.1f} {args.threads:6d} {rate / args.threads:9.1f} {per_cpu_s:10.1f}")
        result[key] = {"images_per_s": round(rate, 1), "per_core": round(rate / args.threads, 1),
                       "images_per_cpu_s": round(per_cpu_s, 1)}
    ratio = result["ours"]["per_core"] / result["torchvision"]["per_core"]
    cpu_ratio = result["ours"]["images_per_cpu_s"] / result["torchvision"]["images_per_cpu_s"]
    print(f"\nours / torchvision, per core:         {ratio:5.2f}x  (target >= {TARGET:.2f}x: "
          f"{'met' if ratio >= TARGET else 'NOT met'})")
    print(f"ours / torchvision, per CPU-second:   {cpu_ratio:5.2f}x")
    reader_ratio = result["ours_reader_only"]["images_per_cpu_s"] / result["torchvision"]["images_per_cpu_s"]
    print(f"ours without augmentation / torchvision, per CPU-second: {reader_ratio:5.2f}x  (augmentation on the GPU)")
    print(f"cores: both sides pinned to the same {args.threads} CPUs; ours = {args.threads} decode threads + "
          f"torch.set_num_threads({args.threads}) in one process, torchvision = num_workers={args.threads}")
    result.update(ratio_per_core=round(ratio, 2), ratio_per_cpu_s=round(cpu_ratio, 2),
                  ratio_reader_only_per_cpu_s=round(reader_ratio, 2), target=TARGET)
    print(json.dumps({"benchmark": "train_input", **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
