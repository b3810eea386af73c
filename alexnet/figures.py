"""The paper's figures from a checkpoint, as PNG files and MLflow artifacts.

Krizhevsky et al. 2012:

Figure 3 (``conv1_kernels.png``)
    "96 convolutional kernels of size 11x11x3 learned by the first convolutional layer on the 224x224x3 input
    images. The top 48 kernels were learned on GPU 1 while the bottom 48 kernels were learned on GPU 2": an 8x12
    grid, kernels 0-47 (the first group, tower 1) in the top four rows, 48-95 below; each kernel scaled to [0, 1]
    on its own, and enlarged.
Figure 4 (``nearest_neighbours.png``)
    "(Left) Eight ILSVRC-2010 test images and the five labels considered most probable by our model. [...]
    (Right) Five ILSVRC-2010 test images in the first column. The remaining columns show the six training images
    that produce feature vectors in the last hidden layer with the smallest Euclidean distance from the feature
    vector for the test image." Here: five validation images, each with its top-5 labels (class words from the
    manifest, the true class's bar in red) and its six nearest training images in fc7 space. The training
    features come from Ray Data actors (``alexnet.transfer.feature_batches``, the linear probe's extractor), and
    only a running top-6 per query is kept, so memory does not grow with the training set (1.28M images).
Training curves (``training_curves.png``)
    train and validation top-1 error (and validation top-5) per epoch from the checkpoint's history, with the
    learning-rate drops marked.
Figure 1 (``relu_vs_tanh.png``)
    training error per epoch of the four-layer CIFAR-10 network with ReLUs and with tanh units
    (``alexnet.cifar``), the 25% line and the epoch each reached it.

    alexnet figures --checkpoint runs/ray/alexnet-paper/checkpoint_000089 --data /data/imagenet-256 --out figures
    alexnet figures relu-vs-tanh --data cifar-10-python.tar.gz --out figures
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

FIGURE_FILES = {"conv1": "conv1_kernels.png", "neighbours": "nearest_neighbours.png",
                "curves": "training_curves.png", "relu_vs_tanh": "relu_vs_tanh.png"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- Figure 3: the first layer's kernels ---------------------------------------------------------------------------


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The network's first convolution (conv1 of either variant)."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def kernel_grid(weight: torch.Tensor, *, columns: int = 12, scale: int = 6, gap: int = 2) -> np.ndarray:
    """Kernels ``[N, 3, k, k]`` as one RGB image (float in [0, 1], gaps white): ``N / columns`` rows in kernel
    order, each kernel min-max scaled to [0, 1] on its own and enlarged ``scale`` times (nearest neighbour)."""
    w = weight.detach().float().cpu().numpy()
    n, channels, kh, kw = w.shape
    if channels != 3:
        raise ValueError(f"expected RGB kernels [N, 3, k, k], got {tuple(w.shape)}")
    rows = -(-n // columns)
    low = w.min(axis=(1, 2, 3), keepdims=True)
    span = np.maximum(w.max(axis=(1, 2, 3), keepdims=True) - low, 1e-12)
    w = ((w - low) / span).transpose(0, 2, 3, 1).repeat(scale, axis=1).repeat(scale, axis=2)
    h, wd = kh * scale, kw * scale
    grid = np.ones((rows * (h + gap) + gap, columns * (wd + gap) + gap, 3), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (wd + gap):gap + c * (wd + gap) + wd] = w[i]
    return grid


def plot_conv1_kernels(model: nn.Module, path: str | Path, *, towers: int = 2) -> Path:
    """Figure 3: conv1's kernels, 12 per row (96 kernels: 8 rows), tower ``i``'s kernels in the ``i``-th block of
    rows, separated by a line."""
    plt = _pyplot()
    weight = first_conv(model).weight
    n, _, k, _ = weight.shape
    columns = 12 if n % 12 == 0 else 8
    scale, gap = 6, 2
    grid = kernel_grid(weight, columns=columns, scale=scale, gap=gap)
    rows = -(-n // columns)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 60, grid.shape[0] / 60 + 0.8), dpi=100)
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    title = f"conv1: {n} kernels of {k}x{k}x3, each scaled to [0, 1]"
    if towers > 1 and rows % towers == 0 and n % towers == 0:
        for t in range(1, towers):
            y = t * (rows // towers) * (k * scale + gap) + gap / 2 - 0.5
            ax.axhline(y, color="black", linewidth=2)
        title += f"\nkernels 0-{n // towers - 1} (tower 1) above, {n // towers}-{n - 1} (tower 2) below"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --- training curves --------------------------------------------------------------------------------------------------


def lr_drops(history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """``(epoch, new_lr)`` for every epoch (1-based) that ran at a lower rate than the one before."""
    return [(int(h["epoch"]), float(h["lr"])) for prev, h in zip(history, history[1:])
            if float(h["lr"]) < float(prev["lr"]) * (1 - 1e-9)]


def plot_training_curves(history: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Train and validation top-1 error (and validation top-5) per epoch, lr drops as dotted lines."""
    if not history:
        raise ValueError("the checkpoint has no training history to plot")
    plt = _pyplot()
    epochs = [int(h["epoch"]) for h in history]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for key, label, style in (("train_top1_err", "train top-1", "-"), ("val_top1_err", "validation top-1", "-"),
                              ("val_top5_err", "validation top-5", "--")):
        if any(key in h for h in history):
            ax.plot(epochs, [100 * h[key] if key in h else np.nan for h in history], style, marker=".",
                    label=label)
    for i, (epoch, lr) in enumerate(lr_drops(history)):
        ax.axvline(epoch - 0.5, color="grey", linestyle=":", label="learning rate / 10" if i == 0 else None)
        ax.annotate(f"lr {lr:g}", (epoch - 0.5, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                    rotation=90, va="top", ha="right")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"training curves, lr {history[0]['lr']:g} at epoch 1")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --- Figure 4: top-5 labels and nearest training images in fc7 space -------------------------------------------------


