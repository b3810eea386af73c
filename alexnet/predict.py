"""Top-k class words and probabilities for image files, from a checkpoint or a registered model.

The images go through exactly what an evaluated image went through: the prepared dataset's recipe (shorter side
256, centre 256x256 crop, stored encoding: ``pipelines.imaging.preprocess``, from the manifest of the dataset the
checkpoint was trained on), then the centre 224 crop or the paper's ten crops (section 4.1) with the checkpoint's
normalisation (``alexnet.train.augmentation_for``: pixel scale, mean image). A torchvision AlexNet state dict is
normalised as torchvision does, and its class names come from torchvision's weights metadata.

    alexnet predict cat.jpg dog.png --checkpoint runs/ray/alexnet-smoke/checkpoint_... --crops 10
    alexnet predict --files images.txt --checkpoint models:/alexnet@champion --json
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alexnet.augment import Augmentation

log = logging.getLogger(__name__)

MODELS_SCHEME = "models:/"


@dataclass
class Predictor:
    """A network, its normalisation, the offline recipe of its inputs and the words of its classes."""

    model: nn.Module
    augmentation: Augmentation
    recipe: Any  #: pipelines.imaging.ImageRecipe of the images it was trained and evaluated on
    classes: list[dict[str, Any]]  #: per output index: label, wnid, words
    description: dict[str, Any]


def resolve_checkpoint(uri: str, *, tracking_uri: str | None = None) -> str:
    """``uri`` itself, or for a registered model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) the latest
    checkpoint of the training run that registered that version (its ``train.storage_path``/``train.run_name``)."""
    if not uri.startswith(MODELS_SCHEME):
        return uri
    import mlflow

    from alexnet.tracking import resolve_tracking_uri
    from alexnet.train import latest_checkpoint

    store = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(store)
    ref = uri[len(MODELS_SCHEME):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        run = client.get_run(version.run_id)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"{uri}: not found in the MLflow registry of {store} ({e.message.splitlines()[0]}); "
                         "pass --tracking-uri or set MLFLOW_TRACKING_URI to the store that holds it") from None
    params = run.data.params
    storage_path, run_name = params.get("train.storage_path"), params.get("train.run_name")
    if not (storage_path and run_name):
        raise ValueError(f"{uri}: version {version.version} comes from run {version.run_id}, which is not a run of "
                         "`alexnet train` (no train.storage_path/train.run_name params)")
    checkpoint = latest_checkpoint(storage_path, run_name)
    if checkpoint is None:
        raise FileNotFoundError(f"{uri}: the training run {version.run_id} wrote its checkpoints to "
                                f"{storage_path}/{run_name}, which holds none here (a relative train.storage_path "
                                "is read from the current directory); pass the checkpoint folder as --checkpoint")
    log.info("%s is version %s of run %s: %s", uri, version.version, version.run_id, checkpoint)
    return checkpoint


def torchvision_classes(num_classes: int) -> list[dict[str, Any]]:
    """torchvision's ImageNet category names (shipped with torchvision, no download) for 1000 outputs, else
    the indices as names."""
    categories: list[str] = []
    try:
        from torchvision.models import AlexNet_Weights

        categories = list(AlexNet_Weights.IMAGENET1K_V1.meta.get("categories") or [])
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    if len(categories) != num_classes:
        categories = [str(i) for i in range(num_classes)]
    return [{"label": i, "wnid": "", "words": words} for i, words in enumerate(categories)]


def load_predictor(checkpoint: str, *, data: str | None = None, tracking_uri: str | None = None) -> Predictor:
    """The network of ``checkpoint`` (a folder or file written by ``alexnet train``, local or ``s3://``; a
    registered model ``models:/NAME@ALIAS``; or a torchvision AlexNet state dict) ready to predict. ``data`` is the
    prepared dataset it was trained on (default: the one in its config): its stats, recipe and class words."""
    from alexnet.transfer import load_backbone
    from pipelines import prepare
    from pipelines.imaging import ImageRecipe

    resolved = resolve_checkpoint(checkpoint, tracking_uri=tracking_uri)
    backbone = load_backbone(resolved, imagenet_stats=data)
    num_classes = int(backbone.description["trained_num_classes"])
    if backbone.description["kind"] == "torchvision":
        # torchvision's eval transform (resize 256, centre crop 224) on losslessly kept pixels
        return Predictor(backbone.model, backbone.augmentation, ImageRecipe(image_format="raw"),
                         torchvision_classes(num_classes), backbone.description | {"requested": checkpoint})
    dataset = backbone.description["imagenet_stats"]
    manifest = prepare.load_manifest(dataset)
    if manifest["num_classes"] != num_classes:
        raise ValueError(f"{dataset} has {manifest['num_classes']} classes; {resolved} predicts {num_classes}: pass "
                         "the prepared dataset it was trained on as --data URI")
    known = {f.name for f in dataclasses.fields(ImageRecipe)}
    recipe = ImageRecipe(**{k: v for k, v in manifest.get("preprocessing", {}).get("recipe", {}).items() if k in known})
    classes = [{"label": c["label"], "wnid": c.get("wnid", ""), "words": c.get("words") or c.get("wnid", "")}
               for c in sorted(manifest["classes"], key=lambda c: c["label"])]
    return Predictor(backbone.model, backbone.augmentation, recipe, classes,
                     backbone.description | {"checkpoint": resolved, "requested": checkpoint})


def read_file_list(path: str) -> list[str]:
    """The image paths of a text file, one per line (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the file list ({e.strerror or e})") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def load_image(path: str, recipe: Any) -> np.ndarray:
    """An image file (local or ``s3://``; JPEG, PNG, anything Pillow reads) -> CHW uint8, as prepared."""
    from pipelines import imaging, storage

    if path.startswith(("http://", "https://")):
        raise ValueError(f"{path}: URLs are not fetched; download the image and pass its path")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        stored, _ = imaging.preprocess(storage.read_bytes(path), recipe)
    except imaging.DecodeError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    pixels = imaging.decode_stored(stored, image_format=recipe.image_format, size=recipe.size)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@torch.no_grad()
def class_probabilities(predictor: Predictor, images: torch.Tensor, *, crops: int = 1) -> torch.Tensor:
    """Softmax ``[N, C]`` of uint8 ``[N, 3, 256, 256]`` images: the centre crop or the ten crops' average."""
    from alexnet.augment import predict_ten_crop

    if crops == 10:
        return predict_ten_crop(predictor.model, images, predictor.augmentation)
    if crops != 1:
        raise ValueError(f"crops must be 1 or 10, not {crops}")
    return predictor.model(predictor.augmentation.eval_center(images)).float().softmax(dim=-1)


def predict(predictor: Predictor, paths: list[str], *, crops: int = 1, topk: int = 5, batch_size: int = 32,
            device: str | None = None) -> dict[str, Any]:
    """The ``topk`` classes of each image in ``paths`` with their probabilities. Every file is read and decoded
    before the network runs, so a bad file fails at once, naming it."""
    if not paths:
        raise ValueError("no images: pass image paths or --files LIST")
    if topk < 1:
        raise ValueError(f"topk must be at least 1, not {topk}")
    if crops not in (1, 10):
        raise ValueError(f"crops must be 1 or 10, not {crops}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    predictor.model.to(dev).eval()
    predictor.augmentation = predictor.augmentation.to(dev)
    pixels = [load_image(p, predictor.recipe) for p in paths]
    k = min(topk, len(predictor.classes))
    results = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(np.stack(pixels[start : start + batch_size])).to(dev)
        probs = class_probabilities(predictor, batch, crops=crops).cpu()
        top_p, top_i = probs.topk(k, dim=-1)
        for path, ps, idx in zip(paths[start : start + batch_size], top_p.tolist(), top_i.tolist()):
            results.append({"image": path, "predictions": [
                {"rank": r + 1, **predictor.classes[i], "probability": p} for r, (p, i) in enumerate(zip(ps, idx))]})
    return {"checkpoint": predictor.description.get("checkpoint"), "model": predictor.description.get("kind"),
            "crops": crops, "topk": k, "images": results}


def format_table(result: dict[str, Any]) -> str:
    """One block per image: rank, probability, wnid and words of its top classes."""
    lines = []
    for item in result["images"]:
        lines.append(item["image"])
        for p in item["predictions"]:
            wnid = f"{p['wnid']}  " if p["wnid"] else ""
            lines.append(f"  {p['rank']}. {p['probability']:7.2%}  {wnid}{p['words']}")
    return "\n".join(lines)
