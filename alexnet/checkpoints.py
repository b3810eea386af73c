"""Checkpoints that describe themselves (nanoGPT style), and the checks made before a run continues one.

A checkpoint folder holds ``checkpoint.pt`` (model, optimizer, schedule, epoch, RNG state, resolved config, data
manifest sha256, history) and ``meta.json``, a small sidecar with what the checks need (config, manifest sha256,
num_classes, epoch): the driver's resume check and transfer's pre-check read the sidecar instead of the full file
(490 MB on S3). Checkpoints from before the sidecar fall back to the full load. Every load is
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alexnet.config import Config
from alexnet.model import build_model

CHECKPOINT_FILE = "checkpoint.pt"
#: The sidecar beside ``checkpoint.pt``: what the pre-checks need, without reading the weights.
META_FILE = "meta.json"
META_KEYS = ("config", "data_manifest_sha256", "stats_sha256", "num_classes", "epoch", "history", "mlflow_run_id")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain ``AlexNet`` inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def checkpoint_state(*, model, optimizer, schedule, epoch, config, num_classes, manifest_sha256, stats_sha256,
                     history, mlflow_run_id) -> dict[str, Any]:
    """Everything needed to resume or to evaluate, self-described (nanoGPT style)."""
    return {
        "model": unwrap(model).state_dict(),
        "num_classes": num_classes,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "epoch": epoch,  # completed epochs
        "rng": rng_state(),
        "config": config,
        "data_manifest_sha256": manifest_sha256,
        "stats_sha256": stats_sha256,
        "history": history,
        "mlflow_run_id": mlflow_run_id,
        "torch_version": str(torch.__version__),  # TorchVersion is a class weights_only=True does not load
    }


def rng_state() -> dict[str, Any]:
    """The RNG states of torch, numpy and Python in types ``torch.load(weights_only=True)`` loads: tensors, ints,
    floats, strings and tuples (numpy's state as an int64 tensor and ints, not an ndarray and numpy scalars)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": (int(version), tuple(int(x) for x in internal), None if gauss_next is None else float(gauss_next)),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_torch_load(source: str | Path | bytes, *, name: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain data only, never an object whose unpickling runs code.
    Anything else is refused with a one-line error naming ``name`` (the file's URI)."""
    import pickle

    f = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ValueError(f"refusing to load {name}: it holds objects other than tensors and plain data, whose "
                         f"unpickling could run code ({reason}); load only checkpoints written by this pipeline's "
                         "`alexnet train` (or torchvision state dicts)") from None


def load_checkpoint(uri: str) -> dict[str, Any]:
    """A checkpoint from a file or checkpoint folder URI (local or s3://)."""
    from pipelines import storage

    if not uri.endswith(".pt"):
        uri = storage.join(uri, CHECKPOINT_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: pass a checkpoint folder written by `alexnet train` or its {CHECKPOINT_FILE}")
    return safe_torch_load(storage.read_bytes(uri), name=uri)


#: Ray Train's record of a run's checkpoints; a rerun of the same name resumes from its latest one.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
#: Settings that change what the network is or what it learns from; a resumed run must keep them (with
#: ``train.resume=auto``). Every ``model.*`` key counts too.
RESUME_DATA_KEYS = ("train_split", "val_split", "normalize", "pixel_scale", "crop")


class ResumeRefused(ValueError):
    """A rerun of ``train.run_name`` would continue a checkpoint of other data or another model (not retried)."""


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The URI of the checkpoint folder a rerun of ``run_name`` under ``storage_path`` resumes from, or None."""
    from pipelines import storage

    run_dir = storage.join(storage.absolute(storage_path), run_name)
    folders = sorted({p.replace(os.sep, "/").split("/")[0] for p, _ in storage.list_files(run_dir)
                      if p.replace(os.sep, "/").endswith("/" + CHECKPOINT_FILE)})
    if not folders:
        return None
    latest = folders[-1]  # Ray names them by time: checkpoint_2026-01-31_12-00-00.123456
    snapshot = storage.join(run_dir, RAY_CHECKPOINT_SNAPSHOT)
    if storage.exists(snapshot):
        try:
            named = (storage.read_json(snapshot).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        except ValueError:
            named = None
        latest = named if named in folders else latest
    return storage.join(run_dir, latest)


def resume_differences(state: dict[str, Any], cfg: Config, *, manifest_sha256: str, num_classes: int) -> list[str]:
    """What differs between a checkpoint and the run about to continue it: the data (manifest sha256), the number
    of classes, ``model.*`` and the data settings of ``RESUME_DATA_KEYS``."""
    saved = checkpoint_config(state)  # a checkpoint from before data.pixel_scale reads as scale 1
    diffs = []
    if state.get("data_manifest_sha256") != manifest_sha256:
        diffs.append(f"data manifest sha256 {str(state.get('data_manifest_sha256'))[:12]} != {manifest_sha256[:12]} "
                     f"(now {cfg.data.data})")
    if state.get("num_classes") != num_classes:
        diffs.append(f"num_classes {state.get('num_classes')} != {num_classes}")
    was, now = saved.to_dict(), cfg.to_dict()
    keys = [("model", k) for k in now["model"]] + [("data", k) for k in RESUME_DATA_KEYS]
    diffs += [f"{s}.{k} {was[s].get(k)!r} != {now[s][k]!r}" for s, k in keys if was[s].get(k) != now[s][k]]
    return diffs


def check_resume(cfg: Config, *, manifest_sha256: str, num_classes: int) -> str | None:
    """Before any training: the checkpoint a rerun of ``train.run_name`` would resume (None: a fresh run), or
    ``ResumeRefused`` when it was made from other data or another model (``train.resume=auto``) or resuming is off
    (``never``). It reads the checkpoint's ``meta.json`` sidecar; a checkpoint without one (written before it) is
    read whole with ``weights_only=True``, so a crafted one fails here, not in a worker."""
    uri = latest_checkpoint(cfg.train.storage_path, cfg.train.run_name)
    if uri is None or cfg.train.resume == "force":
        return uri
    way_out = (f"choose a new train.run_name, or pass train.resume=force to continue {cfg.train.run_name!r} anyway")
    if cfg.train.resume == "never":
        raise ResumeRefused(f"train.run_name={cfg.train.run_name} already has a checkpoint ({uri}) and "
                            f"train.resume=never: choose a new train.run_name (or train.resume=auto to continue it)")
    diffs = resume_differences(read_checkpoint_meta(uri), cfg, manifest_sha256=manifest_sha256, num_classes=num_classes)
    if diffs:
        raise ResumeRefused(f"refusing to resume train.run_name={cfg.train.run_name} from {uri}: it was trained "
                            f"with {'; '.join(diffs)}; {way_out}")
    return uri


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The trained network of a checkpoint, on the CPU, in eval mode."""
    model = build_model(**model_kwargs(checkpoint_config(state), num_classes=state["num_classes"]))
    model.load_state_dict(state["model"])
    return model.eval()


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The resolved config a checkpoint was trained with."""
    raw = {name: dict(section) for name, section in (state.get("config") or {}).items()}
    # Checkpoints written before data.pixel_scale existed were trained on [0, 1] pixels.
    raw.setdefault("data", {}).setdefault("pixel_scale", 1)
    return Config.from_dict(raw)



def model_kwargs(cfg: Config, *, num_classes: int) -> dict[str, Any]:
    m = cfg.model
    return dict(variant=m.variant, num_classes=num_classes, lrn=m.lrn, overlap_pool=m.overlap_pool,
                groups=m.groups, dropout=m.dropout, init=m.init, activation=m.activation)



def checkpoint_meta(state: dict[str, Any]) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint state: its ``META_KEYS`` (no tensors)."""
    return {k: state.get(k) for k in META_KEYS}


def save_checkpoint_files(state: dict[str, Any], folder: str | Path) -> None:
    """A checkpoint folder: ``checkpoint.pt``, its ``meta.json`` sidecar, and ``config.json`` for people."""
    folder = Path(folder)
    torch.save(state, folder / CHECKPOINT_FILE)
    (folder / META_FILE).write_text(json.dumps(checkpoint_meta(state), indent=2))
    (folder / "config.json").write_text(json.dumps(state["config"], indent=2))


def sidecar_uri(uri: str) -> str | None:
    """Where the ``meta.json`` of the checkpoint folder (or its ``checkpoint.pt``) ``uri`` is; None for any other
    file (a torchvision state dict, a fine-tuning checkpoint)."""
    from pipelines import storage

    if uri.endswith("/" + CHECKPOINT_FILE) or uri == CHECKPOINT_FILE:
        return storage.join(uri[: -len(CHECKPOINT_FILE)].rstrip("/") or ".", META_FILE)
    if uri.endswith((".pt", ".pth")):
        return None
    return storage.join(uri, META_FILE)


def read_sidecar(uri: str) -> dict[str, Any] | None:
    """The ``meta.json`` of the checkpoint ``uri``, or None where there is none (checkpoints written before it,
    files of other kinds) or it is not a complete sidecar."""
    from pipelines import storage

    meta_uri = sidecar_uri(uri)
    if meta_uri is None or not storage.exists(meta_uri):
        return None
    try:
        meta = storage.read_json(meta_uri)
    except ValueError:
        return None
    if not isinstance(meta, dict) or not all(k in meta for k in ("config", "data_manifest_sha256", "num_classes")):
        return None
    return meta


def read_checkpoint_meta(uri: str) -> dict[str, Any]:
    """``checkpoint_meta`` of the checkpoint folder (or its ``checkpoint.pt``) ``uri``: from the ``meta.json``
    sidecar when there is one, else (checkpoints written before it) from the full checkpoint."""
    meta = read_sidecar(uri)
    return meta if meta is not None else checkpoint_meta(load_checkpoint(uri))
