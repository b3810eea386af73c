"""Typed configuration, one section per concern, loaded from the YAML presets in ``configs/``.

A preset is a YAML file with the sections below; every key is checked (an unknown key is an error naming the
section and the valid keys) and ``--set section.key=value`` overrides are parsed to the field's type. Only entry
points unpack a ``Config``: library functions take plain arguments.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines import ranges


class _Ranged:
    """A config section whose numeric fields are checked against :data:`RANGES` when it is made."""

    def __post_init__(self) -> None:
        section = getattr(self, "SECTION", "") or type(self).__name__.removesuffix("Config").lower()  # TrainConfig -> train
        for key, spec in RANGES.items():
            if key.startswith(f"{section}."):
                value = getattr(self, key.split(".", 1)[1])
                for v in value if isinstance(value, list) else [value]:
                    ranges.check(key, v, spec)


@dataclass
class DataConfig(_Ranged):
    """Where the prepared ImageNet is and how batches are made from it."""

    data: str = ""  #: prepared dataset URI (folder or s3://), with stats.json and mean_image.npy
    train_split: str = "train"
    val_split: str = "val"
    normalize: Literal["mean_image", "channel"] = "mean_image"  #: the paper subtracts the mean image
    #: the network's pixel unit: 255 = raw 0-255 RGB minus the mean image, the paper's (its LRN and init constants
    #: assume it); 1 = pixels in [0, 1] (torchvision's weights, with normalize "channel"). stats.json stays on [0, 1]
    pixel_scale: Literal[255, 1] = 255
    lighting_std: float = 0.1  #: std of the PCA colour noise coefficients (paper: 0.1); 0 disables
    crop: int = 224  #: training/evaluation patch size
    shuffle_buffer: int = 4096  #: rows mixed in memory on top of the shuffled row-group order
    decode_threads: int = 0  #: JPEG decoding threads per worker; 0 = automatic
    limit_train: int = 0  #: rows per epoch per run (smoke runs); 0 = all
    limit_val: int = 0


@dataclass
class ModelConfig(_Ranged):
    """The network (see ``alexnet.model.build_model``)."""

    variant: Literal["paper", "one-gpu", "torchvision"] = "paper"  #: one-gpu: the paper's half-kernel one-tower net
    num_classes: int = 0  #: 0 = from the dataset's manifest
    lrn: bool = True
    overlap_pool: bool = True
    groups: int = 2
    dropout: float = 0.5
    init: Literal["paper", "kaiming", "caffe"] = "paper"
    activation: Literal["relu", "tanh"] = "relu"  #: tanh: the saturating units of the paper's figure 1


@dataclass
class TrainConfig(_Ranged):
    """The paper's recipe (section 5) and how it runs on Ray Train."""

    epochs: int = 90
    batch_size: int = 128  #: global batch, split evenly across workers (the paper: 128)
    lr: float = 0.01  #: at the global batch of 128; see lr_scaling
    lr_scaling: Literal["none", "linear"] = "none"  #: "linear": lr * batch_size / 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["plateau", "step"] = "plateau"
    #: plateau: divide lr by 10 when val top-1 error has not improved by `plateau_threshold` for `patience`
    #: epochs, at most `max_lr_drops` times (the paper: three times)
    patience: int = 5
    plateau_threshold: float = 0.001
    max_lr_drops: int = 3
    #: plateau: no drop before this many epochs, nor sooner than this after the previous drop (the paper drops
    #: three times in about 90 epochs), so a stalled start cannot use up the drops
    min_epochs_before_drop: int = 10
    min_epochs_between_drops: int = 10
    step_epochs: list[int] = field(default_factory=lambda: [30, 60, 80])  #: schedule "step": drop at these
    label_smoothing: float = 0.0
    seed: int = 0
    num_workers: int = 1  #: Ray Train workers (one per GPU)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    bf16: bool = False  #: autocast matmuls/convs to bfloat16 (GPU)
    channels_last: bool = False
    compile: bool = False  #: torch.compile the model
    storage_path: str = "runs/ray"  #: Ray Train storage (local folder or s3://): checkpoints, results
    run_name: str = "alexnet"  #: rerunning the same name resumes from its latest checkpoint
    #: auto: resume run_name's latest checkpoint if it was trained on the same data (manifest sha256) and model,
    #: else refuse; force: resume it anyway (the weights must still fit the model); never: refuse to resume
    resume: Literal["auto", "force", "never"] = "auto"
    max_failures: int = 3  #: worker-group restarts from the last checkpoint
    checkpoints_to_keep: int = 2
    log_every: int = 50  #: steps between progress lines; 0 = none


