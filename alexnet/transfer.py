"""Transfer learning from an ImageNet checkpoint to Caltech-101, Oxford Flowers-102 and PASCAL VOC 2007.

The datasets' standard protocols (``protocol_splits``):

Caltech-101 (Fei-Fei et al. 2004; as in Zeiler & Fergus 2013 and DeCAF)
    30 training images per class, the rest, at most 50 per class, for testing; mean per-class accuracy, averaged
    over 5 seeded random splits, with its standard deviation. C is chosen on 5 images per class held out of the 30.
Oxford Flowers-102 (Nilsback & Zisserman 2008)
    train on ``trnid``, choose C on ``valid``, refit on train+val, test on ``tstid``; mean per-class accuracy.
PASCAL VOC 2007 classification
    train on ``train``, choose C on ``val``, refit on trainval, test on ``test``; per-class AP and mAP with the
    VOC2007 11-point interpolated AP (difficult examples ignored), the area-under-curve AP (VOC2010+) beside it.

Two methods, from any ImageNet checkpoint (one of ours, or torchvision-variant weights, ``load_backbone``):

``probe``
    DeCAF-style linear probe: centre-crop activations of fc7 (and fc6), extracted with Ray Data on actors (GPU
    actors with ``use_gpu``), L2-normalised, and a linear classifier (logistic regression or a linear SVM,
    one-vs-rest for VOC's 20 binary problems) whose regularisation is chosen on the validation split.
``finetune``
    fc8 replaced by a new layer for the dataset's classes, the whole network trained with Ray Train: SGD with
    momentum, the pre-trained layers at a tenth of the new layer's learning rate, the paper's augmentation
    (random 224 crops, flips, PCA colour noise with the ImageNet statistics the checkpoint was trained with);
    binary cross-entropy for VOC's multi-hot labels (difficult labels ignored); centre-crop test predictions.

``run_transfer`` is the library function the CLI (``alexnet transfer``) and the Prefect flow's transfer stage
call; it logs one MLflow run per dataset and method, with the results next to the literature numbers.

    alexnet transfer caltech101 --data runs/caltech101 --checkpoint runs/ray/alexnet/checkpoint_000089 --method probe
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alexnet.augment import Augmentation
from alexnet.config import TRANSFER_DATASETS as DATASETS
from alexnet.config import TRANSFER_METHODS as METHODS
from alexnet.config import TransferConfig
from alexnet.results import TRANSFER_LITERATURE as LITERATURE
from alexnet.results import markdown, transfer_table

log = logging.getLogger(__name__)

SCORES_FILE = "scores.npz"
#: MLflow artifact folder of every transfer run's per-image test scores (``per_image_scores``)
TEST_SCORES_DIR = "test_scores"
FINETUNE_CHECKPOINT = "finetune.pt"

# --- what a prepared transfer dataset holds ---------------------------------------------------------------------


@dataclass
class DatasetIndex:
    """Every image of a prepared transfer dataset, without pixels, sorted by (split, key)."""

    dataset: str
    num_classes: int
    class_names: list[str]
    keys: np.ndarray  # str
    splits: np.ndarray  # str
    labels: np.ndarray  # int [N] (multi-class) or int8 [N, C] multi-hot (VOC)
    difficult: np.ndarray | None  # bool [N, C] (VOC) or None
    #: class folders of the source without images (manifest ``empty_classes``: Caltech-101), hence no class
    empty_classes: tuple[str, ...] = ()

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def _split_tables(data: str, manifest: dict[str, Any], splits: list[str], columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import prepare, storage

    tables = []
    for split in splits:
        for uri in prepare.shard_uris(data, manifest, split):
            fs, path = storage.filesystem(uri)
            table = pq.read_table(path, filesystem=fs, columns=columns)
            tables.append(table.append_column("split", pa.array([split] * table.num_rows, pa.string())))
    return tables


def load_index(data: str) -> DatasetIndex:
    """The keys, splits and labels of the prepared dataset at ``data`` (``alexnet prepare caltech101|...``)."""
    import pyarrow as pa

    from pipelines import prepare

    manifest = prepare.load_manifest(data)
    dataset = manifest.get("dataset", "imagenet")
    if dataset not in DATASETS:
        raise ValueError(f"{data} holds {dataset!r}, not one of the transfer datasets {DATASETS}; "
                         f"prepare one with `alexnet prepare {'|'.join(DATASETS)} --source SRC --out OUT`")
    multilabel = bool(manifest.get("multi_label"))
    columns = ["key", "label"] + (["labels", "difficult"] if multilabel else [])
    table = pa.concat_tables(_split_tables(data, manifest, sorted(manifest["splits"]), columns))
    order = sorted(range(table.num_rows), key=lambda i: (table["split"][i].as_py(), table["key"][i].as_py()))
    table = table.take(pa.array(order, pa.int64()))
    keys = table["key"].to_pylist()
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        twice = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"{data}: key {twice!r} is in more than one split; the transfer protocols need keys unique "
                         "across splits (re-prepare the dataset from its official archives)")
    classes = sorted(manifest["classes"], key=lambda c: c["label"])
    if multilabel:
        labels = np.array(table["labels"].to_pylist(), dtype=np.int8).reshape(table.num_rows, len(classes))
        difficult = np.array(table["difficult"].to_pylist(), dtype=bool).reshape(table.num_rows, len(classes))
    else:
        labels, difficult = table["label"].to_numpy().astype(np.int64), None
    return DatasetIndex(dataset, int(manifest["num_classes"]), [c["wnid"] for c in classes],
                        np.array(keys, dtype=object),
                        np.array(table["split"].to_pylist(), dtype=object), labels, difficult,
                        tuple(manifest.get("empty_classes", ())))


# --- protocols ----------------------------------------------------------------------------------------------------


@dataclass
class ProtocolSplit:
    """Row indices (into a ``DatasetIndex``) of one evaluation: ``fit``/``val`` choose the regularisation, ``train``
    (= fit + val) trains the final classifier, ``test`` measures it."""

    name: str
    fit: np.ndarray
    val: np.ndarray
    train: np.ndarray
    test: np.ndarray


def caltech_splits(labels: np.ndarray, *, train_per_class: int = 30, test_per_class: int = 50,
                   val_per_class: int = 5, num_splits: int = 5, seed: int = 0,
                   class_names: list[str] | None = None, empty_classes: tuple[str, ...] = ()
                   ) -> list[ProtocolSplit]:
    """The Caltech-101 protocol: per class, ``train_per_class`` random training images and, of the rest, at most
    ``test_per_class`` test images; ``num_splits`` splits, each seeded by ``(seed, split)``. ``val_per_class`` of
    each class's training images are the validation part used to choose the classifier's regularisation.

    Every class (``class_names``: its category folder) and every category folder left empty in the source
    (``empty_classes``) needs ``train_per_class + 1`` images, or the class count would silently change."""
    from pipelines.formats import CALTECH101_ROOT

    if not 0 <= val_per_class < train_per_class:
        raise ValueError(f"need 0 <= val_per_class < train_per_class, got {val_per_class} and {train_per_class}")
    names = class_names or [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    counts = {f"{CALTECH101_ROOT}/{names[c]}": len(by_class.get(c, ())) for c in range(len(names))}
    short = {folder: n for folder, n in ({f: 0 for f in empty_classes} | counts).items() if n <= train_per_class}
    if short:
        listed = ", ".join(f"{folder} ({n} images)" for folder, n in sorted(short.items()))
        raise ValueError(f"category folder{'s' if len(short) > 1 else ''} {listed}: the Caltech-101 protocol needs "
                         f"at least {train_per_class + 1} images per category ({train_per_class} to train, "
                         "transfer.caltech_train_per_class, and one to test); restore the folder's images from the "
                         "official archive or lower transfer.caltech_train_per_class")
    splits = []
    for s in range(num_splits):
        rng = np.random.default_rng([seed, s])
        fit, val, test = [], [], []
        for c in sorted(by_class):
            rows = rng.permutation(by_class[c])
            train = rows[:train_per_class]
            fit.append(train[val_per_class:])
            val.append(train[:val_per_class])
            test.append(rows[train_per_class:train_per_class + test_per_class])
        fit_, val_, test_ = (np.sort(np.concatenate(x)) for x in (fit, val, test))
        splits.append(ProtocolSplit(f"split{s}", fit_, val_, np.sort(np.concatenate([fit_, val_])), test_))
    return splits


def protocol_splits(index: DatasetIndex, cfg: TransferConfig) -> list[ProtocolSplit]:
    """The evaluations the dataset's standard protocol asks for (see the module docstring)."""
    if index.dataset == "caltech101":
        return caltech_splits(index.labels, train_per_class=cfg.caltech_train_per_class,
                              test_per_class=cfg.caltech_test_per_class, val_per_class=cfg.caltech_val_per_class,
                              num_splits=cfg.caltech_splits, seed=cfg.seed, class_names=index.class_names,
                              empty_classes=index.empty_classes)
    fit, val, test = index.rows("train"), index.rows("val"), index.rows("test")
    if not (len(fit) and len(val) and len(test)):
        raise ValueError(f"{index.dataset}: expected train, val and test splits with rows, got "
                         f"{ {s: int((index.splits == s).sum()) for s in np.unique(index.splits)} }")
    return [ProtocolSplit("official", fit, val, np.sort(np.concatenate([fit, val])), test)]


