"""The output of ``prepare``: --overwrite deletes only its own files, resume checks its shards, one run at a time."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import outdir, prepare, storage
from tests.conftest import ROOT

#: A previous output of the pipeline, relative paths -> bytes
_OURS = {
    "manifest.json": json.dumps({"format": prepare.FORMAT_VERSION, "plan_hash": "x"}).encode(),
    "_state/plan.json": b'{"plan_hash": "x"}',
    "_state/train-00000.json": b"{}",
    "train/part-00000-of-00001.parquet": b"PAR1 shard",
    "val/part-00000-of-00001.parquet": b"PAR1 shard",
    "train/.tmp/part-00000-of-00001.parquet.0123.tmp": b"partial",
    "stats.json": b"{}",
    "mean_image.npy": b"npy",
    "_cache/102flowers.tar": b"tar",
}
#: A user's files that happen to be there too
_THEIRS = {"notes.txt": b"mine", "photos/holiday.jpg": b"\xff\xd8\xff photo", "train/my_photo.jpg": b"photo"}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_overwrite_refuses_an_out_of_unrelated_files_and_deletes_nothing(tmp_path):
    out = tmp_path / "photos"
    _write(out, _THEIRS)
    with pytest.raises(outdir.OutputError, match=r"refusing to overwrite .*notes.txt"):
        prepare.prepare_dataset("imagenet", str(tmp_path / "wrong-source"), str(out), overwrite=True)
    assert _tree(out) == _THEIRS
    # a manifest.json of some other program does not make the folder ours
    (out / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(outdir.OutputError):
        outdir.check_ours(str(out), format_version=prepare.FORMAT_VERSION)


def test_overwrite_deletes_only_the_pipelines_own_files(tmp_path):
    out = tmp_path / "out"
    _write(out, {**_OURS, **_THEIRS})
    outdir.check_ours(str(out), format_version=prepare.FORMAT_VERSION)  # ours: no error
    assert outdir.delete_own_files(str(out)) == len(_OURS) - 1
    # the user's files stay, and the decompressed archives (checked against their source before any use)
    assert _tree(out) == {**_THEIRS, "_cache/102flowers.tar": b"tar"}
    assert not (out / "_state").exists() and not (out / "val").exists() and not (out / "train" / ".tmp").exists()
    for empty in (tmp_path / "new", tmp_path / "empty"):  # absent or empty: fine
        (tmp_path / "empty").mkdir(exist_ok=True)
        outdir.check_ours(str(empty), format_version=prepare.FORMAT_VERSION)


@pytest.mark.slow
def test_overwrite_on_s3_refuses_foreign_prefixes_and_keeps_other_files(s3_endpoint):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="outdir-test")
    for prefix, files in (("theirs", _THEIRS), ("ours", {**_OURS, **_THEIRS})):
        for rel, data in files.items():
            s3.put_object(Bucket="outdir-test", Key=f"{prefix}/{rel}", Body=data)
    with pytest.raises(outdir.OutputError, match="refusing to overwrite"):
        outdir.check_ours("s3://outdir-test/theirs", format_version=prepare.FORMAT_VERSION)
    outdir.check_ours("s3://outdir-test/ours", format_version=prepare.FORMAT_VERSION)
    outdir.delete_own_files("s3://outdir-test/ours")
    left = {rel for rel, _ in storage.list_files("s3://outdir-test/ours")}
    assert left == {*_THEIRS, "_cache/102flowers.tar"}
    assert {rel for rel, _ in storage.list_files("s3://outdir-test/theirs")} == set(_THEIRS)


# --- resume: recorded shards are checked ---------------------------------------------------------------------


def test_resume_redoes_shards_that_are_missing_truncated_or_changed(tmp_path):
    records = {}
    for i in range(4):
        data = f"shard {i} ".encode() * 100
        rel = f"train/part-{i:05d}-of-00004.parquet"
        _write(tmp_path, {rel: data})
        records[("train", i)] = {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "train/part-00001-of-00004.parquet").unlink()
    with open(tmp_path / "train/part-00002-of-00004.parquet", "r+b") as f:
        f.truncate(10)
    with open(tmp_path / "train/part-00003-of-00004.parquet", "r+b") as f:
        f.write(b"X")  # same size, other bytes
    assert list(outdir.verified(str(tmp_path), records)) == [("train", 0)]


def test_a_shard_is_on_disk_before_its_record(tmp_path, monkeypatch):
    from PIL import Image
    import io
    import pyarrow as pa

    buf = io.BytesIO()
    Image.new("RGB", (300, 260), (200, 30, 30)).save(buf, "JPEG")
    src = tmp_path / "a.JPEG"
    src.write_bytes(buf.getvalue())
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    task = {"split": "train", "shard": 0, "name": "train/part-00000-of-00001.parquet", "out": str(tmp_path / "out"),
            "recipe": json.dumps({}), "row_group_rows": 8, "schema": prepare.SHARD_SCHEMA.serialize().to_pybytes(),
            "key": ["a"], "label": [0], "wnid": ["n0"], "uri": [str(src)], "offset": [0], "size": [src.stat().st_size]}
    assert pa.ipc.read_schema(pa.py_buffer(task["schema"])) == prepare.SHARD_SCHEMA
    record = json.loads(prepare.process_shard(task)["record"])
    assert record["rows"] == 1
    shard = next(i for i, p in enumerate(synced) if ".tmp/part-00000-of-00001.parquet" in p)
    folder = synced.index(str(tmp_path / "out" / "train"))
    state = next(i for i, p in enumerate(synced) if "_state/train-00000.json" in p)
    assert shard < folder < state


# --- one run at a time ---------------------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_first_and_deletes_nothing(tmp_path):
    out = tmp_path / "out"
    _write(out, {"train/.tmp/part-00000-of-00002.parquet.abc.tmp": b"the first run's temporary"})
    with outdir.lock(str(out)):
        for overwrite in (False, True):
            with pytest.raises(outdir.OutputLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
                prepare.prepare_dataset("imagenet", str(tmp_path / "src"), str(out), overwrite=overwrite)
        assert (out / "train/.tmp/part-00000-of-00002.parquet.abc.tmp").exists()
    assert not (out / outdir.LOCK_NAME).exists()
    with outdir.lock(str(out)):  # released: free again
        pass


def test_the_lock_of_a_run_that_died_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a run killed with -9 leaves its lock file; the kernel dropped its flock with the process
    code = (f"from pipelines import outdir; import os; cm = outdir.lock({str(out)!r}); cm.__enter__(); "
            f"print(open(os.path.join({str(out)!r}, outdir.LOCK_NAME)).read(), flush=True); os._exit(9)")
    dead = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    holder = json.loads(dead.stdout)
    assert holder["host"] == socket.gethostname() and (out / outdir.LOCK_NAME).exists()
    with outdir.lock(str(out)):
        assert json.loads((out / outdir.LOCK_NAME).read_text())["pid"] == os.getpid()
    # a lock recorded by another host is not ours to judge: refused, saying how to clear it
    (out / outdir.LOCK_NAME).write_text(json.dumps({**holder, "host": "elsewhere"}))
    with pytest.raises(outdir.OutputLocked, match="host elsewhere.*delete the lock file"):
        with outdir.lock(str(out)):
            pass


@pytest.mark.slow
def test_s3_lease_is_exclusive_and_an_expired_one_is_taken_over(s3_endpoint):
    import boto3

    boto3.client("s3").create_bucket(Bucket="lease-test")
    out = "s3://lease-test/prepared"
    with outdir.lock(out):
        with pytest.raises(outdir.OutputLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}.*lease"):
            with outdir.lock(out):
                pass
    assert not storage.exists(storage.join(out, outdir.LOCK_NAME))
    # a holder that stopped renewing (crashed) a while ago
    stale = {"host": "gone", "pid": 1, "started": "2020-01-01T00:00:00Z", "token": "t", "ttl_s": 0.5}
    storage.write_json(storage.join(out, outdir.LOCK_NAME), stale)
    time.sleep(1.0)
    with outdir.lock(out) as lease:
        assert storage.read_json(storage.join(out, outdir.LOCK_NAME))["token"] == lease.holder["token"]
        lease.check()
