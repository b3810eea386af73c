"""The transfer datasets' standard protocols and metrics, devkit-exact.

``load_index``: every image of a prepared transfer dataset without pixels; ``protocol_splits``: Caltech-101's
5 seeded 30-per-class splits, Flowers-102's trnid/valid/tstid, VOC 2007's train/val/test; the metrics: mean
per-class accuracy, VOC 2007 11-point AP (``VOCevalcls.m``) and the area-under-curve AP of VOC 2010+.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from alexnet.config import TRANSFER_DATASETS as DATASETS
from alexnet.config import TransferConfig
from pipelines.dataset import PreparedDataset

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


def split_tables(dataset: PreparedDataset, splits: list[str], columns: list[str]):
    """``columns`` of every shard of ``splits``, one table per shard, each with a ``split`` column added."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage

    tables = []
    for split in splits:
        for uri in dataset.shard_uris(split):
            fs, path = storage.filesystem(uri)
            table = pq.read_table(path, filesystem=fs, columns=columns)
            tables.append(table.append_column("split", pa.array([split] * table.num_rows, pa.string())))
    return tables


def load_index(data: str | PreparedDataset) -> DatasetIndex:
    """The keys, splits and labels of the prepared dataset ``data`` (``alexnet prepare caltech101|...``; a URI or
    the ``PreparedDataset`` already opened)."""
    import pyarrow as pa

    prepared = PreparedDataset.of(data)
    data, manifest = prepared.uri, prepared.manifest
    dataset = manifest.get("dataset", "imagenet")
    if dataset not in DATASETS:
        raise ValueError(f"{data} holds {dataset!r}, not one of the transfer datasets {DATASETS}; "
                         f"prepare one with `alexnet prepare {'|'.join(DATASETS)} --source SRC --out OUT`")
    multilabel = bool(manifest.get("multi_label"))
    columns = ["key", "label"] + (["labels", "difficult"] if multilabel else [])
    table = pa.concat_tables(split_tables(prepared, prepared.splits, columns))
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


def load_images(data: str | PreparedDataset, keys: list[str], *, threads: int = 4) -> tuple[np.ndarray, list[str]]:
    """The stored images of ``keys`` (any split of the prepared dataset ``data``, a URI or the
    ``PreparedDataset``), decoded to uint8 ``[N, 3, S, S]`` in the order of ``keys``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    prepared = PreparedDataset.of(data)
    data, manifest = prepared.uri, prepared.manifest
    wanted = pa.array(list(keys), pa.string())
    tables = [t.filter(pc.is_in(t["key"], value_set=wanted))
              for t in split_tables(prepared, prepared.splits, ["key", "image"])]
    table = pa.concat_tables(tables)
    position = {k: i for i, k in enumerate(table["key"].to_pylist())}
    missing = [k for k in keys if k not in position]
    if missing:
        raise KeyError(f"{len(missing)} keys are not in {data} (first: {missing[0]})")
    blobs = table["image"].to_pylist()
    ordered = [blobs[position[k]] for k in keys]
    return decode_stored_batch(ordered, image_format=manifest["image"]["format"], size=manifest["image"]["size"][0],
                               threads=threads), list(keys)


def decode_stored_batch(blobs, *, image_format: str, size: int, threads: int = 4) -> np.ndarray:
    """Stored images -> uint8 ``[N, 3, size, size]``."""
    from pipelines import imaging

    out = np.empty((len(blobs), 3, size, size), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = imaging.decode_stored(blobs[i], image_format=image_format, size=size).transpose(2, 0, 1)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, range(len(blobs))))
    return out


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


def mean_per_class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, dict[int, float]]:
    """Mean over the classes present in ``labels`` of each class's accuracy, and the per-class accuracies."""
    per_class = {int(c): float((predictions[labels == c] == c).mean()) for c in np.unique(labels)}
    return float(np.mean(list(per_class.values()))), per_class


def precision_recall(scores: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    precision, recall = precision_recall(np.asarray(scores, np.float64), np.asarray(gt))
    ap = 0.0
    for t in VOC07_RECALL_THRESHOLDS:
        reached = recall >= t
        ap += (float(precision[reached].max()) if reached.any() else 0.0) / 11
    return ap


def auc_ap(scores: np.ndarray, gt: np.ndarray) -> float:
    """Area under the interpolated precision-recall curve, ``VOCap.m`` (VOC2010 onwards): ``mrec=[0;rec;1]``,
    ``mpre=[0;prec;0]`` made monotone from the end, summed (in order) over the points where recall changes."""
    precision, recall = precision_recall(np.asarray(scores, np.float64), np.asarray(gt))
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