# --- metrics ------------------------------------------------------------------------------------------------------


def mean_per_class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, dict[int, float]]:
    """Mean over the classes present in ``labels`` of each class's accuracy, and the per-class accuracies."""
    per_class = {int(c): float((predictions[labels == c] == c).mean()) for c in np.unique(labels)}
    return float(np.mean(list(per_class.values()))), per_class


def _precision_recall(scores: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall down the ranking of ``scores`` (descending, ties in input order as MATLAB's stable
    ``sort``); ``gt`` 1 positive, -1 negative, 0 ignored (VOC "difficult"), as ``VOCevalcls.m`` does. The devkit
    keeps difficult examples in the ranking, counted as neither: dropping them gives the same curve, without the
    devkit's 0/0 precisions at its head."""
    keep = gt != 0
    scores, gt = scores[keep], gt[keep]
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(gt[order] > 0)
    fp = np.cumsum(gt[order] < 0)
    npos = max(1, int((gt > 0).sum()))
    return tp / np.maximum(tp + fp, np.finfo(np.float64).eps), tp / npos


def matlab_colon(start: float, step: float, stop: float) -> np.ndarray:
    """MATLAB's ``start:step:stop``: the lower half ``start + k*step``, the upper half ``stop - (n-k)*step``, so
    ``0:0.1:1`` holds exactly 0.6 and 0.7 (``np.linspace(0, 1, 11)`` and ``np.arange(0, 1.1, 0.1)`` hold
    0.6000000000000001 and 0.7000000000000001: a recall of exactly 3/5 or 7/10 would then not count)."""
    n = int(round((stop - start) / step))
    k = np.arange(n + 1)
    return np.where(k <= n / 2, start + k * step, stop - (n - k) * step)


#: ``VOCevalcls.m``: ``for t=0:0.1:1``
VOC07_RECALL_THRESHOLDS = matlab_colon(0.0, 0.1, 1.0)


def voc07_ap(scores: np.ndarray, gt: np.ndarray) -> float:
    """The VOC2007 11-point interpolated average precision of ``VOCevalcls.m``, bit for bit: over the recall
    thresholds ``0:0.1:1``, ``ap = ap + p/11`` with ``p`` the highest precision at a recall at least the threshold
    (0 where none is reached)."""
    precision, recall = _precision_recall(np.asarray(scores, np.float64), np.asarray(gt))
    ap = 0.0
    for t in VOC07_RECALL_THRESHOLDS:
        reached = recall >= t
        ap += (float(precision[reached].max()) if reached.any() else 0.0) / 11
    return ap


def auc_ap(scores: np.ndarray, gt: np.ndarray) -> float:
    """Area under the interpolated precision-recall curve, ``VOCap.m`` (VOC2010 onwards): ``mrec=[0;rec;1]``,
    ``mpre=[0;prec;0]`` made monotone from the end, summed (in order) over the points where recall changes."""
    precision, recall = _precision_recall(np.asarray(scores, np.float64), np.asarray(gt))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    terms = (mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]
    return float(np.cumsum(terms)[-1]) if len(terms) else 0.0  # MATLAB's sum: left to right, not pairwise


def voc_gt(labels: np.ndarray, difficult: np.ndarray) -> np.ndarray:
    """VOC's per-class ground truth from multi-hot labels and difficult flags: 1, -1, or 0 (difficult: ignored)."""
    return np.where(difficult, 0, np.where(labels > 0, 1, -1)).astype(np.int8)


def score_predictions(index: DatasetIndex, rows: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """The protocol's metric(s) for ``scores`` ([len(rows), C]) on ``rows``: mean per-class accuracy, or for VOC
    the 11-point mAP (headline), the AUC mAP and the per-class APs."""
    if index.multilabel:
        gt = voc_gt(index.labels[rows], index.difficult[rows])
        ap11 = [voc07_ap(scores[:, c], gt[:, c]) for c in range(index.num_classes)]
        ap = [auc_ap(scores[:, c], gt[:, c]) for c in range(index.num_classes)]
        return {"metric": "map_11point", "value": float(np.mean(ap11)), "map_auc": float(np.mean(ap)),
                "per_class": {n: {"ap_11point": a, "ap_auc": b} for n, a, b in zip(index.class_names, ap11, ap)}}
    value, per_class = mean_per_class_accuracy(index.labels[rows], scores.argmax(1))
    return {"metric": "mean_per_class_accuracy", "value": value,
            "per_class": {index.class_names[c]: {"accuracy": a} for c, a in per_class.items()}}


def chance_level(index: DatasetIndex, rows: np.ndarray) -> float:
    """What a random classifier scores: 1/classes for mean per-class accuracy; for AP, each class's share of
    positives among its non-difficult test images (the AP of a random ranking), averaged."""
    if not index.multilabel:
        return 1.0 / len(np.unique(index.labels[rows]))
    gt = voc_gt(index.labels[rows], index.difficult[rows])
    return float(np.mean([(g > 0).sum() / max(1, (g != 0).sum()) for g in gt.T]))


# --- the network to transfer from ---------------------------------------------------------------------------------


@dataclass
class Backbone:
    """An ImageNet network ready for transfer: the model (eval mode, CPU) and the input normalisation and
    augmentation it was trained with."""

    model: nn.Module
    augmentation: Augmentation
    description: dict[str, Any]


def read_checkpoint_state(checkpoint: str) -> dict[str, Any]:
    """The saved state of ``checkpoint`` (a checkpoint of ``alexnet train``, or a state dict file), loaded with
    ``weights_only=True``: a file whose unpickling would run code is refused."""
    from alexnet.train import CHECKPOINT_FILE, load_checkpoint, safe_torch_load
    from pipelines import storage

    is_file = storage.exists(checkpoint) and not storage.exists(storage.join(checkpoint, CHECKPOINT_FILE))
    if is_file and not checkpoint.endswith(".pt"):
        return safe_torch_load(storage.read_bytes(checkpoint), name=checkpoint)
    return load_checkpoint(checkpoint)


def load_backbone(checkpoint: str, *, imagenet_stats: str | None = None) -> Backbone:
    """The network of ``checkpoint``: a checkpoint of ``alexnet train`` (folder or ``checkpoint.pt``, local or
    ``s3://``), normalised with the ImageNet statistics it was trained with (``stats.json`` and
    ``mean_image.npy`` of ``imagenet_stats``, default the dataset named in its config); or a torchvision-variant
    state dict (e.g. torchvision's ``alexnet-owt-7be5be79.pth``), normalised as torchvision does (channel
    mean/std)."""
    from alexnet.model import build_model
    from alexnet.train import augmentation_for, checkpoint_config, model_from_checkpoint
    from pipelines import stats as stats_mod

    state = read_checkpoint_state(checkpoint)
    if "model" in state and "config" in state:
        cfg = checkpoint_config(state)
        stats_uri = imagenet_stats or cfg.data.data
        try:
            stats, mean_image = stats_mod.load_stats(stats_uri)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{checkpoint} was trained with the statistics of {stats_uri}, which are not "
                                    f"readable here ({e}); pass the prepared ImageNet holding stats.json and "
                                    "mean_image.npy as --imagenet-stats URI") from None
        if state.get("stats_sha256") and stats.get("mean_image_sha256") != state["stats_sha256"]:
            log.warning("%s: ImageNet statistics differ from those %s was trained with", stats_uri, checkpoint)
        return Backbone(model_from_checkpoint(state), augmentation_for(cfg, stats, mean_image),
                        {"kind": "alexnet", "checkpoint": checkpoint, "variant": cfg.model.variant,
                         "epoch": state.get("epoch"), "imagenet_stats": stats_uri,
                         "normalize": cfg.data.normalize, "pixel_scale": cfg.data.pixel_scale,
                         "trained_num_classes": state["num_classes"]})
    if "classifier.6.weight" not in state or "features.0.weight" not in state:
        raise ValueError(f"{checkpoint}: neither a checkpoint of `alexnet train` nor a torchvision AlexNet state "
                         f"dict (keys: {sorted(state)[:6]}...)")
    model = build_model(variant="torchvision", num_classes=int(state["classifier.6.weight"].shape[0]))
    model.load_state_dict(state)
    return Backbone(model.eval(), Augmentation.imagenet_default(normalize="channel", pixel_scale=1),
                    {"kind": "torchvision", "checkpoint": checkpoint, "variant": "torchvision",
                     "normalize": "channel", "pixel_scale": 1, "trained_num_classes": int(state["classifier.6.weight"].shape[0])})


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Swap fc8 for a new ``num_classes``-way layer initialised like the paper's (N(0, 0.01^2), bias 0); returns it."""
    parent_path, _, name = model.tap_points["fc8"].rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    head = nn.Linear(old.in_features, num_classes)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    setattr(parent, name, head)
    return head


# --- images and features ------------------------------------------------------------------------------------------


def _decode_batch(blobs, *, image_format: str, size: int, threads: int = 4) -> np.ndarray:
    """Stored images -> uint8 ``[N, 3, size, size]``."""
    from pipelines import imaging

    out = np.empty((len(blobs), 3, size, size), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = imaging.decode_stored(blobs[i], image_format=image_format, size=size).transpose(2, 0, 1)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, range(len(blobs))))
    return out