@dataclass
class TrackingConfig:
    """MLflow: the default store (sqlite:///mlflow.db) unless MLFLOW_TRACKING_URI or tracking_uri is set."""

    tracking_uri: str = ""
    experiment: str = "alexnet"
    log_model: bool = True
    registered_model: str = ""  #: register the final model under this name ("" = do not register)
    system_metrics: bool = True  #: MLflow system metrics (CPU, memory, GPU) on the training run


TRANSFER_DATASETS = ("caltech101", "flowers102", "voc2007")
TRANSFER_METHODS = ("probe", "finetune")


@dataclass
class TransferConfig(_Ranged):
    """Transfer learning (``alexnet.transfer``): the datasets' standard protocols, a linear probe and fine-tuning.

    Probe (DeCAF, Donahue et al. 2014; Razavian et al. 2014): centre-crop features of ``probe_layers``, L2-normalised,
    and a linear classifier whose C is chosen on a validation split from ``c_grid``, then refit on train+val.
    Fine-tuning (Caffe's "finetune" recipe): fc8 replaced, every layer trained with SGD, the pre-trained layers at
    ``backbone_lr_mult`` times the new layer's ``lr``, with the paper's augmentation.
    """

    datasets: list[str] = field(default_factory=lambda: ["caltech101", "flowers102", "voc2007"])
    methods: list[str] = field(default_factory=lambda: ["probe", "finetune"])
    probe_layers: list[str] = field(default_factory=lambda: ["fc7", "fc6"])  #: the first is the headline number
    classifier: Literal["logreg", "svm"] = "logreg"  #: logistic regression or a linear SVM (one-vs-rest)
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])  #: inverse regularisation
    feature_norm: Literal["l2", "none"] = "l2"
    feature_batch_size: int = 128
    feature_actors: int = 0  #: Ray Data actors extracting features; 0 = one per GPU (use_gpu), else CPUs - 1
    caltech_train_per_class: int = 30  #: Caltech-101 protocol: 30 training images per class ...
    caltech_test_per_class: int = 50  #: ... and the rest, at most 50 per class, for testing
    caltech_splits: int = 5  #: seeded random splits, mean and std reported
    caltech_val_per_class: int = 5  #: held out of the training images to choose C, then refit on all of them
    finetune_splits: int = 5  #: Caltech-101 splits that are fine-tuned (each one a training run)
    epochs: int = 30  #: fine-tuning epochs
    batch_size: int = 128  #: global fine-tuning batch
    lr: float = 0.01  #: learning rate of the new fc8
    backbone_lr_mult: float = 0.1  #: pre-trained layers learn at lr * this (Caffe: 0.001 vs 0.01)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    step_epochs: list[int] = field(default_factory=lambda: [20, 27])  #: divide the learning rates by 10 at these
    num_workers: int = 1  #: Ray Train workers for fine-tuning (one per GPU)
    use_gpu: bool = False  #: fine-tuning workers and feature actors on GPUs
    cpus_per_worker: float = 1.0
    seed: int = 0
    storage_path: str = "runs/transfer"  #: Ray Train storage for fine-tuning checkpoints (folder or s3://)


