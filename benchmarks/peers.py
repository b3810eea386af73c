"""The input pipeline side by side with FFCV and LitData, on one corpus, the same cores, interleaved runs.

Each system runs in its own virtual environment (FFCV and LitData need their own dependency pins; they are never
installed into the project's venv): ``--install`` builds them under ``--cache`` (default
``~/.cache/alexnet-peers``) with the commands that worked here, and a peer whose venv is missing or cannot be
built is skipped with the reason. FFCV needs libturbojpeg and OpenCV headers (``apt-get install -y
libturbojpeg0-dev libopencv-dev pkg-config``); ``--install`` runs that apt-get when the headers are missing and it
may (root), and says so otherwise.

The corpus is the generator of ``benchmarks/prepare_throughput.py`` (ImageNet-like JPEGs, every
``--large-every``-th one several thousand pixels wide). Every system stores the same 256x256 images (shorter side
256, centre crop, JPEG quality 90) and every measurement is one process pinned with ``taskset`` to the same
``--cores`` CPUs, with ``--cores`` decode threads or workers, batches of ``--batch-size``, a warm-up epoch, then
``--epochs`` timed epochs. The reading rows run ``--rounds`` rounds, each round every system once (in a rotated
order), and the table gives the median (and range) per row: the machine is shared and noisy, so only ratios within
one run mean something. Rows:

- write: ``alexnet prepare`` (Ray Data), FFCV ``DatasetWriter`` (``RGBImageField(write_mode="jpg",
  max_resolution=256, jpeg_quality=90)``), LitData ``optimize`` (the same Pillow recipe, JPEG bytes); timed once;
- read: uint8 256x256 batches, nothing else: ``ShardReader`` (channels-last, NHWC memory like FFCV's; and NCHW)
  against FFCV's ``SimpleRGBImageDecoder``;
- crop+flip: uint8 224x224 batches: ``ShardReader`` + ``Augmentation.crop_flip`` against FFCV's
  ``RandomResizedCropRGBImageDecoder`` and ``CenterCropRGBImageDecoder`` + ``RandomHorizontalFlip``, and LitData's
  ``StreamingDataLoader`` (torchvision decode + random crop + flip in its workers);
- full: ``ShardReader`` + ``Augmentation.train`` (crop, flip, PCA lighting, mean image, 0-255 pixels, float32);
  FFCV and LitData leave normalisation to the device.

Targets (issue 16): read >= 1.0x FFCV decode-only; crop+flip >= 1.2x FFCV RRC; full >= 0.85x our crop+flip.

Usage: ``python benchmarks/peers.py [--install] [--images 1280] [--rounds 3] [--cores 2] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path(os.environ.get("ALEXNET_PEERS_CACHE", Path.home() / ".cache" / "alexnet-peers"))
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
PEERS = {
    "ffcv": {
        "pip": [TORCH + ["numba", "opencv-python-headless", "terminaltables", "pytorch_pfn_extras", "fastargs",
                         "assertpy", "tqdm", "psutil"], ["--no-deps", "ffcv==1.0.2"]],
        "apt": ["libturbojpeg0-dev", "libopencv-dev", "pkg-config"],
        "pkg_config": ["libturbojpeg", "opencv4"],
        "import": "ffcv",
    },
    "litdata": {"pip": [TORCH + ["litdata"]], "apt": [], "pkg_config": [], "import": "litdata"},
}
TARGETS = {"read": 1.0, "crop+flip": 1.2, "full": 0.85}

# -- what runs inside each venv (one measurement per process, JSON on the last line) ------------------------------

WORKER = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
system, mode, data = args["system"], args["mode"], args["data"]
cores, batch, epochs = args["cores"], args["batch_size"], args["epochs"]
def cpu():
    t = os.times(); return t.user + t.system + t.children_user + t.children_system
def timed(make_iter, consume):
    for epoch in range(epochs + 1):  # epoch 0 warms up (threads, JIT, page cache)
        if epoch == 1:
            start, c0, images = time.perf_counter(), cpu(), 0
        for n in consume(make_iter(epoch)):
            if epoch:
                images += n
    return {"images": images, "seconds": time.perf_counter() - start, "cpu_seconds": cpu() - c0}

if system == "ours":
    sys.path.insert(0, args["root"])
    import torch
    from alexnet.augment import Augmentation, IMAGENET_MEAN_RGB
    from alexnet.data import ShardReader
    torch.set_num_threads(cores)
    reader = ShardReader(data, "train", batch_size=batch, shuffle=True, decode_threads=cores,
                         channels_last=mode != "read-nchw")
    mean_image = torch.tensor(IMAGENET_MEAN_RGB)[:, None, None].expand(3, 256, 256).clone()
    aug = Augmentation.imagenet_default(mean_image, normalize="mean_image", pixel_scale=255)
    g = torch.Generator().manual_seed(0)
    def make_iter(epoch):
        reader.set_epoch(epoch); return iter(reader)
    def consume(it):
        for b in it:
            x = b.images
            if mode == "crop+flip":
                x = aug.crop_flip(x, aug.sample_train_params(len(x), g))
            elif mode == "full":
                x = aug.train(x, g)
            yield len(x)
    out = timed(make_iter, consume); out["decoder"] = reader.jpeg_decoder
elif system == "ffcv":
    import numpy as np
    from ffcv.loader import Loader, OrderOption
    from ffcv.fields.decoders import (SimpleRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                      CenterCropRGBImageDecoder, IntDecoder)
    from ffcv.transforms import RandomHorizontalFlip
    image = {"read": [SimpleRGBImageDecoder()],
             "rrc": [RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip()],
             "crop": [CenterCropRGBImageDecoder((224, 224), 224 / 256), RandomHorizontalFlip()]}[mode]
    loader = Loader(data, batch_size=batch, num_workers=cores, order=OrderOption.RANDOM, drop_last=True,
                    os_cache=True, pipelines={"image": image, "label": [IntDecoder()]}, seed=0)
    def consume(it):
        for x, y in it:
            assert x.shape[1:3] == ((256, 256) if mode == "read" else (224, 224)), x.shape
            yield len(x)
    out = timed(lambda epoch: iter(loader), consume)
elif system == "litdata":
    import torch
    from torchvision.io import decode_jpeg
    from litdata import StreamingDataset, StreamingDataLoader
    torch.set_num_threads(1)
    class Crops(StreamingDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            x = decode_jpeg(torch.frombuffer(item["image"], dtype=torch.uint8))
            t, l = torch.randint(0, 33, (2,)).tolist()
            x = x[:, t:t + 224, l:l + 224]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            return x, item["label"]
    ds = Crops(data, shuffle=True, drop_last=True)
    loader = StreamingDataLoader(ds, batch_size=batch, num_workers=cores, drop_last=True)
    def make_iter(epoch):
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None; return iter(loader)
    def consume(it):
        for x, y in it:
            yield len(x)
    out = timed(make_iter, consume)
print(json.dumps(out))
'''

WRITE_FFCV = r'''
import json, sys, time
from PIL import Image
from ffcv.writer import DatasetWriter
from ffcv.fields import RGBImageField, IntField
args = json.loads(sys.argv[1])
items = [tuple(x) for x in json.load(open(args["items"]))]
def recipe(path):  # shorter side 256 (bilinear), centre 256x256: the paper's offline recipe in plain Pillow
    img = Image.open(path).convert("RGB"); w, h = img.size; s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    left, top = (img.width - 256) // 2, (img.height - 256) // 2
    return img.crop((left, top, left + 256, top + 256))
class Source:
    def __len__(self): return len(items)
    def __getitem__(self, i): return recipe(items[i][0]), items[i][1]
t = time.perf_counter()
writer = DatasetWriter(args["out"], {"image": RGBImageField(write_mode="jpg", max_resolution=256, jpeg_quality=90),
                                     "label": IntField()}, num_workers=args["cores"])
writer.from_indexed_dataset(Source())
print(json.dumps({"images": len(items), "seconds": time.perf_counter() - t}))
'''

WRITE_LITDATA = r'''
import io, json, sys, time
from PIL import Image
from litdata import optimize
args = json.loads(sys.argv[1])
items = [tuple(x) for x in json.load(open(args["items"]))]
def convert(item):
    path, label = item
    img = Image.open(path).convert("RGB"); w, h = img.size; s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    left, top = (img.width - 256) // 2, (img.height - 256) // 2
    buf = io.BytesIO(); img.crop((left, top, left + 256, top + 256)).save(buf, format="JPEG", quality=90)
    return {"image": buf.getvalue(), "label": label}
if __name__ == "__main__":
    t = time.perf_counter()
    optimize(fn=convert, inputs=items, output_dir=args["out"], num_workers=args["cores"], chunk_bytes="64MB",
             verbose=False)
    print(json.dumps({"images": len(items), "seconds": time.perf_counter() - t}))
'''

# -- install ----------------------------------------------------------------------------------------------------


def venv_python(cache: Path, peer: str) -> Path:
    return cache / peer / "bin" / "python"


def peer_status(cache: Path, peer: str) -> str | None:
    """None when the peer's venv imports it; else why not."""
    python = venv_python(cache, peer)
    if not python.exists():
        return f"no venv at {python.parent.parent} (run benchmarks/peers.py --install)"
    probe = subprocess.run([str(python), "-c", f"import {PEERS[peer]['import']}"], capture_output=True, text=True)
    if probe.returncode:
        return f"{python} cannot import {PEERS[peer]['import']}: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def install(cache: Path, peer: str) -> str | None:
    """Build the peer's venv under ``cache``; None on success, else the reason it was skipped."""
    spec = PEERS[peer]
    missing = [lib for lib in spec["pkg_config"]
               if subprocess.run(["pkg-config", "--exists", lib], capture_output=True).returncode]
    if missing and shutil.which("pkg-config"):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            print(f"[{peer}] apt-get install -y {' '.join(spec['apt'])} (missing: {missing})", flush=True)
            subprocess.run(["apt-get", "install", "-y", *spec["apt"]], env={**os.environ,
                           "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True)
        missing = [lib for lib in spec["pkg_config"]
                   if subprocess.run(["pkg-config", "--exists", lib], capture_output=True).returncode]
        if missing:
            return f"system libraries missing ({missing}): apt-get install -y {' '.join(spec['apt'])}"
    elif missing:
        return f"pkg-config not found; needs {' '.join(spec['apt'])}"
    venv = cache / peer
    if peer_status(cache, peer) is None:
        return None
    log = cache / f"{peer}-install.log"
    cache.mkdir(parents=True, exist_ok=True)
    print(f"[{peer}] building {venv} (log: {log})", flush=True)
    with open(log, "w") as out:
        if not venv_python(cache, peer).exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
        for packages in spec["pip"]:
            done = subprocess.run([str(venv_python(cache, peer)), "-m", "pip", "install", "-q", *packages],
                                  stdout=out, stderr=out)
            if done.returncode:
                return f"pip install {' '.join(packages)} failed (see {log})"
    return peer_status(cache, peer)


# -- measurements -----------------------------------------------------------------------------------------------


def run_json(cmd: list[str], cores: list[int], timeout: float = 900) -> dict:
    pinned = ["taskset", "-c", ",".join(map(str, cores))] + cmd if shutil.which("taskset") else cmd
    done = subprocess.run(pinned, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (rc {done.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


def prepare_ours(corpus: Path, out: Path, cores: int) -> dict:
    import ray

    from pipelines.prepare import prepare_imagenet

    for attempt in range(3):  # a busy machine can miss Ray's start-up deadline
        try:
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for the timeout
            if attempt == 2:
                raise
    t = time.perf_counter()
    try:
        manifest = prepare_imagenet(str(corpus), str(out), layout="imagefolder")
    finally:
        ray.shutdown()
    return {"images": manifest["splits"]["train"]["rows"], "seconds": time.perf_counter() - t}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help="build the peers' venvs under --cache first")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--images", type=int, default=1280, help="images in the corpus (distinct: images/--repeat)")
    parser.add_argument("--repeat", type=int, default=4, help="hard links per distinct synthetic JPEG")
    parser.add_argument("--large-every", type=int, default=25)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run, after a warm-up epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default="ffcv,litdata")
    parser.add_argument("--keep", type=Path, help="corpus and datasets here, reused by the next run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from benchmarks.prepare_throughput import make_corpus

    cpus = sorted(os.sched_getaffinity(0))
    if args.cores > len(cpus):
        raise SystemExit(f"--cores {args.cores} but only {len(cpus)} CPUs are available")
    cores = cpus[: args.cores]
    peers, skipped = [], {}
    for peer in [p for p in args.peers.split(",") if p]:
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}; known: {sorted(PEERS)}")
        reason = install(args.cache, peer) if args.install else peer_status(args.cache, peer)
        if reason:
            skipped[peer] = reason
            print(f"[{peer}] skipped: {reason}", flush=True)
        else:
            peers.append(peer)
    versions = {"ours": {"python": sys.version.split()[0]}}
    for peer in peers:
        probe = subprocess.run([str(venv_python(args.cache, peer)), "-m", "pip", "list", "--format=json"],
                               capture_output=True, text=True)
        found = {p["name"].lower(): p["version"] for p in json.loads(probe.stdout or "[]")}
        versions[peer] = {k: found.get(k) for k in (peer, "torch", "torchvision", "numba", "opencv-python-headless")
                          if found.get(k)}

    work = args.keep or Path(tempfile.mkdtemp(prefix="alexnet-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    results: dict[str, list[dict]] = {}
    writes: dict[str, dict] = {}
    try:
        if not (corpus / "train").exists():
            info = make_corpus(corpus, args.images // args.repeat, args.large_every, repeat=args.repeat)
            print(f"corpus: {info['images']} JPEGs ({info['unique']} distinct, {info['large']} large), "
                  f"mean {info['mean_kb']:.0f} KB", flush=True)
        files = sorted(corpus.glob("train/*/*.JPEG"))
        classes = sorted({p.parent.name for p in files})
        items = work / "items.json"
        items.write_text(json.dumps([[str(p), classes.index(p.parent.name)] for p in files]))
        common = {"cores": args.cores, "items": str(items)}
        data = {"ours": work / "prepared", "ffcv": work / "ffcv.beton", "litdata": work / "litdata"}
        if not (data["ours"] / "manifest.json").exists():
            writes["ours"] = prepare_ours(corpus, data["ours"], args.cores)
        for peer, script in (("ffcv", WRITE_FFCV), ("litdata", WRITE_LITDATA)):
            if peer in peers and not data[peer].exists():
                path = work / f"write_{peer}.py"
                path.write_text(script)
                try:
                    writes[peer] = run_json([str(venv_python(args.cache, peer)), str(path),
                                             json.dumps({**common, "out": str(data[peer])})], cores)
                except RuntimeError as e:
                    skipped[peer] = f"writing its dataset failed: {e}"
                    peers.remove(peer)
        for name, w in writes.items():
            print(f"write {name}: {w['images'] / w['seconds']:.0f} images/s", flush=True)

        worker = work / "worker.py"
        worker.write_text(WORKER)
        runs = [("ours", "read"), ("ours", "read-nchw"), ("ours", "crop+flip"), ("ours", "full")]
        runs += [("ffcv", m) for m in ("read", "rrc", "crop") if "ffcv" in peers]
        runs += [("litdata", "crop+flip")] if "litdata" in peers else []
        pythons = {"ours": Path(sys.executable), **{p: venv_python(args.cache, p) for p in peers}}
        loads = []
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = runs[r % len(runs):] + runs[: r % len(runs)]  # rotated: no system always first or last
            for system, mode in order:
                spec = {"system": system, "mode": mode, "data": str(data[system]), "cores": args.cores,
                        "batch_size": args.batch_size, "epochs": args.epochs, "root": str(ROOT)}
                try:
                    out = run_json([str(pythons[system]), str(worker), json.dumps(spec)], cores)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"round {r + 1}: {system} {mode} failed: {e}", flush=True)
                    continue
                rate = out["images"] / out["seconds"]
                results.setdefault(f"{system} {mode}", []).append({**out, "rate": rate})
                print(f"round {r + 1}: {system:8s} {mode:10s} {rate:7.0f} images/s  "
                      f"({out['images'] / max(out['cpu_seconds'], 1e-9):6.0f} per CPU-s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(x["rate"] for x in v) for k, v in results.items()}
    rng = {k: (min(x["rate"] for x in v), max(x["rate"] for x in v)) for k, v in results.items()}
    # per-round ratios, then their median: both sides of a ratio ran within minutes of each other
    def ratio(a: str, b: str, key: str = "rate") -> tuple[float, float, float] | None:
        def value(x: dict) -> float:
            return x["rate"] if key == "rate" else x["images"] / max(x["cpu_seconds"], 1e-9)

        pairs = [value(x) / value(y) for x, y in zip(results.get(a, []), results.get(b, []))]
        return (statistics.median(pairs), min(pairs), max(pairs)) if pairs else None

    print(f"\npinned to CPUs {cores}; batch {args.batch_size}; {args.epochs} timed epochs after a warm-up; "
          f"{args.rounds} interleaved rounds; load average at the rounds' starts {[round(x, 1) for x in loads]}")
    print(f"{'run':22s} {'median img/s':>12s} {'range':>15s}")
    for k in results:
        print(f"{k:22s} {med[k]:12.0f} {rng[k][0]:7.0f}-{rng[k][1]:<7.0f}")
    for name, w in writes.items():
        print(f"{'write ' + name:22s} {w['images'] / w['seconds']:12.0f}")
    checks = [("read", "ours read", "ffcv read"), ("crop+flip", "ours crop+flip", "ffcv rrc"),
              ("crop+flip (fixed-size)", "ours crop+flip", "ffcv crop"),
              ("crop+flip vs LitData", "ours crop+flip", "litdata crop+flip"),
              ("full", "ours full", "ours crop+flip"), ("read NCHW", "ours read-nchw", "ffcv read")]
    summary = {}
    print()
    for label, a, b in checks:
        r = ratio(a, b)
        if r is None:
            continue
        target = TARGETS.get(label)
        verdict = "" if target is None else f"  (target >= {target:.2f}x: {'met' if r[0] >= target else 'NOT met'})"
        per_cpu = ratio(a, b, "cpu")
        print(f"{label:24s} {a} / {b}: {r[0]:.2f}x (rounds {r[1]:.2f}-{r[2]:.2f}){verdict}; "
              f"per CPU-second {per_cpu[0]:.2f}x")
        summary[label] = {"ratio": round(r[0], 3), "min": round(r[1], 3), "max": round(r[2], 3), "target": target,
                          "per_cpu_second": round(per_cpu[0], 3)}
    for peer, reason in skipped.items():
        print(f"skipped {peer}: {reason}")
    report = {"benchmark": "peers", "versions": versions, "cores": cores, "rounds": args.rounds, "loads": loads,
              "median_images_per_s": {k: round(v) for k, v in med.items()}, "ratios": summary,
              "writes": {k: round(w["images"] / w["seconds"]) for k, w in writes.items()}, "skipped": skipped}
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
