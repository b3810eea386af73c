"""AlexNet (the paper variant) training-step throughput: forward + backward + SGD step on synthetic inputs.

Each mode is a ``+``-joined set of switches:

- ``fp32`` or ``bf16``: plain float32, or ``torch.autocast(dtype=torch.bfloat16)`` around forward and loss
  (weights, gradients and the optimizer stay float32);
- ``channels_last``: model and input batch in NHWC memory format;
- ``compile``: ``torch.compile(model)`` (its compile time is reported as the warm-up time, not in the rate).

Defaults: on CUDA ``fp32, bf16, bf16+channels_last, bf16+channels_last+compile`` at batch 128; on CPU, where
only float32 is sensible, ``fp32, fp32+channels_last`` at a small batch and few steps (about a minute on 2
cores). The step is the real one: ``SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)``, cross-entropy over 1000
classes, model in train mode (dropout on), inputs ``[N, 3, 224, 224]`` float32 as the augmentation makes them.
On CUDA ``cudnn.benchmark`` is on, and float32 matmuls use the default (full float32) precision.

Prints a table and one JSON line (``{"benchmark": "train_step", ...}``) for recording.

Usage: ``python benchmarks/train_step.py [--device cuda|cpu] [--batch-size N] [--steps N] [--warmup N]
[--modes fp32,bf16+channels_last,...]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alexnet.model import build_model  # noqa: E402

SWITCHES = {"fp32", "bf16", "channels_last", "compile"}
DEFAULTS = {
    "cuda": {"batch_size": 128, "steps": 50, "warmup": 10,
             "modes": ["fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile"]},
    "cpu": {"batch_size": 32, "steps": 4, "warmup": 1, "modes": ["fp32", "fp32+channels_last"]},
}


def parse_mode(mode: str) -> set[str]:
    parts = set(mode.split("+"))
    unknown = parts - SWITCHES
    if unknown:
        raise SystemExit(f"mode {mode!r}: unknown switch(es) {sorted(unknown)}; use {sorted(SWITCHES)} joined by '+'")
    if {"fp32", "bf16"} <= parts:
        raise SystemExit(f"mode {mode!r}: fp32 and bf16 exclude each other")
    return parts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, device: torch.device, batch_size: int, steps: int, warmup: int) -> dict:
    switches = parse_mode(mode)
    memory_format = torch.channels_last if "channels_last" in switches else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(variant="paper").to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    step_model = torch.compile(model) if "compile" in switches else model
    x = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in switches)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    synchronize(device)
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - t
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(f"{mode}: non-finite loss {loss.item()}")
    result = {
        "mode": mode,
        "images_per_s": round(batch_size * steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "warmup_s": round(warmup_s, 2),
        "loss": round(float(loss.detach()), 4),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, help="untimed steps first (compilation, cudnn autotuning)")
    parser.add_argument("--modes", help="comma-separated, e.g. fp32,bf16+channels_last (see the docstring)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: torch's)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    batch_size = args.batch_size or defaults["batch_size"]
    steps = args.steps or defaults["steps"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    modes = args.modes.split(",") if args.modes else defaults["modes"]
    for mode in modes:
        parse_mode(mode)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"AlexNet (paper) training step on {device} ({name}), torch {torch.__version__}: batch {batch_size}, "
          f"{warmup} warm-up + {steps} timed steps per mode")

    results = []
    for mode in modes:
        results.append(run_mode(mode, device, batch_size, steps, warmup))
        r = results[-1]
        print(f"  {mode}: {r['images_per_s']:.1f} images/s", flush=True)

    base = results[0]["images_per_s"]
    print(f"\n{'mode':32s} {'images/s':>10s} {'ms/step':>9s} {'vs ' + modes[0]:>12s} {'warm-up s':>10s}"
          + (f" {'peak GiB':>9s}" if device.type == "cuda" else ""))
    for r in results:
        print(f"{r['mode']:32s} {r['images_per_s']:10.1f} {r['ms_per_step']:9.2f} {r['images_per_s'] / base:11.2f}x "
              f"{r['warmup_s']:10.2f}" + (f" {r['peak_memory_gib']:9.2f}" if device.type == "cuda" else ""))
    print(json.dumps({"benchmark": "train_step", "device": str(device), "device_name": name,
                      "torch": torch.__version__, "batch_size": batch_size, "steps": steps, "warmup": warmup,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