@dataclass
class PrepareConfig(_Ranged):
    """How ``prepare`` stores and shards a dataset (``pipelines.imaging.ImageRecipe``, ``prepare_dataset``): the
    flow's prepare stages and the defaults of ``alexnet prepare``."""

    image_format: Literal["jpeg", "raw"] = "jpeg"  #: stored image encoding: JPEG bytes or raw HWC uint8 RGB
    quality: int = 90  #: JPEG quality of the stored 256x256 images
    shard_rows: int = 0  #: images per Parquet shard; 0 = about 96 MB per shard
    max_bad_fraction: float = 0.01  #: fail when more than this fraction of the inputs cannot be decoded
    verify_downloads: bool = True  #: check the published MD5s of downloaded files (the flow's download stages)


@dataclass
class SyntheticConfig(_Ranged):
    """The tiny ImageNet the flow writes into ``raw_uri`` with ``synthetic=True`` (``alexnet synth imagenet``)."""

    classes: int = 10  #: at least 3: the quirky files belong to real wnids
    train_per_class: int = 40
    val_per_class: int = 10
    size: int = 320  #: typical longer side of an image, pixels
    seed: int = 0
    quirks: bool = True  #: the real archive's quirks (CMYK, PNG-in-JPEG, undecodable files)


@dataclass
class TransferDataConfig(_Ranged):
    """Where the flow's transfer stage finds each dataset's official archives and puts its prepared copy."""

    SECTION = "transfer_data"

    raw_root: str = "runs/smoke/transfer-raw"  #: <raw_root>/<dataset>/ holds the official archives (folder or s3://)
    data_root: str = "runs/smoke/transfer"  #: <data_root>/<dataset>/ receives the prepared dataset
    source_uri: str = ""  #: download the archives from <source_uri>/<dataset>/ first (https://, s3://, a folder)
    #: write small synthetic datasets into raw_root first; auto: when the flow's `synthetic` is true
    synthetic: Literal["auto", "true", "false"] = "auto"
    max_bad_fraction: float = 0.01
    #: prepared ImageNet with the stats.json the checkpoint was trained with; "" = the one in the checkpoint's config
    imagenet_stats: str = ""


@dataclass
class EvaluateConfig(_Ranged):
    """The flow's evaluate stage: the crops (1: centre crop, 10: the paper's ten) and batching."""

    crops: list[int] = field(default_factory=lambda: [1, 10])
    batch_size: int = 128
    limit: int = 0  #: evaluate only this many validation images; 0 = the whole split


