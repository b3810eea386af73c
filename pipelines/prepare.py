"""Offline dataset writing: source images -> Ray Data -> resized 256x256 Parquet shards + ``manifest.json``.

Output contract (``conventions.md``)::

    <out>/train/part-00000-of-00417.parquet ...   columns: key, label, wnid, image, source_width, source_height
    <out>/val/part-00000-of-00017.parquet ...
    <out>/manifest.json                            written last: a dataset without it is incomplete
    <out>/_state/                                  the plan and one record per finished shard (for resuming)
    <out>/_cache/                                  decompressed copies of .tar.gz/.tgz sources (transfer datasets)

The same code prepares ImageNet and the transfer datasets (:data:`DATASETS`); only the index of the source
differs (``pipelines.ingest`` for ImageNet, ``pipelines.transfer_data`` for the others), and with it the split
names (Caltech-101: ``all``; Flowers-102 and VOC 2007: ``train``, ``val``, ``test``) and, for VOC, two more
columns (``labels``, ``difficult``).

How it stays correct when interrupted: the split is cut into shards *before* any work, deterministically (train
rows are shuffled with a fixed seed so every shard mixes all classes; other splits are sorted by key). Each shard is
one Ray Data task that decodes, resizes and encodes its images, writes the Parquet file under a temporary name,
moves it into place (synced to disk), and only then records ``_state/<split>-<shard>.json`` with its row count,
checksum and rejected inputs. A rerun checks the recorded shards (size and sha256) and does the shards without a
good record, so it never duplicates or loses rows, and its output is byte-identical to an uninterrupted run. The
manifest is assembled from the records at the end. One run at a time writes an output (``pipelines.outdir``).

Memory is bounded by the shards in flight (two per CPU, :data:`TASKS_PER_CPU`), not by the dataset size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import imaging, ingest, outdir, ranges, storage
from pipelines.dataset import (  # noqa: F401 - re-exported: the dataset's files are read by pipelines.dataset
    MANIFEST, PrepareError, load_manifest, manifest_hash, shard_uris)
from pipelines.imaging import DecodeError, ImageRecipe

log = logging.getLogger(__name__)

STATE_DIR = "_state"
CACHE_DIR = "_cache"
FORMAT_VERSION = "alexnet-prepared/1"
DATASETS = ("imagenet", "caltech101", "flowers102", "voc2007")

#: Schema of every shard.
SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int32()),
        ("wnid", pa.string()),
        ("image", pa.binary()),
        ("source_width", pa.int32()),
        ("source_height", pa.int32()),
    ]
)

#: Typical stored bytes per image, used to size shards and row groups.
_EST_BYTES = {"jpeg": 32 << 10, "raw": 256 * 256 * 3}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How rows are cut into files."""

    shard_rows: int  #: images per Parquet file (sized to tens-to-hundreds of MB)
    row_group_rows: int  #: images per row group (a few MB: the unit of streaming and shuffling)

    @classmethod
    def default(cls, image_format: str, *, shard_rows: int | None = None) -> "Layout":
        per_row = _EST_BYTES[image_format]
        rows = shard_rows or max(1, (96 << 20) // per_row)
        return cls(rows, max(1, min(rows, (8 << 20) // per_row)))


def _shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}/part-{shard:05d}-of-{num_shards:05d}.parquet"


def _state_name(split: str, shard: int) -> str:
    return f"{STATE_DIR}/{split}-{shard:05d}.json"


def shard_schema(extra_fields: tuple[pa.Field, ...] = ()) -> pa.Schema:
    """The schema of a dataset's shards: :data:`SHARD_SCHEMA` and the index's extra columns (VOC's labels)."""
    return pa.schema([*SHARD_SCHEMA, *extra_fields])


#: Index columns a shard task needs; the index's extra columns travel with them.
_TASK_COLUMNS = ("key", "label", "wnid", "uri", "offset", "size")


def _fingerprint(index: ingest.SourceIndex) -> str:
    """Hash of what the index points at, so a resumed run can tell it is continuing the same work."""
    h = hashlib.sha256()
    for name in ("split", "key", "label", "uri", "offset", "size", *(f.name for f in index.extra_fields)):
        h.update(name.encode())
        for chunk in index.table[name].chunks:
            h.update(json.dumps(chunk.to_pylist()).encode())
    return h.hexdigest()


def plan_shards(index: ingest.SourceIndex, layout: Layout, *, seed: int = 0) -> dict[str, pa.Table]:
    """The rows of each split in the order they are written: train shuffled with ``seed``, others by key."""
    plan = {}
    for split in index.splits:
        table = index.split(split)
        if split == "train" and table.num_rows:
            order = np.random.default_rng(seed).permutation(table.num_rows)
            table = table.take(pa.array(order))
        plan[split] = table
    return plan


# --- the work of one shard (runs in a Ray Data task) -------------------------------------------------------------


def process_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Read, preprocess and write one shard; returns (and persists) its record."""
    recipe = ImageRecipe(**json.loads(task["recipe"]))
    out, name = task["out"], task["name"]
    schema = pa.ipc.read_schema(pa.py_buffer(task["schema"]))
    extra = schema.names[len(SHARD_SCHEMA):]
    rows: dict[str, list] = {f.name: [] for f in schema}
    rejects = []
    files: dict[str, Any] = {}
    try:
        for i, (key, label, wnid, uri, offset, size) in enumerate(zip(*(task[c] for c in _TASK_COLUMNS))):
            # inside an archive, name the byte range too, so a reject can be found with `dd`; rows read from a
            # decompressed copy (Caltech, Flowers) name the archive the user gave and the member instead
            if "origin" in task:
                source = task["origin"][i]
            else:
                source = f"{uri} [bytes {offset}..{offset + size})" if uri.endswith(".tar") else uri
            try:
                data = ingest.read_range(uri, offset, size, files) if size else b""
                image, (width, height) = imaging.preprocess(data, recipe)
            except DecodeError as e:
                rejects.append({"split": task["split"], "key": key, "wnid": wnid, "source": source, "reason": str(e)})
                continue
            for col, value in zip(rows, (key, label, wnid, image, width, height, *(task[c][i] for c in extra))):
                rows[col].append(value)
    finally:
        for f in files.values():
            f.close()

    table = pa.Table.from_pydict(rows, schema=schema).replace_schema_metadata(
        {"alexnet.image_format": recipe.image_format, "alexnet.image_size": str(recipe.size)}
    )
    target = storage.join(out, name)
    if storage.is_s3(out):
        tmp_dir = tempfile.mkdtemp(prefix="alexnet-shard-")
    else:
        tmp_dir = os.path.join(storage.filesystem(target)[1].rsplit(os.sep, 1)[0], ".tmp")
        os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, f"{os.path.basename(name)}.{uuid.uuid4().hex}.tmp")
    pq.write_table(
        table,
        tmp,
        row_group_size=task["row_group_rows"],
        compression={c: "none" if c == "image" else "zstd" for c in schema.names},
        write_statistics=["label"],
    )
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
        os.fsync(f.fileno())  # on disk before its record says it is there (a crash must not leave a hole)
    nbytes = os.path.getsize(tmp)
    storage.upload_file(tmp, target)
    if storage.is_s3(out):
        os.rmdir(tmp_dir)  # the local staging folder of an S3 upload (the file itself was moved)
    else:
        _fsync_dir(os.path.dirname(storage.local_path(target)))  # the rename, too
    record = {
        "split": task["split"],
        "shard": task["shard"],
        "path": name,
        "rows": table.num_rows,
        "inputs": len(task["key"]),
        "bytes": nbytes,
        "sha256": digest.hexdigest(),
        "rejects": rejects,
    }
    # The record is the shard's commit point: without it a rerun redoes the shard.
    storage.write_json(storage.join(out, _state_name(task["split"], task["shard"])), record)
    return {"record": json.dumps(record)}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the driver -----------------------------------------------------------------------------------------------


def _records(out: str, splits: tuple[str, ...]) -> dict[tuple[str, int], dict]:
    found = {}
    for rel, _ in storage.list_files(storage.join(out, STATE_DIR), recursive=False):
        base = os.path.basename(rel)
        if base.endswith(".json") and base.count("-") == 1 and base.split("-")[0] in splits:
            rec = storage.read_json(storage.join(out, STATE_DIR, base))
            found[(rec["split"], rec["shard"])] = rec
    return found


def index_dataset(dataset: str, source: str, *, layout: str | None = None, cache: str | None = None
                  ) -> ingest.SourceIndex:
    """The index of ``source`` holding ``dataset`` (one of :data:`DATASETS`).

    ``layout`` selects an ImageNet layout (auto-detected by default); ``cache`` is where the transfer datasets'
    gzip'd tars are decompressed (see ``pipelines.transfer_data``).
    """
    if dataset == "imagenet":
        return ingest.index_imagenet(source, layout=layout)
    if layout is not None:
        raise ValueError(f"layout applies to imagenet only, not to {dataset}")
    from pipelines import transfer_data

    if dataset not in transfer_data.INDEXERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    return transfer_data.INDEXERS[dataset](source, cache=cache)


def prepare_imagenet(source: str, out: str, *, layout: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`prepare_dataset` for ImageNet (``layout``: official, kaggle or imagefolder; auto-detected)."""
    return prepare_dataset("imagenet", source, out, layout=layout, **kwargs)


def prepare_dataset(
    dataset: str,
    source: str,
    out: str,
    *,
    recipe: ImageRecipe = ImageRecipe(),
    layout: str | None = None,
    shard_rows: int | None = None,
    max_bad_fraction: float = 0.01,
    overwrite: bool = False,
    seed: int = 0,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Preprocess ``dataset`` (one of :data:`DATASETS`) from ``source`` (local or S3) into Parquet shards at ``out``.

    Returns the manifest. An existing complete output made with the same inputs and parameters is returned as is
    (``overwrite=True`` rebuilds it); an interrupted one is resumed. ``layout`` applies to ImageNet only.
    """
    if shard_rows is not None:
        ranges.check("shard_rows", shard_rows, "[1, inf)")
    ranges.check("max_bad_fraction", max_bad_fraction, "[0, 1]")
    if overwrite:  # before anything is written: OUT must be empty or the pipeline's own
        outdir.check_ours(out, format_version=FORMAT_VERSION)
    with outdir.lock(out) as lease:
        manifest = _prepare_locked(dataset, source, out, recipe=recipe, layout=layout, shard_rows=shard_rows,
                                   max_bad_fraction=max_bad_fraction, overwrite=overwrite, seed=seed,
                                   ray_address=ray_address, lease=lease)
    return manifest


def _prepare_locked(dataset: str, source: str, out: str, *, recipe: ImageRecipe, layout: str | None,
                    shard_rows: int | None, max_bad_fraction: float, overwrite: bool, seed: int,
                    ray_address: str | None, lease: Any) -> dict[str, Any]:
    from pipelines.rayutil import ensure_ray

    started = time.time()
    manifest_uri = storage.join(out, MANIFEST)
    ensure_ray(ray_address)
    # the source is indexed (and so checked) before --overwrite deletes anything
    index = index_dataset(dataset, source, layout=layout, cache=storage.join(out, CACHE_DIR))
    if overwrite:
        log.info("--overwrite: deleted %d files of the previous output in %s", outdir.delete_own_files(out), out)
    shape = Layout.default(recipe.image_format, shard_rows=shard_rows)
    plan = plan_shards(index, shape, seed=seed)
    # max_bad_fraction is not part of the plan: it gates the manifest, not the shards, so a rerun with a raised
    # threshold reuses every shard
    params = {
        "recipe": dataclasses.asdict(recipe),
        "shard_rows": shape.shard_rows,
        "row_group_rows": shape.row_group_rows,
        "seed": seed,
    }
    plan_hash = hashlib.sha256(
        json.dumps({"params": params, "index": _fingerprint(index)}, sort_keys=True).encode()
    ).hexdigest()

    if storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
        if manifest.get("plan_hash") == plan_hash:
            log.info("%s is complete (same inputs and parameters): nothing to do; pass --overwrite to rebuild", out)
            return manifest
        raise PrepareError(
            f"{out} already holds a complete dataset made from other inputs or parameters. "
            "Pass --overwrite to replace it, or choose another --out."
        )
    plan_uri = storage.join(out, STATE_DIR, "plan.json")
    if storage.exists(plan_uri):
        previous = storage.read_json(plan_uri)
        if previous.get("plan_hash") != plan_hash:
            raise PrepareError(
                f"{out} holds a partial dataset from other inputs or parameters ({plan_uri}). "
                "Pass --overwrite to start again, or choose another --out."
            )
    else:
        storage.write_json(plan_uri, {"plan_hash": plan_hash, "source": source, "params": params})

    tasks = []
    done = outdir.verified(out, _records(out, index.splits))
    num_shards = {s: math.ceil(t.num_rows / shape.shard_rows) for s, t in plan.items()}
    recipe_json = json.dumps(dataclasses.asdict(recipe))
    schema = shard_schema(index.extra_fields)
    columns = (*_TASK_COLUMNS, *(f.name for f in index.extra_fields),
               *(("origin",) if "origin" in index.table.column_names else ()))
    for split, table in plan.items():
        for shard in range(num_shards[split]):
            if (split, shard) in done:
                continue
            part = table.slice(shard * shape.shard_rows, shape.shard_rows)
            tasks.append(
                {
                    "split": split,
                    "shard": shard,
                    "name": _shard_name(split, shard, num_shards[split]),
                    "out": out,
                    "recipe": recipe_json,
                    "row_group_rows": shape.row_group_rows,
                    "schema": schema.serialize().to_pybytes(),
                    **{c: part[c].to_pylist() for c in columns},
                }
            )
    total_shards = sum(num_shards.values())
    log.info("%d of %d shards to write (%d already done)", len(tasks), total_shards, total_shards - len(tasks))
    if tasks:
        if not storage.is_s3(out):  # temporaries of an interrupted run
            for split in plan:
                storage.delete_tree(storage.join(out, split, ".tmp"))
        _run_tasks(tasks)

    records = _records(out, index.splits)
    missing = [(s, i) for s in plan for i in range(num_shards[s]) if (s, i) not in records]
    if missing:  # pragma: no cover - a task failure raises above
        raise PrepareError(f"{len(missing)} shards did not finish (first: {missing[0]}); rerun to resume")
    if not storage.is_s3(out):  # every shard is in place: the temporaries' folders go too
        for split in plan:
            with contextlib.suppress(OSError):  # absent, or not empty (another writer's file)
                os.rmdir(storage.filesystem(storage.join(out, split, ".tmp"))[1])
    manifest = _manifest(index, plan, records, num_shards, {**params, "max_bad_fraction": max_bad_fraction}, plan_hash,
                         recipe, schema)
    rejects = manifest["rejects"]
    inputs = sum(len(t) for t in plan.values())
    if inputs and len(rejects) / inputs > max_bad_fraction:
        rejects_uri = storage.join(out, STATE_DIR, "rejects.json")
        storage.write_json(rejects_uri, rejects)
        first = "; ".join(f"{r['key']} ({r['reason']})" for r in rejects[:5])
        raise PrepareError(
            f"{len(rejects)} of {inputs} input images ({len(rejects) / inputs:.2%}) could not be decoded, more than "
            f"--max-bad-fraction {max_bad_fraction:g}. First: {first}. Full list: {rejects_uri}. "
            "Check the source archives (re-download, verify MD5s) or raise --max-bad-fraction."
        )
    manifest["elapsed_s"] = round(time.time() - started, 3)
    if lease is not None:
        lease.check()
    storage.write_json(manifest_uri, manifest)
    log.info(
        "wrote %s: %s rows, %d rejected",
        manifest_uri,
        {s: v["rows"] for s, v in manifest["splits"].items()},
        len(rejects),
    )
    return manifest


#: Shard tasks in flight per CPU. A shard task is CPU-bound, but with one per CPU the CPUs still idle: Ray Data
#: hands a freed slot its next shard after a scheduling round, and the last shards of a run finish one after
#: another while the other CPUs wait (a shard's time varies by tens of percent on a shared VM). Two per CPU keep
#: every CPU busy until the last shards (docs/benchmarks.md); memory stays bounded by the shards in flight.
TASKS_PER_CPU = 2


def _run_tasks(tasks: list[dict[str, Any]]) -> None:
    import ray.data

    from pipelines.rayutil import cpu_concurrency

    ctx = ray.data.DataContext.get_current()
    # Ray Data reserves a share of the CPUs for each operator and grows the task pool from one task (on 2 CPUs the
    # second shard task started 1-2.5 s after the first, docs/benchmarks.md); these tasks' outputs are tiny records,
    # so the pool starts in full. A dataset keeps the context it was created with: restored right after.
    reservation = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    finally:
        ctx.op_resource_reservation_enabled = reservation
    cpus_per_task = 1 / TASKS_PER_CPU
    pool = ray.data.TaskPoolStrategy(size=cpu_concurrency(len(tasks), cpus_per_task=cpus_per_task))
    results = ds.map(process_shard, num_cpus=cpus_per_task, compute=pool, runtime_env=storage.worker_env()).take_all()
    log.info("wrote %d shards", len(results))


def _manifest(index, plan, records, num_shards, params, plan_hash, recipe: ImageRecipe, schema: pa.Schema
              ) -> dict[str, Any]:
    splits, rejects = {}, []
    for split in plan:
        recs = [records[(split, i)] for i in range(num_shards[split])]
        splits[split] = {
            "rows": sum(r["rows"] for r in recs),
            "inputs": sum(r["inputs"] for r in recs),
            "rejected": sum(len(r["rejects"]) for r in recs),
            "shards": [{k: r[k] for k in ("path", "rows", "bytes", "sha256")} for r in recs],
        }
        rejects += [rej for r in recs for rej in r["rejects"]]
    return {
        "format": FORMAT_VERSION,
        "dataset": index.dataset,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"uri": index.source, "layout": index.layout},
        "label_convention": index.label_convention,
        "multi_label": index.multi_label,
        "num_classes": len(index.wnids),
        "classes": [{"label": i, "wnid": w, "words": index.words.get(w, "")} for i, w in enumerate(index.wnids)],
        "image": {
            "format": recipe.image_format,
            "size": [recipe.size, recipe.size],
            "channels": "RGB",
            "raw_layout": "HWC uint8" if recipe.image_format == "raw" else None,
        },
        "preprocessing": {**params, "pillow": imaging.pillow_info()},
        "schema": [f"{f.name}: {f.type}" for f in schema],
        "splits": splits,
        "rejects": rejects,
        "plan_hash": plan_hash,
    } | ({"empty_classes": list(index.empty_classes)} if index.empty_classes else {})
