"""Features of an ImageNet network and the DeCAF-style linear probe on them.

``load_backbone``: a checkpoint of ``alexnet train`` or torchvision AlexNet weights, with the input normalisation
it was trained with; ``extract_features``: centre-crop activations (fc6, fc7, ...) with Ray Data on actors;
``linear_probe``: L2-normalised features, a linear classifier whose C is chosen on the validation split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from alexnet.augment import Augmentation
from alexnet.config import TransferConfig
from alexnet.protocols import DatasetIndex, ProtocolSplit, decode_stored_batch, score_predictions
from pipelines.dataset import PreparedDataset

log = logging.getLogger(__name__)

# --- the network --------------------------------------------------------------------------------------------------


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


def check_checkpoint(checkpoint: str) -> dict[str, Any]:
    """Before any data work: the checkpoint's ``meta.json`` sidecar when it has one (a small read instead of the
    whole file: 490 MB on S3 for the paper net), else its state, read with ``weights_only=True`` (a missing, foreign
    or crafted file fails here). Every load of the weights themselves is ``weights_only=True`` too."""
    from alexnet.checkpoints import read_sidecar

    meta = read_sidecar(checkpoint)
    return meta if meta is not None else read_checkpoint_state(checkpoint)


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
                                    "mean_image.npy as imagenet_stats (on the command line: --imagenet-stats URI)") from None
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
        images = decode_stored_batch(batch["image"], image_format=self.image_format, size=self.size, threads=self.threads)
        x = self.augmentation.eval_center(torch.from_numpy(images).to(self.device))
        taps = self.model.forward_taps(x, self.layers)
        return {"key": batch["key"], **{name: taps[name].float().cpu().numpy() for name in self.layers}}


def feature_batches(data: str | PreparedDataset, checkpoint: str, *, layers: list[str], splits: list[str] | None = None,
                    batch_size: int = 128, use_gpu: bool = False, num_actors: int = 0,
                    imagenet_stats: str | None = None, ray_address: str | None = None):
    """Activations of ``layers`` for the images of ``splits`` (default all) of the prepared dataset ``data``,
    computed by a pool of Ray Data actors (one GPU each with ``use_gpu``), streamed as numpy batches
    ``{"key": [B], layer: [B, D], ...}`` in no particular order (memory stays bounded on any dataset size)."""
    import ray.data

    from pipelines import storage
    from pipelines.rayutil import cpu_concurrency, ensure_ray

    prepared = PreparedDataset.of(data)
    manifest = prepared.manifest
    uris = [u for split in sorted(splits or prepared.splits) for u in prepared.shard_uris(split)]
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


def extract_features(data: str | PreparedDataset, checkpoint: str, *, keys: np.ndarray, layers: list[str], batch_size: int = 128,
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
        uri = data.uri if isinstance(data, PreparedDataset) else data
        raise RuntimeError(f"features of {int((~seen).sum())} images of {uri} are missing (first: "
                           f"{keys[~seen][0]})")
    return out  # type: ignore[return-value]


def normalize_features(features: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return features
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def make_classifier(kind: str, c: float, seed: int):
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
        clf = make_classifier(kind, c, seed).fit(x_train, y_train)
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
        columns.append(make_classifier(kind, c, seed).fit(x_train[keep], target).decision_function(x_test))
    return np.stack(columns, axis=1)


def linear_probe(index: DatasetIndex, features: np.ndarray, split: ProtocolSplit, cfg: TransferConfig
                 ) -> dict[str, Any]:
    """Choose C on ``split.val`` (training on ``split.fit``), refit on ``split.train``, score ``split.test``."""
    x = normalize_features(features, cfg.feature_norm)
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