#: The allowed values of every numeric field, in interval notation (``pipelines.ranges``); a list's range applies to
#: each element. Adding a numeric field means adding its line here (``tests/test_config.py`` checks every one has).
RANGES: dict[str, str] = {
    "data.lighting_std": "[0, inf)",
    "data.crop": "[1, inf)",
    "data.shuffle_buffer": "[0, inf)",  # 0 or 1: no row-level shuffling
    "data.decode_threads": "[0, inf)",  # 0: automatic
    "data.limit_train": "[0, inf)",  # 0: all
    "data.limit_val": "[0, inf)",
    "model.num_classes": "[0, inf)",  # 0: from the manifest
    "model.groups": "[1, inf)",
    "model.dropout": "[0, 1)",
    "train.epochs": "[1, inf)",
    "train.batch_size": "[1, inf)",
    "train.lr": "(0, inf)",
    "train.momentum": "[0, 1)",
    "train.weight_decay": "[0, inf)",
    "train.patience": "[1, inf)",
    "train.plateau_threshold": "[0, inf)",
    "train.max_lr_drops": "[0, inf)",
    "train.min_epochs_before_drop": "[0, inf)",
    "train.min_epochs_between_drops": "[0, inf)",
    "train.step_epochs": "[1, inf)",
    "train.label_smoothing": "[0, 1)",
    "train.seed": "[0, inf)",
    "train.num_workers": "[1, inf)",
    "train.cpus_per_worker": "(0, inf)",
    "train.max_failures": "[0, inf)",
    "train.checkpoints_to_keep": "[1, inf)",
    "train.log_every": "[0, inf)",  # 0: no progress lines
    "transfer.c_grid": "(0, inf)",
    "transfer.feature_batch_size": "[1, inf)",
    "transfer.feature_actors": "[0, inf)",  # 0: automatic
    "transfer.caltech_train_per_class": "[1, inf)",
    "transfer.caltech_test_per_class": "[1, inf)",
    "transfer.caltech_splits": "[1, inf)",
    "transfer.caltech_val_per_class": "[1, inf)",
    "transfer.finetune_splits": "[1, inf)",
    "transfer.epochs": "[1, inf)",
    "transfer.batch_size": "[1, inf)",
    "transfer.lr": "(0, inf)",
    "transfer.backbone_lr_mult": "[0, inf)",
    "transfer.momentum": "[0, 1)",
    "transfer.weight_decay": "[0, inf)",
    "transfer.step_epochs": "[1, inf)",
    "transfer.num_workers": "[1, inf)",
    "transfer.cpus_per_worker": "(0, inf)",
    "transfer.seed": "[0, inf)",
    "prepare.quality": "[1, 100]",
    "prepare.shard_rows": "[0, inf)",  # 0: about 96 MB per shard
    "prepare.max_bad_fraction": "[0, 1]",
    "synthetic.classes": "[3, inf)",
    "synthetic.train_per_class": "[1, inf)",
    "synthetic.val_per_class": "[1, inf)",
    "synthetic.size": "[32, inf)",
    "synthetic.seed": "[0, inf)",
    "transfer_data.max_bad_fraction": "[0, 1]",
    "evaluate.crops": "[1, 10]",  # 1 or 10 (the flow checks which)
    "evaluate.batch_size": "[1, inf)",
    "evaluate.limit": "[0, inf)",  # 0: all
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    transfer_data: TransferDataConfig = field(default_factory=TransferDataConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.01, ...}``: for MLflow params."""
        return {f"{s}.{k}": v for s, section in self.to_dict().items() for k, v in section.items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid: {sorted(sections)}")
        built = {}
        for name, f in sections.items():
            section_cls = f.default_factory  # type: ignore[misc]
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ValueError(f"config section {name!r} must be a mapping, not {type(values).__name__}")
            valid = {g.name: g for g in dataclasses.fields(section_cls)}
            bad = set(values) - set(valid)
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in section {name!r}; valid: {sorted(valid)}")
            hints = typing.get_type_hints(section_cls)
            built[name] = section_cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()})
        return cls(**built)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and, for strings from the command line, parse) ``value`` against the field's type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, str):  # `--set data.pixel_scale=1`: an int choice given as text
            value = next((a for a in typing.get_args(hint) if not isinstance(a, str) and str(a) == value), value)
        if value not in typing.get_args(hint):
            raise ValueError(f"{where} must be one of {list(typing.get_args(hint))}, not {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        (inner,) = typing.get_args(hint)
        return [_coerce(v, inner, where) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{where}: union types are not supported in configs")
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"{where} must be true or false, not {value!r}")
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, not {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, not {value!r}")
        try:
            number = hint(value) if isinstance(value, str) or hint is float else value
        except ValueError:
            kind = "an integer" if hint is int else "a number"
            raise ValueError(f"{where} must be {kind}, not {value!r}") from None
        if hint is int and (not isinstance(number, int) or isinstance(number, bool)):
            raise ValueError(f"{where} must be an integer, not {value!r}")
        return number
    if hint is str:
        return str(value)
    return value


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``["train.lr=0.02", "data.data=s3://x"]`` -> ``{"train": {"lr": "0.02"}, "data": {"data": "s3://x"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=0.02)")
        out.setdefault(section, {})[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A preset (YAML) with ``section.key=value`` overrides applied; no path = the built-in defaults."""
    raw: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config is a mapping of sections, not {type(raw).__name__}")
    for section, values in parse_overrides(overrides or []).items():
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping")
        raw[section].update(values)
    try:
        return Config.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path or 'config'}: {e}") from None
