"""Dataset identity and the stages' cache policies: a stage is a cache hit only when its inputs and the data it
reads are the same (results persist in the flow's ``results_dir``)."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import INPUTS, CachePolicy


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(kw_only=True)
class UriListing(CachePolicy):
    """Key part: every file below the URI in the task input ``parameter`` (path, size, modification time), so a
    changed source invalidates the stage. One listing: milliseconds for the official files, longer for millions
    of loose files (ImageFolder layout)."""

    parameter: str = "raw_uri"

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        import pyarrow.fs as pafs

        from pipelines import storage

        fs, root = storage.filesystem(inputs[self.parameter])
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
        return sha256(json.dumps(listing).encode())


@dataclass(kw_only=True)
class DatasetVersion(CachePolicy):
    """Key part: the identity of the prepared dataset at the URI in the task input ``parameter``: the sha256 of its
    ``manifest.json`` and, with ``stats``, the sha256 of its mean image. Read when the task is about to run, so a
    dataset prepared again (or elsewhere) invalidates every stage that read it, even when ``prepare`` was cached."""

    parameter: str = "data_uri"
    stats: bool = False

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        from pipelines import prepare, storage
        from pipelines import stats as stats_mod
        from pipelines.dataset import manifest_hash

        data = inputs[self.parameter]
        manifest_uri = storage.join(data, prepare.MANIFEST)
        stats_uri = storage.join(data, stats_mod.STATS)
        if not storage.exists(manifest_uri) or (self.stats and not storage.exists(stats_uri)):
            return f"incomplete-{uuid.uuid4().hex}"  # never a hit: the stage will report what is missing
        parts = [manifest_hash(data)]  # the dataset's identity, defined once (pipelines.dataset)
        if self.stats:
            parts.append(storage.read_json(stats_uri).get("mean_image_sha256", ""))
        return sha256("/".join(parts).encode())


def inputs_except(*names: str) -> CachePolicy:
    """The task's inputs as cache key, without ``names``."""
    policy = INPUTS
    for name in names:
        policy = policy - name
    return policy


#: Where a stage runs does not change its result; neither does the MLflow lineage of the flow run calling it.
NOT_KEYED = ("ray_address", "job_env")
PREPARE_CACHE = inputs_except(*NOT_KEYED) + UriListing(parameter="raw_uri")
STATS_CACHE = inputs_except(*NOT_KEYED) + DatasetVersion(parameter="data_uri")
TRAIN_CACHE = inputs_except(*NOT_KEYED, "parent_run_id", "tags") + DatasetVersion(parameter="data_uri", stats=True)
EVALUATE_CACHE = inputs_except(*NOT_KEYED) + DatasetVersion(parameter="data_uri", stats=True)
#: Not part of a transfer result's identity: where it runs and the MLflow lineage of the flow run calling it.
TRANSFER_CACHE = inputs_except(*NOT_KEYED, "parent_run_id", "tags") + DatasetVersion(parameter="data_uri")


def refresh(stage: str, refresh: list[str], missing: bool = False) -> bool:
    """Whether to recompute ``stage`` even when cached: its output is ``missing``, or ``refresh`` names it (or all)."""
    return missing or stage in refresh or "all" in refresh