class NearestNeighbours:
    """A running top-``k`` of the training features nearest (Euclidean) to each query; fed batch by batch."""

    def __init__(self, queries: np.ndarray, k: int = 6) -> None:
        self.queries = np.asarray(queries, dtype=np.float64)
        self.k = k
        self.distances = np.full((len(queries), 0), np.inf)
        self.keys = np.empty((len(queries), 0), dtype=object)

    def update(self, keys: np.ndarray, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        squared = ((self.queries ** 2).sum(1)[:, None] + (x ** 2).sum(1)[None, :] - 2 * self.queries @ x.T)
        distances = np.concatenate([self.distances, np.sqrt(np.maximum(squared, 0.0))], axis=1)
        names = np.concatenate([self.keys, np.broadcast_to(np.asarray(keys, dtype=object), squared.shape)], axis=1)
        # ties broken by key, so the result does not depend on the order the batches arrive in
        order = np.array([np.lexsort((n.astype(str), d))[: self.k] for d, n in zip(distances, names)])
        self.distances = np.take_along_axis(distances, order, axis=1)
        self.keys = np.take_along_axis(names, order, axis=1)


def stored_images(data: str, split: str, keys: list[str]) -> dict[str, tuple[int, np.ndarray]]:
    """``{key: (label, HWC uint8)}`` for ``keys`` of ``split``: reads the key column of every shard, then only
    the row groups that hold one of ``keys``."""
    import pyarrow.parquet as pq

    from pipelines import imaging, prepare, storage

    manifest = prepare.load_manifest(data)
    wanted, out = set(keys), {}
    for uri in prepare.shard_uris(data, manifest, split):
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            shard = pq.ParquetFile(f)
            found = [i for i, k in enumerate(shard.read(columns=["key"])["key"].to_pylist()) if k in wanted]
            if not found:
                continue
            ends = np.cumsum([shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)])
            groups = sorted({int(np.searchsorted(ends, i, side="right")) for i in found})
            table = shard.read_row_groups(groups, columns=["key", "label", "image"])
        for key, label, blob in zip(*(table[c].to_pylist() for c in ("key", "label", "image"))):
            if key in wanted:
                out[key] = (int(label), imaging.decode_stored(blob, image_format=manifest["image"]["format"],
                                                              size=manifest["image"]["size"][0]))
    missing = [k for k in keys if k not in out]
    if missing:
        raise KeyError(f"{len(missing)} keys are not in split {split} of {data} (first: {missing[0]})")
    return out


