"""Transfer datasets (Caltech-101, Flowers-102, VOC 2007): synthetic archives, indexes, prepare, download, CLI."""

from __future__ import annotations

import io
import json
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image

from pipelines import formats, imaging, ingest, prepare, storage, transfer_data
from pipelines.download import ChecksumError, download_dataset
from pipelines.synth import write_synthetic
from pipelines.synth_transfer import TransferSynthInfo
from tests.conftest import ROOT, upload_tree
from tests.test_download import http_server  # noqa: F401 - the loopback HTTP server fixture
from tests.test_synth import hue_histogram

pytestmark = pytest.mark.slow

#: Small sets, one truncated JPEG each (so max_bad_fraction must allow about 1 in 20).
SIZES = {
    "caltech101": dict(classes=3, min_per_class=4, max_per_class=8, background=3, size=96, corrupt=1, archive="both"),
    "flowers102": dict(classes=3, train_per_class=2, val_per_class=2, test_per_class=3, size=96, corrupt=1),
    "voc2007": dict(train=6, val=6, test=8, size=96, corrupt=1),
}
BAD_FRACTION = 0.1


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Each synthetic dataset in its own folder; ``caltech101-zip`` holds only the zip of the same Caltech."""
    root = tmp_path_factory.mktemp("transfer-src")
    out = {}
    for dataset, sizes in SIZES.items():
        write_synthetic(dataset, root / dataset, **sizes)
        out[dataset] = root / dataset
    out["caltech101-zip"] = root / "caltech101-zip"
    out["caltech101-zip"].mkdir()
    shutil.copy(root / "caltech101" / formats.CALTECH101_ZIP, out["caltech101-zip"])
    return out


def _info(path: Path) -> TransferSynthInfo:
    return TransferSynthInfo.from_json((path / "synth_info.json").read_text())


def _rows(index: ingest.SourceIndex, *columns: str) -> list[tuple]:
    return list(zip(*(index.table[c].to_pylist() for c in columns)))


def _bytes(index: ingest.SourceIndex) -> dict[str, bytes]:
    return {k: ingest.read_range(u, o, s) for k, u, o, s in _rows(index, "key", "uri", "offset", "size")}


# --- synthetic archives ------------------------------------------------------------------------------------------


def test_synthetic_archives_have_the_official_structure(sources):
    with tarfile.open(sources["caltech101"] / formats.CALTECH101_TGZ) as tar:
        folders = {n.split("/")[1] for n in tar.getnames() if n.count("/") == 2}
    assert formats.CALTECH101_BACKGROUND in folders and {"Faces_easy", "accordion", "airplanes"} <= folders
    with zipfile.ZipFile(sources["caltech101"] / formats.CALTECH101_ZIP) as zf:
        assert {formats.CALTECH101_ZIP_TGZ, formats.CALTECH101_ZIP_ANNOTATIONS} <= set(zf.namelist())

    labels = scipy.io.loadmat(sources["flowers102"] / formats.FLOWERS102_LABELS)["labels"]
    setid = scipy.io.loadmat(sources["flowers102"] / formats.FLOWERS102_SETID)
    assert labels.shape == (1, 21) and labels.dtype == np.uint8 and labels.min() == 1
    assert all(setid[k].shape[0] == 1 and setid[k].dtype == np.uint16 for k in ("trnid", "valid", "tstid"))
    numbers = np.concatenate([setid[k].ravel() for k in ("trnid", "valid", "tstid")])
    assert sorted(numbers) == list(range(1, 22))

    root = formats.VOC2007_ROOT
    with tarfile.open(sources["voc2007"] / formats.VOC2007_TRAINVAL_TAR) as tar:
        names = set(tar.getnames())
        flags = tar.extractfile(f"{root}/ImageSets/Main/cat_trainval.txt").read().decode().split("\n")[0]
        xml = tar.extractfile(sorted(n for n in names if n.endswith(".xml"))[0]).read().decode()
    assert {f"{root}/ImageSets/Main/{s}.txt" for s in ("train", "val", "trainval")} <= names
    assert all(f"{root}/ImageSets/Main/{c}_{s}.txt" in names for c in formats.VOC_CLASSES for s in ("train", "val"))
    assert len(flags.split()) == 2 and "<difficult>" in xml and "<bndbox>" in xml
    with tarfile.open(sources["voc2007"] / formats.VOC2007_TEST_TAR) as tar:
        assert f"{root}/ImageSets/Main/tvmonitor_test.txt" in tar.getnames()


def test_synthetic_voc_has_difficult_only_and_multi_label_images(sources):
    info = _info(sources["voc2007"])
    for split, keys in info.splits.items():
        flags = [info.flags[k] for k in keys]
        assert any(0 in f for f in flags), split  # a difficult-only class
        assert any(1 not in f for f in flags), split  # an image without any present class: label -1
    assert any(sum(f == 1 for f in flags) >= 2 for flags in info.flags.values())


def test_synthetic_data_is_deterministic(sources, tmp_path):
    write_synthetic("flowers102", tmp_path, **SIZES["flowers102"])
    for name in (formats.FLOWERS102_TGZ, formats.FLOWERS102_LABELS, formats.FLOWERS102_SETID):
        assert (tmp_path / name).read_bytes() == (sources["flowers102"] / name).read_bytes(), name


def test_synthetic_caltech_is_learnable_by_nearest_class_mean(tmp_path):
    info = write_synthetic("caltech101", tmp_path, classes=5, min_per_class=12, max_per_class=14, background=0,
                           size=64, seed=1)
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / formats.CALTECH101_TGZ) as tar:
        feats = {n.split("/", 1)[1][:-4]: hue_histogram(Image.open(io.BytesIO(tar.extractfile(n).read())), rng)
                 for n in tar.getnames() if n.endswith(".jpg")}
    keys = info.splits["all"]
    train = [k for k in keys if int(k[-4:]) <= 6]
    means = np.stack([np.mean([feats[k] for k in train if info.labels[k] == c], axis=0) for c in range(5)])
    test = [k for k in keys if k not in train]
    correct = [np.abs(means - feats[k]).sum(1).argmin() == info.labels[k] for k in test]
    assert np.mean(correct) >= 0.9  # chance is 1/5


# --- indexes -----------------------------------------------------------------------------------------------------


def test_caltech_classes_are_sorted_folders_without_background(sources, tmp_path):
    info = _info(sources["caltech101"])
    index = transfer_data.index_caltech101(str(sources["caltech101"]), cache=str(tmp_path))
    assert index.layout == formats.CALTECH101_TGZ  # preferred when both packagings are present
    assert index.wnids == sorted(index.wnids) == info.classes and index.wnids[0] == "Faces_easy"
    assert formats.CALTECH101_BACKGROUND not in index.wnids
    assert index.splits == ("all",) and set(index.table["split"].to_pylist()) == {"all"}
    rows = _rows(index, "key", "wnid", "label")
    assert [k for k, _, _ in rows] == info.splits["all"]
    assert all(label == info.labels[k] == index.wnids.index(w) and k.startswith(f"{w}/image_") for k, w, label in rows)
    assert set(index.table["uri"].to_pylist()) == {str(tmp_path / "101_ObjectCategories.tar")}


def test_caltech_zip_wrapper_gives_the_same_images(sources, tmp_path):
    tgz = transfer_data.index_caltech101(str(sources["caltech101"]), cache=str(tmp_path / "a"))
    wrapped = transfer_data.index_caltech101(str(sources["caltech101-zip"]), cache=str(tmp_path / "b"))
    assert wrapped.layout == formats.CALTECH101_ZIP
    assert _rows(wrapped, "split", "key", "wnid", "label") == _rows(tgz, "split", "key", "wnid", "label")
    assert _bytes(wrapped) == _bytes(tgz)


def test_decompressed_copy_is_reused_until_the_archive_changes(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources["flowers102"], src)
    cache = tmp_path / "cache"
    first = transfer_data.decompressed_tar(str(src / formats.FLOWERS102_TGZ), str(cache))
    made = os.stat(first).st_mtime_ns
    assert transfer_data.decompressed_tar(str(src / formats.FLOWERS102_TGZ), str(cache)) == first
    assert os.stat(first).st_mtime_ns == made
    os.utime(src / formats.FLOWERS102_TGZ, ns=(made + 10**9, made + 10**9))
    transfer_data.decompressed_tar(str(src / formats.FLOWERS102_TGZ), str(cache))
    assert os.stat(first).st_mtime_ns != made
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_flowers_labels_are_official_minus_one_and_splits_follow_setid(sources, tmp_path):
    index = transfer_data.index_flowers102(str(sources["flowers102"]), cache=str(tmp_path))
    official = scipy.io.loadmat(sources["flowers102"] / formats.FLOWERS102_LABELS)["labels"].ravel()
    setid = scipy.io.loadmat(sources["flowers102"] / formats.FLOWERS102_SETID)
    assert index.splits == ("train", "val", "test") and index.wnids == ["001", "002", "003"]
    for split, key in formats.FLOWERS102_SPLIT_KEYS.items():
        assert set(index.split(split)["key"].to_pylist()) == {f"image_{n:05d}" for n in setid[key].ravel()}
    for key, wnid, label in _rows(index, "key", "wnid", "label"):
        number = int(key.rsplit("_", 1)[1])
        assert label == official[number - 1] - 1 and wnid == f"{official[number - 1]:03d}"


def test_voc_flags_become_labels_and_difficult(sources):
    info = _info(sources["voc2007"])
    index = transfer_data.index_voc2007(str(sources["voc2007"]))
    assert index.multi_label and index.wnids == list(formats.VOC_CLASSES)
    assert [f.name for f in index.extra_fields] == ["labels", "difficult"]
    for split in formats.VOC2007_SPLITS:
        assert index.split(split)["key"].to_pylist() == info.splits[split]
    for key, wnid, label, labels, difficult in _rows(index, "key", "wnid", "label", "labels", "difficult"):
        flags = info.flags[key]
        assert labels == [int(f == 1) for f in flags] and difficult == [f == 0 for f in flags]
        assert label == (flags.index(1) if 1 in flags else -1)
        assert wnid == ",".join(c for c, f in zip(formats.VOC_CLASSES, flags) if f == 1)


def _gz_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_unsafe_members_are_refused_naming_the_archive(tmp_path):
    evil = _gz_tar({"101_ObjectCategories/ant/image_0001.jpg": b"x", "../../evil.jpg": b"payload"})
    (tmp_path / "tgz").mkdir()
    (tmp_path / "tgz" / formats.CALTECH101_TGZ).write_bytes(evil)
    with pytest.raises(ingest.UnsafeArchiveError, match=formats.CALTECH101_TGZ):
        transfer_data.index_caltech101(str(tmp_path / "tgz"), cache=str(tmp_path / "cache"))
    (tmp_path / "zip").mkdir()
    with zipfile.ZipFile(tmp_path / "zip" / formats.CALTECH101_ZIP, "w") as zf:
        zf.writestr(formats.CALTECH101_ZIP_TGZ, _gz_tar({"101_ObjectCategories/ant/image_0001.jpg": b"x"}))
        zf.writestr("/etc/evil", b"payload")
    with pytest.raises(ingest.UnsafeArchiveError, match=formats.CALTECH101_ZIP):
        transfer_data.index_caltech101(str(tmp_path / "zip"), cache=str(tmp_path / "cache2"))


def test_a_corrupt_zip_is_an_error_naming_it(sources, tmp_path):
    good = (sources["caltech101-zip"] / formats.CALTECH101_ZIP).read_bytes()
    inner = zipfile.ZipFile(sources["caltech101-zip"] / formats.CALTECH101_ZIP).getinfo(formats.CALTECH101_ZIP_TGZ)
    start = inner.header_offset + 30 + len(inner.filename) + len(inner.extra)
    for name, offset in (("data", start + inner.compress_size // 2), ("local header", inner.header_offset)):
        broken = bytearray(good)
        broken[offset : offset + 4] = bytes(b ^ 0xFF for b in broken[offset : offset + 4])
        src = tmp_path / name
        src.mkdir()
        (src / formats.CALTECH101_ZIP).write_bytes(bytes(broken))
        with pytest.raises(ingest.IngestError, match=rf"{formats.CALTECH101_ZIP}.*re-download it"):
            transfer_data.index_caltech101(str(src), cache=str(tmp_path / name / "cache"))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ingest.IngestError, match="caltech-101.zip"):
        transfer_data.index_caltech101(str(tmp_path))
    with pytest.raises(ingest.IngestError, match="imagelabels.mat"):
        transfer_data.index_flowers102(str(tmp_path))
    with pytest.raises(ingest.IngestError, match="VOCtest_06-Nov-2007.tar"):
        transfer_data.index_voc2007(str(tmp_path))


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), seed * 40 % 256, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_an_empty_caltech_category_is_named_in_the_log_the_manifest_and_by_transfer(tmp_path, ray_local, caplog,
                                                                                    capsys):
    from alexnet.cli import main

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("101_ObjectCategories", "101_ObjectCategories/ant", "101_ObjectCategories/ferry"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for i in range(4):
            data = _jpeg(i)
            info = tarfile.TarInfo(f"101_ObjectCategories/ant/image_{i + 1:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / formats.CALTECH101_TGZ).write_bytes(buf.getvalue())
    with caplog.at_level("WARNING", logger="pipelines.transfer_data"):
        manifest = prepare.prepare_dataset("caltech101", str(tmp_path / "src"), str(tmp_path / "out"))
    assert "101_ObjectCategories/ferry holds no images" in caplog.text
    assert manifest["num_classes"] == 1 and manifest["empty_classes"] == ["101_ObjectCategories/ferry"]
    # the protocol (30 + 1 images per category; here 3 + 1) refuses it, naming the folder and its count; the
    # checkpoint is read first (a crafted one fails before any data work), so a loadable state dict stands in
    import torch

    torch.save({"weight": torch.zeros(1)}, tmp_path / "weights.pth")
    code = main(["transfer", "caltech101", "--data", str(tmp_path / "out"),
                 "--checkpoint", str(tmp_path / "weights.pth"),
                 "--method", "probe", "--no-tracking", "--set", "transfer.caltech_train_per_class=3",
                 "--set", "transfer.caltech_val_per_class=1"])
    err = capsys.readouterr().err
    assert code != 0 and "101_ObjectCategories/ferry (0 images)" in err and "at least 4" in err, err


def test_voc_tars_without_the_test_image_sets_name_the_file_to_supply(sources, tmp_path):
    (tmp_path / "voc").mkdir()
    shutil.copy(sources["voc2007"] / formats.VOC2007_TRAINVAL_TAR, tmp_path / "voc")
    with tarfile.open(sources["voc2007"] / formats.VOC2007_TEST_TAR) as src, \
            tarfile.open(tmp_path / "voc" / formats.VOC2007_TEST_TAR, "w") as dst:
        for member in src:
            if "ImageSets/Main/" not in member.name:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    with pytest.raises(ingest.IngestError) as e:
        transfer_data.index_voc2007(str(tmp_path / "voc"))
    assert "VOCtest_06-Nov-2007.tar" in str(e.value) and "ImageSets/Main/test.txt" in str(e.value), str(e.value)


# --- prepare -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(sources, ray_local, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer-prepared")
    for dataset in SIZES:
        prepare.prepare_dataset(dataset, str(sources[dataset]), str(root / dataset), shard_rows=8,
                                max_bad_fraction=BAD_FRACTION)
    return {dataset: root / dataset for dataset in SIZES}


@pytest.mark.parametrize("dataset", list(SIZES))
def test_prepared_dataset_follows_the_contract(dataset, prepared, sources):
    info, out = _info(sources[dataset]), prepared[dataset]
    manifest = prepare.load_manifest(str(out))
    assert manifest["dataset"] == dataset and manifest["complete"] and manifest["format"] == prepare.FORMAT_VERSION
    assert manifest["num_classes"] == len(info.classes)
    assert [(c["label"], c["wnid"]) for c in manifest["classes"]] == list(enumerate(info.classes))
    assert manifest["multi_label"] is (dataset == "voc2007")
    assert list(manifest["splits"]) == list(info.splits)
    assert [r["key"] for r in manifest["rejects"]] == list(info.bad)
    assert "truncated" in manifest["rejects"][0]["reason"]
    archive = {"caltech101": formats.CALTECH101_TGZ, "flowers102": formats.FLOWERS102_TGZ}.get(dataset)
    if archive:  # the archive the user gave and the member, not the decompressed copy under _cache/
        source = manifest["rejects"][0]["source"]
        assert source.startswith(f"{sources[dataset] / archive}: ") and "_cache" not in source, source
        assert source.endswith(".jpg") and manifest["rejects"][0]["key"].rsplit("/", 1)[-1] in source
    assert not [p for p in out.rglob(".tmp")], "a complete prepare leaves no temporaries' folder"
    assert len(prepare.manifest_hash(str(out))) == 64
    for split, keys in info.splits.items():
        table = pq.ParquetDataset(prepare.shard_uris(str(out), manifest, split)).read()
        names = ["key", "label", "wnid", "image", "source_width", "source_height"]
        assert table.schema.names == names + (["labels", "difficult"] if dataset == "voc2007" else [])
        assert str(table.schema.field("label").type) == "int32"
        good = [k for k in keys if k not in info.bad]
        assert sorted(table["key"].to_pylist()) == good
        assert manifest["splits"][split]["rows"] == len(good) and manifest["splits"][split]["inputs"] == len(keys)
        assert all(info.labels[k] == label for k, label in zip(table["key"].to_pylist(), table["label"].to_pylist()))
        assert imaging.decode_stored(table["image"][0].as_py()).shape == (256, 256, 3)
        if dataset == "voc2007":
            for key, labels, difficult in zip(*(table[c].to_pylist() for c in ("key", "labels", "difficult"))):
                assert labels == [int(f == 1) for f in info.flags[key]]
                assert difficult == [f == 0 for f in info.flags[key]]


def test_rerun_is_a_no_op(prepared, sources):
    out = prepared["voc2007"]
    before = (out / "manifest.json").stat().st_mtime_ns
    again = prepare.prepare_dataset("voc2007", str(sources["voc2007"]), str(out), shard_rows=8,
                                    max_bad_fraction=BAD_FRACTION)
    assert (out / "manifest.json").stat().st_mtime_ns == before
    assert again == json.loads((out / "manifest.json").read_text())


def test_s3_source_and_output(prepared, sources, s3_endpoint, ray_local):
    import boto3

    src = upload_tree(sources["caltech101-zip"], "transfer-src", "caltech101")
    boto3.client("s3").create_bucket(Bucket="transfer-out")
    out = "s3://transfer-out/caltech101"
    manifest = prepare.prepare_dataset("caltech101", src, out, shard_rows=8, max_bad_fraction=BAD_FRACTION)
    local = prepare.load_manifest(str(prepared["caltech101"]))
    assert manifest["splits"] == local["splits"]  # same shards, byte for byte
    assert storage.exists(storage.join(out, prepare.CACHE_DIR, "101_ObjectCategories.tar"))


# --- download and CLI --------------------------------------------------------------------------------------------


def test_download_verifies_published_or_given_checksums_over_http(http_server, sources, tmp_path):  # noqa: F811
    url, state = http_server
    for name in (formats.FLOWERS102_TGZ, formats.FLOWERS102_LABELS, formats.FLOWERS102_SETID):
        shutil.copy(sources["flowers102"] / name, state.root / name)
    with pytest.raises(ChecksumError, match=formats.FLOWERS102_TGZ):  # synthetic files: not the published MD5s
        download_dataset("flowers102", url, tmp_path / "published", progress=False)
    md5 = {n: hashlib.md5((state.root / n).read_bytes()).hexdigest() for n in os.listdir(state.root)}
    paths = download_dataset("flowers102", url, tmp_path / "given", md5=md5, progress=False)
    assert [p.name for p in paths] == [formats.FLOWERS102_TGZ, formats.FLOWERS102_LABELS, formats.FLOWERS102_SETID]

    # Caltech-101: whichever packaging the source has
    shutil.copy(sources["caltech101"] / formats.CALTECH101_ZIP, state.root)
    (path,) = download_dataset("caltech101", url, tmp_path / "caltech", verify=False, progress=False)
    assert path.name == formats.CALTECH101_ZIP and not list((tmp_path / "caltech").glob("*.part"))
    assert ("/" + formats.CALTECH101_TGZ, None) in state.requests  # tried first, 404


NEW_COMMANDS = [[c, d] for c in ("download", "prepare", "synth") for d in ("caltech101", "flowers102", "voc2007")]


def test_new_commands_have_help():
    for command in NEW_COMMANDS:
        out = subprocess.run([sys.executable, "-m", "alexnet.cli", *command, "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage: alexnet" in out.stdout, (command, out.stderr)


def test_cli_synth_download_prepare(tmp_path):
    mirror, raw, data = tmp_path / "mirror", tmp_path / "raw", tmp_path / "data"
    steps = [
        ["synth", "caltech101", "--out", str(mirror), "--classes", "2", "--min-per-class", "3", "--max-per-class",
         "4", "--background", "1", "--size", "64", "--archive", "zip"],
        ["download", "caltech101", "--from", str(mirror), "--to", str(raw), "--no-verify", "--quiet"],
        ["prepare", "caltech101", "--source", str(raw), "--out", str(data)],
    ]
    for step in steps:
        out = subprocess.run([sys.executable, "-m", "alexnet.cli", *step], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, (step, out.stderr[-3000:])
    summary = json.loads(out.stdout)
    assert summary["layout"] == formats.CALTECH101_ZIP and summary["splits"]["all"]["rows"] == 7
