"""Which input path feeds a GPU: images/s per device from Parquet shards to a normalised bf16 batch on the device.

Three paths, each ``ShardReader`` -> the device -> ``Augmentation.train`` (random crop, flip, PCA lighting, mean
image) -> bfloat16 ``[N, 3, 224, 224]`` channels-last, the batch the AlexNet step takes:

- ``jpeg+nvjpeg``: JPEG shards, each batch decoded at once on the device (``ShardReader(decode_device="cuda")``:
  ``torchvision``'s batched nvJPEG kernel on the list of blobs), the uint8 batch never on the host;
- ``jpeg+cpu``: JPEG shards decoded by ``--threads`` host threads (the reader's measured-fastest libjpeg-turbo)
  into pinned channels-last batches, copied with ``non_blocking=True``;
- ``raw``: raw uint8 shards (``prepare --image-format raw``: 192 KB per image, no decoding), copied likewise.

Beside them, the AlexNet training step itself (``benchmarks/train_step.py``'s ``run_mode``, bf16 + channels-last
on CUDA): a path feeds the GPU when its rate is at least the step's (an H200 runs the step at 20k-40k images/s, so
the CPU paths need that many decoded images per second from the host's cores).

Without ``--data``/``--raw-data`` it writes a small synthetic ImageNet and prepares it both ways (Ray, a minute).
On a machine without a GPU it runs the CPU paths on the CPU with tiny sizes and says plainly that no GPU is
present: the numbers then only show the script works, not what a GPU would do.

Usage: ``python benchmarks/gpu_input.py [--data DIR] [--raw-data DIR] [--batch-size 256] [--batches 40]
[--threads N] [--device cuda]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alexnet.augment import IMAGENET_MEAN_RGB, Augmentation  # noqa: E402
from alexnet.data import ShardReader  # noqa: E402

NO_GPU = "no GPU present: the paths ran on the CPU with tiny sizes (a check that the script works, not a measurement)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augmentation(device: torch.device) -> Augmentation:
    mean_image = torch.tensor(IMAGENET_MEAN_RGB)[:, None, None].expand(3, 256, 256).clone()
    return Augmentation.imagenet_default(mean_image, normalize="mean_image", pixel_scale=255).to(device)


def measure_path(path: str, data: str, device: torch.device, *, batch_size: int, batches: int, warmup: int,
                 threads: int) -> dict:
    """images/s of one path, shards -> bf16 channels-last batch on ``device``, after ``warmup`` batches."""
    decode_device = device if path == "jpeg+nvjpeg" else "cpu"
    reader = ShardReader(data, "train", batch_size=batch_size, shuffle=True, decode_threads=threads,
                         pin_memory=device.type == "cuda", channels_last=True, decode_device=decode_device,
                         drop_last=True)
    aug = augmentation(device)
    generator = torch.Generator(device=device).manual_seed(0)
    done, images, start, epoch = 0, 0, None, 0
    checksum = torch.zeros((), device=device)
    with reader:
        while done < warmup + batches:
            reader.set_epoch(epoch)
            for batch in reader:
                if done == warmup:
                    synchronize(device)
                    start = time.perf_counter()
                x = batch.images.to(device, non_blocking=True)
                x = aug.train(x, generator).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
                checksum += x[:, 0, 0, 0].float().sum()  # the batch is used
                if done >= warmup:
                    images += x.shape[0]
                done += 1
                if done == warmup + batches:
                    break
            epoch += 1
        synchronize(device)
    seconds = time.perf_counter() - start if start is not None else float("nan")
    assert torch.isfinite(checksum).item()
    return {"path": path, "images_per_s": round(images / seconds, 1), "images": images,
            "decoder": "nvjpeg" if path == "jpeg+nvjpeg" else (reader.jpeg_decoder if path != "raw" else "none")}


def prepare_synthetic(work: Path, classes: int, per_class: int) -> tuple[str, str]:
    from pipelines import prepare
    from pipelines.imaging import ImageRecipe
    from pipelines.rayutil import init_local
    from pipelines.synth import write_synthetic_imagenet

    import ray

    write_synthetic_imagenet(work / "src", classes=classes, train_per_class=per_class, val_per_class=1, size=300,
                             quirks=False)
    started = not ray.is_initialized()
    if started:
        init_local(num_cpus=min(4, os.cpu_count() or 1), log_to_driver=False)
    try:
        out = {}
        for fmt in ("jpeg", "raw"):
            out[fmt] = str(work / fmt)
            prepare.prepare_imagenet(str(work / "src"), out[fmt], recipe=ImageRecipe(image_format=fmt))
    finally:
        if started:
            ray.shutdown()
    return out["jpeg"], out["raw"]


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    tiny = not gpu
    batch_size = args.batch_size or (256 if gpu else 8)
    batches = args.batches or (40 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    threads = args.threads or len(os.sched_getaffinity(0))
    work = None
    data, raw = args.data, args.raw_data
    if not data or not raw:
        work = Path(tempfile.mkdtemp(prefix="alexnet-gpu-input-"))
        per_class = max(4, (batch_size * (batches + warmup)) // 10 + 1) if not tiny else batch_size * 2
        data_s, raw_s = prepare_synthetic(work, classes=10 if not tiny else 2, per_class=per_class)
        data, raw = data or data_s, raw or raw_s
    try:
        paths = []
        for path in ("jpeg+nvjpeg", "jpeg+cpu", "raw"):
            if path == "jpeg+nvjpeg" and not gpu:
                paths.append({"path": path, "skipped": "needs a CUDA device (nvJPEG)"})
                continue
            try:
                paths.append(measure_path(path, raw if path == "raw" else data, device, batch_size=batch_size,
                                          batches=batches, warmup=warmup, threads=threads))
            except ValueError as e:  # e.g. a torchvision without the nvJPEG kernel
                paths.append({"path": path, "skipped": str(e)})
        from benchmarks.train_step import run_mode

        mode = "bf16+channels_last" if gpu else "fp32"
        step = run_mode(mode, device, batch_size if gpu else 4, 20 if gpu else 1, 5 if gpu else 1)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    for p in paths:
        if "images_per_s" in p:
            p["feeds_the_step"] = p["images_per_s"] >= step["images_per_s"]
    return {"benchmark": "gpu_input", "device": torch.cuda.get_device_name(device) if gpu else platform.processor()
            or "cpu", "gpu": gpu, "note": None if gpu else NO_GPU, "threads": threads, "batch_size": batch_size,
            "batches": batches, "paths": paths, "train_step": step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared JPEG dataset (default: a synthetic one, prepared here)")
    parser.add_argument("--raw-data", help="the same prepared with --image-format raw")
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--batches", type=int, help="timed batches per path")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--threads", type=int, help="host decode threads (default: this process's CPUs)")
    result = run(parser.parse_args(argv))
    if not result["gpu"]:
        print(f"NOTE: {NO_GPU}")
    print(f"device: {result['device']}; batch {result['batch_size']}, {result['threads']} host threads")
    print(f"{'path':14s} {'images/s':>10s}  feeds the step?")
    for p in result["paths"]:
        if "skipped" in p:
            print(f"{p['path']:14s} {'-':>10s}  skipped: {p['skipped']}")
        else:
            print(f"{p['path']:14s} {p['images_per_s']:10.0f}  {'yes' if p['feeds_the_step'] else 'no'} "
                  f"(decoder {p['decoder']})")
    step = result["train_step"]
    print(f"{'AlexNet step':14s} {step['images_per_s']:10.0f}  ({step['mode']}, benchmarks/train_step.py)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