def choose_queries(data: str, *, count: int = 5, split: str = "val", seed: int = 0) -> list[str]:
    """``count`` keys of ``split``, drawn with ``seed`` (from the key and label columns only)."""
    import pyarrow.parquet as pq

    from pipelines import prepare, storage

    manifest = prepare.load_manifest(data)
    keys: list[str] = []
    for uri in prepare.shard_uris(data, manifest, split):
        fs, path = storage.filesystem(uri)
        keys += pq.read_table(path, filesystem=fs, columns=["key"])["key"].to_pylist()
    if len(keys) < count:
        raise ValueError(f"split {split} of {data} has {len(keys)} images; Figure 4 needs {count}")
    rng = np.random.default_rng(seed)
    return sorted(np.array(sorted(keys))[rng.choice(len(keys), size=count, replace=False)].tolist())


def _short(words: str, width: int = 24) -> str:
    first = words.split(",")[0].strip() or words
    return first if len(first) <= width else first[: width - 1] + "…"


def nearest_neighbours(checkpoint: str, data: str, *, queries: list[str], k: int = 6, top: int = 5,
                       batch_size: int = 128, use_gpu: bool = False, num_actors: int = 0,
                       ray_address: str | None = None) -> dict[str, Any]:
    """For each of the ``queries`` (validation keys): its top-``top`` classes and probabilities and its ``k``
    nearest training images in fc7 space, with the images themselves (HWC uint8)."""
    from alexnet.transfer import feature_batches, load_backbone
    from pipelines import prepare

    manifest = prepare.load_manifest(data)
    words = {c["label"]: c.get("words") or c["wnid"] for c in manifest["classes"]}
    backbone = load_backbone(checkpoint, imagenet_stats=data)
    stored = stored_images(data, "val", queries)
    images = torch.from_numpy(np.stack([stored[q][1] for q in queries]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        taps = backbone.model.eval().forward_taps(backbone.augmentation.eval_center(images), ["fc7", "fc8"])
    probs = taps["fc8"].float().softmax(1)
    p, classes = probs.topk(min(top, probs.shape[1]), dim=1)
    nearest = NearestNeighbours(taps["fc7"].float().numpy(), k)
    seen = 0
    for batch in feature_batches(data, checkpoint, layers=["fc7"], splits=["train"], batch_size=batch_size,
                                 use_gpu=use_gpu, num_actors=num_actors, imagenet_stats=data,
                                 ray_address=ray_address):
        nearest.update(batch["key"], batch["fc7"])
        seen += len(batch["key"])
    train = stored_images(data, "train", sorted(set(nearest.keys.ravel().tolist())))
    rows = []
    for i, q in enumerate(queries):
        label = stored[q][0]
        rows.append({
            "key": q, "label": label, "words": words.get(label, str(label)), "image": stored[q][1],
            "top": [{"label": int(c), "words": words.get(int(c), str(int(c))), "probability": float(pp)}
                    for c, pp in zip(classes[i], p[i])],
            "neighbours": [{"key": key, "label": train[key][0], "words": words.get(train[key][0], ""),
                            "distance": float(d), "image": train[key][1]}
                           for key, d in zip(nearest.keys[i], nearest.distances[i])]})
    return {"queries": rows, "train_images_searched": seen, "layer": "fc7"}


def plot_nearest_neighbours(result: dict[str, Any], path: str | Path) -> Path:
    """Figure 4: per row a validation image (true class under it), its top-5 bars (true class red), and its
    nearest training images in fc7 space (class and distance under each)."""
    plt = _pyplot()
    rows = result["queries"]
    k = max(len(r["neighbours"]) for r in rows)
    fig = plt.figure(figsize=(2.0 * (k + 3), 2.3 * len(rows)), dpi=100)
    grid = fig.add_gridspec(len(rows), k + 3, width_ratios=[1, 1.6, 0.1] + [1] * k, wspace=0.08, hspace=0.45)
    for r, row in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(row["image"])
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(f"{_short(row['words'], 20)}\n{row['key']}", fontsize=8)
        bars = fig.add_subplot(grid[r, 1])
        top = row["top"][::-1]
        bars.barh(range(len(top)), [t["probability"] for t in top], height=0.8, alpha=0.45,
                  color=["tab:red" if t["label"] == row["label"] else "tab:blue" for t in top])
        for y, t in enumerate(top):  # the class words over their bar, as in the paper's figure
            bars.text(0.02, y, f"{_short(t['words'], 26)}  {t['probability']:.2f}", va="center", fontsize=7.5)
        bars.set_yticks([])
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=7)
        if r == 0:
            bars.set_title("top-5 (true class red)", fontsize=9)
        for j, n in enumerate(row["neighbours"]):
            ax = fig.add_subplot(grid[r, 3 + j])
            ax.imshow(n["image"])
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(f"{_short(n['words'], 18)}\nd={n['distance']:.3g}", fontsize=7)
            if r == 0 and j == 0:
                ax.set_title(f"the {k} nearest training images in {result['layer']} space", fontsize=9, loc="left")
    fig.suptitle(f"validation images, their top-5 labels and nearest training images "
                 f"({result['train_images_searched']} searched)", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# --- Figure 1: ReLU vs tanh on CIFAR-10 ---------------------------------------------------------------------------


def plot_relu_vs_tanh(result: dict[str, Any], path: str | Path) -> Path:
    """Figure 1: training error per epoch, ReLU solid, tanh dashed, the target as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for activation, style in (("relu", "-"), ("tanh", "--")):
        run = result["runs"][activation]
        errors = run["train_error"]
        reached = run["epoch_reached"]
        label = f"{activation} (lr {run['lr']:g}): " + (f"{result['target']:.0%} at epoch {reached}" if reached
                                                        else f"not at {result['target']:.0%} in {len(errors)}")
        ax.plot(range(1, len(errors) + 1), errors, style, color="black", marker="." if len(errors) < 40 else None,
                label=label)
    ax.axhline(result["target"], color="grey", linestyle=":", label=f"{result['target']:.0%} training error")
    ratio = result.get("ratio")
    ax.set_title(f"four-layer CNN on CIFAR-10 ({result['train_images']} training images)\n"
                 + (f"tanh needs {ratio:.2f}x the epochs of ReLU (paper: about 6x)" if ratio
                    else "ratio unknown: a network did not reach the target"), fontsize=10)
    ax.set_xlabel("epochs")
    ax.set_ylabel("training error rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --- the commands ----------------------------------------------------------------------------------------------------


def _log_run(run_name: str, files: list[Path], summary: dict[str, Any], *, params: dict[str, Any],
             metrics: dict[str, list[float]] | None = None, tracking_uri: str | None = None,
             experiment: str = "alexnet", parent_run_id: str | None = None) -> str:
    """One MLflow run holding the PNGs (under ``figures/``), their summary and any per-epoch metrics."""
    from alexnet.tracking import RunLogger, git_commit, resolve_tracking_uri

    run = RunLogger(resolve_tracking_uri(tracking_uri), experiment, run_name=run_name, parent_run_id=parent_run_id,
                    tags={"alexnet.stage": "figures", "git_commit": git_commit()})
    run.log_params(params)
    for name, values in (metrics or {}).items():
        for epoch, value in enumerate(values, start=1):
            run.log_metrics({name: value}, step=epoch)
    for path in files:
        run.log_file(path, "figures")
    run.log_dict(summary, "figures.json")
    run.end()
    return run.run_id


def make_figures(checkpoint: str, data: str, out: str | Path, *, queries: int = 5, neighbours: int = 6,
                 seed: int = 0, batch_size: int = 128, use_gpu: bool = False, num_actors: int = 0,
                 ray_address: str | None = None, tracking: bool = True, tracking_uri: str | None = None,
                 experiment: str = "alexnet") -> dict[str, Any]:
    """Figures 3 and 4 and the training curves of ``checkpoint`` (trained on the prepared ImageNet ``data``)
    into ``out``, logged to an MLflow run ``figures-<checkpoint folder>``. Returns what was drawn and where."""
    from alexnet.train import CHECKPOINT_FILE, load_checkpoint
    from alexnet.transfer import load_backbone
    from pipelines import storage

    data = storage.absolute(data)
    if not storage.is_s3(checkpoint):
        checkpoint = storage.absolute(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(checkpoint.rstrip("/"))
    name = path.parent.name if path.name == CHECKPOINT_FILE else path.stem  # checkpoint_000089, alexnet-owt-...
    backbone = load_backbone(checkpoint, imagenet_stats=data)
    # conv1's kernels feed the towers through conv2's groups (groups=2: kernels 0-47 feed tower 1)
    convs = [m for m in backbone.model.modules() if isinstance(m, nn.Conv2d)]
    towers = convs[1].groups if len(convs) > 1 else 1
    files = {"conv1": plot_conv1_kernels(backbone.model, out / FIGURE_FILES["conv1"], towers=towers)}
    history: list[dict[str, Any]] = []
    if backbone.description["kind"] == "alexnet":
        history = load_checkpoint(checkpoint).get("history") or []
    if history:
        files["curves"] = plot_training_curves(history, out / FIGURE_FILES["curves"],
                                               title=f"training curves of {name}")
    else:
        log.warning("%s holds no training history: no training curves", checkpoint)
    keys = choose_queries(data, count=queries, seed=seed)
    found = nearest_neighbours(checkpoint, data, queries=keys, k=neighbours, batch_size=batch_size, use_gpu=use_gpu,
                               num_actors=num_actors, ray_address=ray_address)
    files["neighbours"] = plot_nearest_neighbours(found, out / FIGURE_FILES["neighbours"])
    summary = {
        "checkpoint": checkpoint, "data": data, "files": {k: str(v) for k, v in files.items()},
        "lr_drops": lr_drops(history), "train_images_searched": found["train_images_searched"],
        "queries": [{"key": r["key"], "label": r["label"], "words": r["words"], "top": r["top"],
                     "neighbours": [{k: v for k, v in n.items() if k != "image"} for n in r["neighbours"]]}
                    for r in found["queries"]],
    }
    if tracking:
        summary["mlflow_run_id"] = _log_run(
            f"figures-{name}", list(files.values()), summary,
            params={"checkpoint": checkpoint, "data": data, "queries": queries, "neighbours": neighbours,
                    "seed": seed}, tracking_uri=tracking_uri, experiment=experiment)
    return summary


def make_relu_vs_tanh(data: str, out: str | Path, *, lr_relu: float = 0.001, lr_tanh: float = 0.001,
                      target: float = 0.25, max_epochs: int = 100, batch_size: int = 128, seed: int = 0,
                      device: str | None = None, tracking: bool = True, tracking_uri: str | None = None,
                      experiment: str = "alexnet") -> dict[str, Any]:
    """Figure 1 (``alexnet.cifar.relu_vs_tanh``) into ``out/relu_vs_tanh.png``, logged to an MLflow run
    ``figures-relu-vs-tanh`` with both training-error curves as metrics."""
    from alexnet.cifar import relu_vs_tanh

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = relu_vs_tanh(data, lr_relu=lr_relu, lr_tanh=lr_tanh, target=target, max_epochs=max_epochs,
                          batch_size=batch_size, seed=seed, device=device)
    path = plot_relu_vs_tanh(result, out / FIGURE_FILES["relu_vs_tanh"])
    result["file"] = str(path)
    if tracking:
        result["mlflow_run_id"] = _log_run(
            "figures-relu-vs-tanh", [path], result,
            params={"data": str(data), "lr_relu": lr_relu, "lr_tanh": lr_tanh, "target": target,
                    "max_epochs": max_epochs, "batch_size": batch_size, "seed": seed},
            metrics={f"train_error_{a}": r["train_error"] for a, r in result["runs"].items()},
            tracking_uri=tracking_uri, experiment=experiment)
    return result