class FeatureExtractor:
    """A Ray Data actor: stored images -> activations of ``layers`` (centre crop, the backbone's normalisation)."""

    def __init__(self, checkpoint: str, layers: list[str], *, imagenet_stats: str | None, image_format: str,
                 size: int, device: str, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        backbone = load_backbone(checkpoint, imagenet_stats=imagenet_stats)
        self.device = torch.device(device)
        self.model = backbone.model.to(self.device).eval()
        self.augmentation = backbone.augmentation.to(self.device)
        self.layers, self.image_format, self.size, self.threads = list(layers), image_format, size, threads

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = _decode_batch(batch["image"], image_format=self.image_format, size=self.size, threads=self.threads)
        x = self.augmentation.eval_center(torch.from_numpy(images).to(self.device))
        taps = self.model.forward_taps(x, self.layers)
        return {"key": batch["key"], **{name: taps[name].float().cpu().numpy() for name in self.layers}}


def feature_batches(data: str, checkpoint: str, *, layers: list[str], splits: list[str] | None = None,
                    batch_size: int = 128, use_gpu: bool = False, num_actors: int = 0,
                    imagenet_stats: str | None = None, ray_address: str | None = None):
    """Activations of ``layers`` for the images of ``splits`` (default all) of the prepared dataset ``data``,
    computed by a pool of Ray Data actors (one GPU each with ``use_gpu``), streamed as numpy batches
    ``{"key": [B], layer: [B, D], ...}`` in no particular order (memory stays bounded on any dataset size)."""
    import ray.data

    from pipelines import prepare, storage
    from pipelines.rayutil import cpu_concurrency, ensure_ray

    manifest = prepare.load_manifest(data)
    uris = [u for split in sorted(splits or manifest["splits"]) for u in prepare.shard_uris(data, manifest, split)]
    ensure_ray(ray_address)
    fs, _ = storage.filesystem(uris[0])
    paths = [storage.filesystem(u)[1] for u in uris]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if use_gpu and not gpus:
        raise RuntimeError("transfer.use_gpu is set but the Ray cluster has no GPUs; set transfer.use_gpu=false")
    # A GPU actor decodes with a few CPU threads to keep its GPU fed. Actors hold their CPUs for the whole pass:
    # on CPUs, one is left to the Parquet read tasks that feed them.
    cpus = 4.0 if use_gpu else 1.0
    actors = num_actors or (gpus if use_gpu else max(1, cpu_concurrency() - 1))
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["key", "image"])
    features = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs=dict(checkpoint=checkpoint, layers=list(layers), imagenet_stats=imagenet_stats,
                                   image_format=manifest["image"]["format"], size=manifest["image"]["size"][0],
                                   device="cuda" if use_gpu else "cpu", threads=int(cpus)),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus,
        runtime_env=storage.worker_env(),
    )
    yield from features.iter_batches(batch_size=None, batch_format="numpy")


