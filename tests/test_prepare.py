"""Ray Data preprocessing into Parquet shards: contents, quirks, rejects, layouts, resume, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import imaging, prepare, storage
from pipelines.synth import SynthInfo
from tests.conftest import ROOT, SYNTH_BAD_FRACTION, upload_tree

pytestmark = pytest.mark.slow


def _info(synth_root: Path) -> SynthInfo:
    return SynthInfo.from_json((synth_root / "official" / "synth_info.json").read_text())


def _read_split(out: Path | str, split: str):
    manifest = prepare.load_manifest(str(out))
    return pq.ParquetDataset(prepare.shard_uris(str(out), manifest, split)).read() if not str(out).startswith("s3://") else None


def test_shards_follow_the_data_contract(prepared, synth_root):
    info = _info(synth_root)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["complete"] and manifest["format"] == prepare.FORMAT_VERSION
    assert [c["wnid"] for c in manifest["classes"]] == sorted(info.wnids)
    assert manifest["image"] == {"format": "jpeg", "size": [256, 256], "channels": "RGB", "raw_layout": None}
    bad = set(info.bad)
    for split, expected in (("train", info.train), ("val", info.val)):
        table = _read_split(prepared, split)
        assert table.schema.names[:4] == ["key", "label", "wnid", "image"]
        good = {k: w for k, w in expected if k not in bad}
        assert sorted(table["key"].to_pylist()) == sorted(good)  # every decodable image exactly once
        assert manifest["splits"][split]["rows"] == len(good)
        assert manifest["splits"][split]["inputs"] == len(expected)
        for key, wnid, label in zip(*(table[c].to_pylist() for c in ("key", "wnid", "label"))):
            assert wnid == good[key] and label == sorted(info.wnids).index(wnid)
        for blob in table["image"].to_pylist()[:20]:
            assert imaging.decode_stored(blob).shape == (256, 256, 3)
        for shard in manifest["splits"][split]["shards"]:
            meta = pq.ParquetFile(prepared / shard["path"]).metadata
            assert meta.num_rows == shard["rows"] and (prepared / shard["path"]).stat().st_size == shard["bytes"]
            assert all(meta.row_group(i).num_rows <= manifest["preprocessing"]["row_group_rows"] for i in range(meta.num_row_groups))
    assert len(manifest["splits"]["train"]["shards"]) >= 2


def test_train_shards_mix_classes(prepared):
    manifest = prepare.load_manifest(str(prepared))
    for shard in manifest["splits"]["train"]["shards"]:
        labels = pq.read_table(prepared / shard["path"], columns=["label"])["label"].to_pylist()
        if len(labels) >= 8:
            assert len(set(labels)) > 1


def test_quirks_are_decoded_and_bad_files_listed(prepared, synth_root):
    info = _info(synth_root)
    manifest = prepare.load_manifest(str(prepared))
    table = _read_split(prepared, "train")
    keys = table["key"].to_pylist()
    for kind in ("png", "cmyk", "grayscale", "large", "tiny"):
        for key in info.quirks[kind]:
            if key.startswith("ILSVRC2012_val"):
                continue
            row = keys.index(key)
            pixels = imaging.decode_stored(table["image"][row].as_py())
            assert pixels.shape == (256, 256, 3), (kind, key)
    rejected = {r["key"]: r for r in manifest["rejects"]}
    assert set(rejected) == set(info.bad)
    for key, kind in info.bad.items():
        assert kind.split()[0] in rejected[key]["reason"], rejected[key]
        assert rejected[key]["source"].startswith(str(synth_root / "official"))
    assert sum(v["rejected"] for v in manifest["splits"].values()) == len(info.bad)


def test_too_many_rejects_fail_clearly_and_leave_no_manifest(synth_root, tmp_path, ray_local):
    out = tmp_path / "out"
    with pytest.raises(prepare.PrepareError, match=r"could not be decoded, more than --max-bad-fraction 0.01.*rejects.json"):
        prepare.prepare_imagenet(str(synth_root / "official"), str(out), shard_rows=32)
    assert not (out / "manifest.json").exists()
    assert {r["key"] for r in json.loads((out / "_state" / "rejects.json").read_text())} == set(_info(synth_root).bad)
    # raising the threshold, as the message says, completes the same output: the threshold is not in the plan
    shards = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    manifest = prepare.prepare_imagenet(str(synth_root / "official"), str(out), shard_rows=32,
                                        max_bad_fraction=SYNTH_BAD_FRACTION)
    assert manifest["preprocessing"]["max_bad_fraction"] == SYNTH_BAD_FRACTION and (out / "manifest.json").exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == shards  # reused, not rewritten


def test_every_layout_gives_identical_shards(prepared, synth_root, tmp_path, ray_local):
    reference = prepare.load_manifest(str(prepared))
    for layout in ("kaggle", "imagefolder"):
        manifest = prepare.prepare_imagenet(
            str(synth_root / layout), str(tmp_path / layout), shard_rows=16, max_bad_fraction=SYNTH_BAD_FRACTION
        )
        assert manifest["source"]["layout"] == layout
        assert manifest["splits"] == reference["splits"]  # same files, byte for byte (sha256)
        assert manifest["classes"][0]["wnid"] == reference["classes"][0]["wnid"]


def test_complete_output_is_skipped_and_other_inputs_refused(prepared, synth_root, ray_local):
    manifest_path = prepared / "manifest.json"
    before = manifest_path.stat().st_mtime_ns
    again = prepare.prepare_imagenet(
        str(synth_root / "official"), str(prepared), shard_rows=16, max_bad_fraction=SYNTH_BAD_FRACTION
    )
    assert manifest_path.stat().st_mtime_ns == before
    assert again == json.loads(manifest_path.read_text())
    with pytest.raises(prepare.PrepareError, match="--overwrite"):
        prepare.prepare_imagenet(str(synth_root / "official"), str(prepared), shard_rows=8, max_bad_fraction=SYNTH_BAD_FRACTION)


def test_resume_redoes_damaged_shards_and_overwrite_checks_the_source_first(prepared, synth_root, tmp_path, ray_local):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    (out / "manifest.json").unlink()  # an interrupted run: shards and their records, no manifest
    reference = prepare.load_manifest(str(prepared))
    shards = [s["path"] for v in reference["splits"].values() for s in v["shards"]]
    (out / shards[0]).unlink()
    with open(out / shards[-1], "r+b") as f:
        f.truncate(100)
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a wrong --source with --overwrite: the error comes before anything is deleted
    with pytest.raises(ValueError, match="does not exist"):
        prepare.prepare_imagenet(str(tmp_path / "wrong"), str(out), shard_rows=16, overwrite=True,
                                 max_bad_fraction=SYNTH_BAD_FRACTION)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    resumed = prepare.prepare_imagenet(str(synth_root / "official"), str(out), shard_rows=16,
                                       max_bad_fraction=SYNTH_BAD_FRACTION)
    assert resumed["splits"] == reference["splits"]  # the two damaged shards were written again, byte for byte
    assert (out / shards[-1]).read_bytes() == (prepared / shards[-1]).read_bytes()


def test_killed_and_rerun_gives_the_same_dataset(synth_root, tmp_path, ray_local):
    src = str(synth_root / "official")
    args = dict(shard_rows=1, max_bad_fraction=SYNTH_BAD_FRACTION)
    reference = prepare.prepare_imagenet(src, str(tmp_path / "reference"), **args)
    total = sum(len(s["shards"]) for s in reference["splits"].values())

    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "alexnet.cli", "prepare", "imagenet", "--source", src, "--out", str(out),
           "--shard-rows", "1", "--max-bad-fraction", str(SYNTH_BAD_FRACTION)]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "_state"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.is_dir() and len(list(state.glob("*-*.json"))) >= 3:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and every worker: no chance to clean up
    proc.wait()
    done = len(list(state.glob("*-*.json")))
    assert 0 < done < total, f"the run was not interrupted mid-way ({done} of {total} shards done)"
    assert not (out / "manifest.json").exists()  # a partial output never looks complete

    resumed = prepare.prepare_imagenet(src, str(out), **args)
    assert resumed["splits"] == reference["splits"]
    assert resumed["rejects"] == reference["rejects"]
    shards = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert shards == sorted(s["path"] for v in reference["splits"].values() for s in v["shards"])


def test_s3_to_s3_matches_local(prepared, synth_root, s3_endpoint, ray_local):
    src = upload_tree(synth_root / "official", "prepare-src", "imagenet")
    out = "s3://prepare-out/imagenet/prepared"
    import boto3

    boto3.client("s3").create_bucket(Bucket="prepare-out")
    manifest = prepare.prepare_imagenet(src, out, shard_rows=16, max_bad_fraction=SYNTH_BAD_FRACTION)
    assert manifest["splits"] == prepare.load_manifest(str(prepared))["splits"]
    assert storage.exists(storage.join(out, "manifest.json"))
    files = {p for p, _ in storage.list_files(out)}
    assert {s["path"] for v in manifest["splits"].values() for s in v["shards"]} <= files
    assert not any(".tmp" in p for p in files)
