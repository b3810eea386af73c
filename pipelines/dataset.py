"""A prepared dataset, opened once: ``PreparedDataset`` (manifest, its sha256, statistics) and the files' names.

``alexnet prepare`` writes ``<data>/manifest.json`` last and ``alexnet stats`` writes ``stats.json`` and
``mean_image.npy`` beside it (``conventions.md``). The driver of a stage opens the dataset once
(``PreparedDataset.open``) and hands the object to readers, training workers, evaluation and transfer, which then
read no manifest of their own. Its plain fields travel to Ray workers as they are (or as ``to_dict()`` JSON); the
mean image (3x256x256 float32) is read where it is used, by ``mean_image()``. It holds the dataset's URI and what
``prepare``/``stats`` wrote, nothing else: credentials of the storage stay in the environment.

The manifest's sha256 (``manifest_hash``), the identity of a dataset in checkpoints and lineage tags, is defined
here and only here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipelines import storage

MANIFEST = "manifest.json"
STATS = "stats.json"
MEAN_IMAGE = "mean_image.npy"


class PrepareError(RuntimeError):
    """Preprocessing cannot finish (too many rejects, an output from other inputs in the way), or a dataset is
    not completely prepared."""


def manifest_sha256(raw: bytes) -> str:
    """The identity of a prepared dataset: sha256 of its ``manifest.json`` bytes."""
    return hashlib.sha256(raw).hexdigest()


def manifest_hash(data: str) -> str:
    """``manifest_sha256`` of the prepared dataset at ``data``."""
    return manifest_sha256(storage.read_bytes(storage.join(data, MANIFEST)))


def _read_manifest(data: str) -> bytes:
    uri = storage.join(data, MANIFEST)
    if not storage.exists(uri):
        raise PrepareError(
            f"{uri} not found: {data} is not a complete prepared dataset. "
            f"Run `alexnet prepare imagenet --source SRC --out {data}` (or caltech101, flowers102, voc2007 for the "
            "transfer datasets; it resumes an interrupted run)."
        )
    return storage.read_bytes(uri)


def load_manifest(data: str) -> dict[str, Any]:
    """The manifest of a prepared dataset; a clear error when the dataset is missing or incomplete."""
    return json.loads(_read_manifest(data))


def shard_uris(data: str, manifest: dict[str, Any], split: str) -> list[str]:
    return [storage.join(data, s["path"]) for s in manifest["splits"][split]["shards"]]


def load_stats_json(data: str) -> dict[str, Any]:
    """``stats.json`` of a prepared dataset; a clear error when ``alexnet stats`` has not run."""
    uri = storage.join(data, STATS)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: run `alexnet stats --data {data}` first")
    return storage.read_json(uri)


def load_stats(data: str) -> tuple[dict[str, Any], Any]:
    """(stats, mean image) of a prepared dataset; a clear error when ``alexnet stats`` has not run."""
    stats = load_stats_json(data)
    return stats, storage.read_numpy(storage.join(data, MEAN_IMAGE))


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset as one stage sees it: where it is, its manifest and sha256, and (when opened with
    ``stats=True``) its ``stats.json``."""

    uri: str
    manifest: dict[str, Any]
    manifest_sha256: str
    stats: dict[str, Any] | None = None

    @classmethod
    def open(cls, uri: str, *, stats: bool = False) -> PreparedDataset:
        """Read ``manifest.json`` once (its bytes give the sha256 too) and, with ``stats``, ``stats.json``."""
        raw = _read_manifest(uri)
        return cls(uri, json.loads(raw), manifest_sha256(raw), load_stats_json(uri) if stats else None)

    @classmethod
    def of(cls, data: str | PreparedDataset, *, stats: bool = False) -> PreparedDataset:
        """``data`` itself when it is already open (with stats when ``stats``), else ``open(data)``."""
        if isinstance(data, PreparedDataset):
            return data.with_stats() if stats else data
        return cls.open(data, stats=stats)

    def with_stats(self) -> PreparedDataset:
        """This dataset with its ``stats.json`` read (itself when it has it)."""
        if self.stats is not None:
            return self
        return PreparedDataset(self.uri, self.manifest, self.manifest_sha256, load_stats_json(self.uri))

    @property
    def name(self) -> str:
        """Which dataset it holds: ``imagenet``, ``caltech101``, ``flowers102`` or ``voc2007``."""
        return self.manifest.get("dataset", "imagenet")

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def shard_uris(self, split: str) -> list[str]:
        return shard_uris(self.uri, self.manifest, split)

    def mean_image(self) -> Any:
        """``mean_image.npy`` (float32, 3x256x256), read now (it is not kept in the object)."""
        if self.stats is None:
            load_stats_json(self.uri)  # the clear error when `alexnet stats` has not run
        return storage.read_numpy(storage.join(self.uri, MEAN_IMAGE))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields, for a Ray job's or worker's arguments; ``from_dict`` reverses it."""
        return {"uri": self.uri, "manifest": self.manifest, "manifest_sha256": self.manifest_sha256,
                "stats": self.stats}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> PreparedDataset:
        return cls(fields["uri"], fields["manifest"], fields["manifest_sha256"], fields.get("stats"))