def extract_features(data: str, checkpoint: str, *, keys: np.ndarray, layers: list[str], batch_size: int = 128,
                     use_gpu: bool = False, num_actors: int = 0, imagenet_stats: str | None = None,
                     ray_address: str | None = None) -> dict[str, np.ndarray]:
    """Activations of ``layers`` for every image of the prepared dataset ``data`` (``feature_batches``), returned
    as ``{layer: [len(keys), D]}`` in the order of ``keys``."""
    position = {k: i for i, k in enumerate(keys)}
    out = {name: None for name in layers}
    seen = np.zeros(len(keys), dtype=bool)
    for batch in feature_batches(data, checkpoint, layers=layers, batch_size=batch_size, use_gpu=use_gpu,
                                 num_actors=num_actors, imagenet_stats=imagenet_stats, ray_address=ray_address):
        rows = np.array([position[k] for k in batch["key"]])
        for name in layers:
            if out[name] is None:
                out[name] = np.zeros((len(keys), batch[name].shape[1]), dtype=np.float32)
            out[name][rows] = batch[name]
        seen[rows] = True
    if not seen.all():
        raise RuntimeError(f"features of {int((~seen).sum())} images of {data} are missing (first: "
                           f"{keys[~seen][0]})")
    return out  # type: ignore[return-value]


# --- the linear probe ---------------------------------------------------------------------------------------------


def _normalize(features: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return features
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def _classifier(kind: str, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if kind == "svm":
        return LinearSVC(C=c, max_iter=5000, random_state=seed)
    return LogisticRegression(C=c, max_iter=2000)


def fit_and_score(kind: str, c: float, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *,
                  num_classes: int, difficult_train: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Train a linear classifier and score ``x_test``: class scores ``[N, C]``. Multi-hot ``y_train`` ([N, C]) means
    one binary classifier per class, trained without that class's difficult examples."""
    if y_train.ndim == 1:
        clf = _classifier(kind, c, seed).fit(x_train, y_train)
        scores = clf.decision_function(x_test)
        full = np.full((len(x_test), num_classes), -np.inf)  # a class absent from training is never predicted
        if scores.ndim == 1:  # two classes: sklearn returns the score of the second
            scores = np.stack([-scores, scores], axis=1)
        full[:, clf.classes_] = scores
        return full
    columns = []
    for c_idx in range(y_train.shape[1]):
        keep = ~difficult_train[:, c_idx] if difficult_train is not None else np.ones(len(y_train), bool)
        target = y_train[keep, c_idx]
        if target.min() == target.max():  # no positives (or no negatives) to learn from
            columns.append(np.full(len(x_test), float(target.max())))
            continue
        columns.append(_classifier(kind, c, seed).fit(x_train[keep], target).decision_function(x_test))
    return np.stack(columns, axis=1)


def linear_probe(index: DatasetIndex, features: np.ndarray, split: ProtocolSplit, cfg: TransferConfig
                 ) -> dict[str, Any]:
    """Choose C on ``split.val`` (training on ``split.fit``), refit on ``split.train``, score ``split.test``."""
    x = _normalize(features, cfg.feature_norm)
    y = index.labels

    def fit(c: float, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        difficult = None if index.difficult is None else index.difficult[train]
        return fit_and_score(cfg.classifier, c, x[train], y[train], x[test], num_classes=index.num_classes,
                             difficult_train=difficult, seed=cfg.seed)

    search = {c: score_predictions(index, split.val, fit(c, split.fit, split.val))["value"] for c in cfg.c_grid}
    best_c = max(cfg.c_grid, key=lambda c: (search[c], -c))  # ties: the stronger regularisation
    scores = fit(best_c, split.train, split.test)
    return {**score_predictions(index, split.test, scores), "C": best_c, "scores": scores,
            "val_search": {str(c): v for c, v in search.items()}, "train_images": len(split.train),
            "test_images": len(split.test)}


# --- fine-tuning on Ray Train -------------------------------------------------------------------------------------


def load_images(data: str, keys: list[str], *, threads: int = 4) -> tuple[np.ndarray, list[str]]:
    """The stored images of ``keys`` (any split of the prepared dataset ``data``), decoded to uint8
    ``[N, 3, S, S]`` in the order of ``keys``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines import prepare

    manifest = prepare.load_manifest(data)
    wanted = pa.array(list(keys), pa.string())
    tables = [t.filter(pc.is_in(t["key"], value_set=wanted))
              for t in _split_tables(data, manifest, sorted(manifest["splits"]), ["key", "image"])]
    table = pa.concat_tables(tables)
    position = {k: i for i, k in enumerate(table["key"].to_pylist())}
    missing = [k for k in keys if k not in position]
    if missing:
        raise KeyError(f"{len(missing)} keys are not in {data} (first: {missing[0]})")
    blobs = table["image"].to_pylist()
    ordered = [blobs[position[k]] for k in keys]
    return _decode_batch(ordered, image_format=manifest["image"]["format"], size=manifest["image"]["size"][0],
                         threads=threads), list(keys)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on multi-hot targets where -1 marks an ignored (VOC "difficult") label."""
    mask = (targets >= 0).float()
    loss = F.binary_cross_entropy_with_logits(logits, targets.clamp_min(0).float(), weight=mask, reduction="sum")
    return loss / mask.sum().clamp_min(1.0)


def finetune_optimizer(model: nn.Module, head: nn.Module, *, lr: float, backbone_lr_mult: float, momentum: float,
                       weight_decay: float) -> torch.optim.SGD:
    """SGD with four groups: (pre-trained | new head) x (weights, decayed | biases, not decayed); the pre-trained
    groups carry ``lr_mult = backbone_lr_mult`` (``alexnet.train.set_lr`` applies it)."""
    new = {id(p) for p in head.parameters()}
    groups = []
    for is_new in (False, True):
        for decayed in (True, False):
            params = [p for p in model.parameters() if (id(p) in new) == is_new and (p.ndim > 1) == decayed]
            groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0,
                           "lr_mult": 1.0 if is_new else backbone_lr_mult})
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return optimizer


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, augmentation: Augmentation, *, device: torch.device,
            batch_size: int = 64, multilabel: bool = False) -> np.ndarray:
    """Centre-crop scores: softmax probabilities (multi-class) or logits (multi-label; AP needs only the order)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = augmentation.eval_center(torch.from_numpy(images[start:start + batch_size]).to(device))
        logits = model(x).float()
        out.append((logits if multilabel else logits.softmax(1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def finetune_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Thin adapter: Ray Train context -> backbone with a new fc8 -> epochs of ``train.train_one_epoch`` -> test
    scores in the last checkpoint (rank 0)."""
    import ray.train
    import ray.train.torch

    from alexnet.data import Batch
    from alexnet.train import LRSchedule, epoch_seeds, restore_latest, seed_everything, set_lr, train_one_epoch, unwrap

    c = loop_config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(c["cpus_per_worker"]))
    torch.set_num_threads(threads)
    if c["batch_size"] % world:
        raise ValueError(f"transfer.batch_size {c['batch_size']} is not divisible by {world} workers")
    per_worker = c["batch_size"] // world

    seed_everything(c["seed"])  # identical new heads on every rank
    backbone = load_backbone(c["checkpoint"], imagenet_stats=c["imagenet_stats"])
    model = backbone.model
    head = replace_head(model, c["num_classes"])
    augmentation = backbone.augmentation.to(device)
    model = ray.train.torch.prepare_model(model)
    optimizer = finetune_optimizer(model, head, lr=c["lr"], backbone_lr_mult=c["backbone_lr_mult"],
                                   momentum=c["momentum"], weight_decay=c["weight_decay"])
    schedule = LRSchedule(c["lr"], "step", step_epochs=list(c["step_epochs"]))
    state = restore_latest(FINETUNE_CHECKPOINT, model, optimizer, schedule)
    start_epoch, history = (state["epoch"], state["history"]) if state else (0, [])
    set_lr(optimizer, schedule.lr)

    # Every rank gets the same number of whole batches (DDP steps in lockstep).
    keys, targets = list(c["train_keys"]), np.asarray(c["train_targets"])
    per_rank = len(keys) // world
    mine = np.arange(rank, per_rank * world, world)
    images, _ = load_images(c["data"], [keys[i] for i in mine], threads=threads)
    targets = torch.as_tensor(targets[mine])
    loss_fn = masked_bce if c["multilabel"] else None
    generator = torch.Generator(device=device)

    for epoch in range(start_epoch, c["epochs"]):
        epoch_seeds(c["seed"], epoch, rank, generator)
        order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(c["seed"] + 31 * epoch))
        steps = len(mine) // per_worker if len(mine) >= per_worker else 1
        batches = (Batch(torch.from_numpy(images[order[i * per_worker:(i + 1) * per_worker].numpy()]),
                         targets[order[i * per_worker:(i + 1) * per_worker]]) for i in range(steps))
        sums = train_one_epoch(model, batches, optimizer, augmentation, device=device, generator=generator,
                               loss_fn=loss_fn, epoch=epoch)
        metrics = {"epoch": epoch + 1, "lr": schedule.lr, "train_loss": sums["loss_sum"] / max(1, sums["seen"]),
                   "images_per_s": sums["seen"] / max(1e-9, sums["seconds"])}
        if not c["multilabel"]:
            metrics["train_top1_err"] = 1 - sums["correct"] / max(1, sums["seen"])
        schedule.step(epoch, metrics["train_loss"])
        set_lr(optimizer, schedule.lr)
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "epoch": epoch + 1, "history": history,
                            "num_classes": c["num_classes"], "backbone": backbone.description},
                           Path(tmp) / FINETUNE_CHECKPOINT)
                if epoch + 1 == c["epochs"]:  # the test predictions travel with the final weights
                    test_images, _ = load_images(c["data"], list(c["test_keys"]), threads=threads)
                    scores = predict(unwrap(model), test_images, augmentation, device=device,
                                     multilabel=c["multilabel"])
                    np.savez(Path(tmp) / SCORES_FILE, keys=np.array(c["test_keys"]), scores=scores)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def finetune(index: DatasetIndex, data: str, checkpoint: str, split: ProtocolSplit, cfg: TransferConfig, *,
             run_name: str, imagenet_stats: str | None = None) -> dict[str, Any]:
    """Fine-tune on ``split.train`` with Ray Train and score ``split.test``; rerunning ``run_name`` resumes."""
    from alexnet.train import checkpoint_uri_of, make_trainer, safe_torch_load

    if index.multilabel:  # multi-hot, with -1 where the label is "difficult" (ignored by the loss)
        targets = np.where(index.difficult, -1, index.labels).astype(np.float32)
    else:
        targets = index.labels
    loop_config = {
        "data": data, "checkpoint": checkpoint, "imagenet_stats": imagenet_stats,
        "num_classes": index.num_classes, "multilabel": index.multilabel,
        "train_keys": index.keys[split.train].tolist(), "train_targets": targets[split.train].tolist(),
        "test_keys": index.keys[split.test].tolist(),
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "backbone_lr_mult": cfg.backbone_lr_mult,
        "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "step_epochs": list(cfg.step_epochs),
        "seed": cfg.seed, "cpus_per_worker": cfg.cpus_per_worker,
    }
    trainer, storage_filesystem = make_trainer(
        finetune_loop_per_worker, loop_config, run_name=run_name, storage_path=cfg.storage_path,
        num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu, max_failures=2,
        checkpoints_to_keep=1)
    result = trainer.fit()
    uri = checkpoint_uri_of(result, storage_filesystem)
    if uri is None:
        raise RuntimeError(f"fine-tuning run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = np.load(Path(d) / SCORES_FILE, allow_pickle=False)
        keys, scores = saved["keys"], saved["scores"]
        history = safe_torch_load(Path(d) / FINETUNE_CHECKPOINT, name=f"{uri}/{FINETUNE_CHECKPOINT}")["history"]
    if keys.tolist() != index.keys[split.test].tolist():
        raise RuntimeError(f"{uri}: its test predictions are for other images; delete the run folder and rerun")
    return {**score_predictions(index, split.test, scores), "scores": scores, "checkpoint": uri, "history": history,
            "train_images": len(split.train), "test_images": len(split.test)}


# --- the whole evaluation -----------------------------------------------------------------------------------------


def _summarise(dataset: str, method: str, per_split: list[dict[str, Any]], chance: float, **extra: Any
               ) -> dict[str, Any]:
    values = [r["value"] for r in per_split]
    result = {"dataset": dataset, "method": method, "metric": per_split[0]["metric"],
              "value": float(np.mean(values)), "std": float(np.std(values)) if len(values) > 1 else 0.0,
              "splits": len(values), "per_split": per_split, "chance": chance,
              "literature": LITERATURE[dataset], **extra}
    if "map_auc" in per_split[0]:
        result["map_auc"] = float(np.mean([r["map_auc"] for r in per_split]))
    return result


def run_transfer(dataset: str, data: str, checkpoint: str, *, method: str, config: TransferConfig,
                 imagenet_stats: str | None = None, ray_address: str | None = None, tracking: bool = True,
                 tracking_uri: str | None = None, experiment: str = "alexnet", parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the prepared transfer dataset ``data`` with ``method`` ("probe" or "finetune")
    under the dataset's standard protocol; log an MLflow run (a child of ``parent_run_id`` when given) with the
    results beside the literature. Returns the results."""
    from pipelines import prepare, storage
    from pipelines.rayutil import check_resources, ensure_ray

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    started = time.time()
    data = storage.absolute(data)
    if not storage.is_s3(checkpoint):
        checkpoint = storage.absolute(checkpoint)
    read_checkpoint_state(checkpoint)  # a missing, foreign or crafted checkpoint fails here, before any data or Ray
    index = load_index(data)
    if index.dataset != dataset:
        raise ValueError(f"{data} holds {index.dataset}, not {dataset}")
    splits = protocol_splits(index, config)
    ensure_ray(ray_address)
    if method == "finetune":
        check_resources("transfer", num_workers=config.num_workers, cpus_per_worker=config.cpus_per_worker,
                        use_gpu=config.use_gpu)
    test_rows = splits[0].test
    chance = chance_level(index, test_rows)
    identity = hashlib.sha256(json.dumps([checkpoint, prepare.manifest_hash(data), asdict(config)],
                                         sort_keys=True).encode()).hexdigest()[:10]
    test_scores: dict[str, dict[str, np.ndarray]] = {}  # per evaluation: what the devkit needs to recompute it
    if method == "probe":
        features = extract_features(data, checkpoint, keys=index.keys, layers=list(config.probe_layers),
                                    batch_size=config.feature_batch_size, use_gpu=config.use_gpu,
                                    num_actors=config.feature_actors, imagenet_stats=imagenet_stats)
        layers = {}
        for layer in config.probe_layers:
            per_split = [{"split": s.name, **linear_probe(index, features[layer], s, config)} for s in splits]
            for s, r in zip(splits, per_split):
                test_scores[f"{layer}-{s.name}"] = per_image_scores(index, s.test, r.pop("scores"))
            layers[layer] = _summarise(dataset, method, per_split, chance, layer=layer)
            log.info("%s probe %s: %s %.4f", dataset, layer, layers[layer]["metric"], layers[layer]["value"])
        result = {**layers[config.probe_layers[0]], "layers": layers}
    else:
        chosen = splits[: config.finetune_splits] if dataset == "caltech101" else splits
        per_split = [{"split": s.name, **finetune(index, data, checkpoint, s, config,
                                                   run_name=f"transfer-{dataset}-{s.name}-{identity}",
                                                   imagenet_stats=imagenet_stats)} for s in chosen]
        for s, r in zip(chosen, per_split):
            test_scores[f"finetune-{s.name}"] = per_image_scores(index, s.test, r.pop("scores"))
        result = _summarise(dataset, method, per_split, chance, layer="all (fine-tuned)")
        log.info("%s finetune: %s %.4f", dataset, result["metric"], result["value"])
    result.update(checkpoint=checkpoint, data=data, data_manifest_sha256=prepare.manifest_hash(data),
                  classes=index.num_classes,
                  images={s: int((index.splits == s).sum()) for s in np.unique(index.splits)},
                  elapsed_s=round(time.time() - started, 2), config=asdict(config))
    if tracking:
        result["mlflow_run_id"] = log_transfer(result, tracking_uri=tracking_uri, experiment=experiment,
                                               parent_run_id=parent_run_id, tags=tags, test_scores=test_scores)
    return result


def per_image_scores(index: DatasetIndex, rows: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """One evaluation's test predictions as saved in ``test_scores/<layer|finetune>-<split>.npz``: ``keys`` (the
    images' keys, as in the official file lists), ``scores`` ``[N, C]``, ``labels`` (class index; VOC: multi-hot
    ``[N, C]``), ``difficult`` (VOC: ``[N, C]``, true where only difficult instances; else all false) and
    ``classes`` (column order). VOC's ``VOCevalcls.m`` ground truth is ``gt = 2*labels - 1`` with 0 where
    ``difficult``."""
    labels = index.labels[rows]
    difficult = index.difficult[rows] if index.difficult is not None else np.zeros(len(rows), bool)
    return {"keys": index.keys[rows].astype(str), "scores": np.asarray(scores, np.float64), "labels": labels,
            "difficult": difficult, "classes": np.array(index.class_names, dtype=str)}


# --- tracking -----------------------------------------------------------------------------------------------------


def log_transfer(result: dict[str, Any], *, tracking_uri: str | None = None, experiment: str = "alexnet",
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 test_scores: dict[str, dict[str, np.ndarray]] | None = None) -> str:
    """One MLflow run ``transfer-<dataset>-<method>``: config, headline and per-split metrics, per-class numbers,
    the results table (json, md, MLflow table) beside the literature, and the per-image test scores of every
    evaluation (``test_scores/<name>.npz``, see ``per_image_scores``). Returns the run id."""
    from alexnet.tracking import RunLogger, git_commit, resolve_tracking_uri

    run = RunLogger(resolve_tracking_uri(tracking_uri), experiment,
                    run_name=f"transfer-{result['dataset']}-{result['method']}", parent_run_id=parent_run_id,
                    tags={"alexnet.stage": "transfer", "alexnet.transfer.dataset": result["dataset"],
                          "alexnet.transfer.method": result["method"], "transfer.checkpoint": result["checkpoint"],
                          "data_manifest_sha256": result["data_manifest_sha256"], "git_commit": git_commit(),
                          **(tags or {})})
    run.log_params({f"transfer.{k}": v for k, v in result["config"].items()}
                   | {"dataset": result["dataset"], "method": result["method"], "checkpoint": result["checkpoint"],
                      "data": result["data"]})
    metrics = {result["metric"]: result["value"], f"{result['metric']}_std": result["std"], "chance": result["chance"],
               "literature": result["literature"]["value"]}
    if "map_auc" in result:
        metrics["map_auc"] = result["map_auc"]
    for layer, lr in (result.get("layers") or {}).items():
        metrics[f"{layer}_{lr['metric']}"] = lr["value"]
    run.log_metrics(metrics, step=0)
    for i, split in enumerate(result["per_split"]):
        run.log_metrics({f"split_{result['metric']}": split["value"]}, step=i)
        for epoch in split.get("history", []):
            run.log_metrics({f"split{i}_{k}": v for k, v in epoch.items() if k != "epoch"}, step=int(epoch["epoch"]))
    table = transfer_table([result])
    run.log_dict({k: v for k, v in result.items() if k != "config"}, "transfer_results.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "transfer_results.md"
        path.write_text(markdown(table))
        run.log_file(path)
        for name, arrays in (test_scores or {}).items():
            np.savez(Path(tmp) / f"{name}.npz", **arrays)
            run.log_file(Path(tmp) / f"{name}.npz", TEST_SCORES_DIR)
    run._client.log_table(run.run_id, data=table, artifact_file="transfer_table.json")
    run.end()
    return run.run_id


# --- entry point --------------------------------------------------------------------------------------------------


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The small, JSON-able part of a ``run_transfer`` result (what the flow keeps and the CLI prints last): the
    headline and per-layer numbers, per-split values, chance, the literature and where the result came from."""
    keep = ("dataset", "method", "layer", "metric", "value", "std", "splits", "chance", "map_auc", "literature",
            "checkpoint", "data", "data_manifest_sha256", "classes", "images", "elapsed_s", "mlflow_run_id")
    out = {k: result[k] for k in keep if k in result}
    out["split_values"] = [r["value"] for r in result["per_split"]]
    out["layers"] = {name: {k: v for k, v in r.items() if k not in ("per_split", "literature")}
                     for name, r in (result.get("layers") or {}).items()}
    return out


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from alexnet.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    result = run_transfer(args.dataset, args.data, args.checkpoint, method=args.method, config=cfg.transfer,
                          imagenet_stats=args.imagenet_stats, ray_address=args.ray_address, tracking=args.tracking,
                          tracking_uri=args.tracking_uri or cfg.tracking.tracking_uri or None,
                          experiment=args.experiment or cfg.tracking.experiment)
    print(markdown(transfer_table([result])))
    print(json.dumps(summarize(result), indent=2, default=str))
    return result
