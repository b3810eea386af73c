"""Reading ImageNet in place: layout detection, the byte-range index, labels, unsafe archives, S3."""

from __future__ import annotations

import io
import shutil
import tarfile

import pyarrow.fs as pafs
import pytest

from pipelines import formats, ingest
from pipelines.synth import SynthInfo
from tests.conftest import upload_tree

pytestmark = pytest.mark.slow


def _rows(index: ingest.SourceIndex) -> list[tuple]:
    t = index.table
    return list(zip(*(t[c].to_pylist() for c in ("split", "key", "wnid", "label"))))


def _bytes(index: ingest.SourceIndex) -> dict[str, bytes]:
    t = index.table
    return {
        k: ingest.read_range(u, o, s)
        for k, u, o, s in zip(*(t[c].to_pylist() for c in ("key", "uri", "offset", "size")))
    }


@pytest.fixture(scope="module")
def indexes(synth_root, ray_local) -> dict[str, ingest.SourceIndex]:
    return {layout: ingest.index_imagenet(str(synth_root / layout)) for layout in ("official", "kaggle", "imagefolder")}


def test_layouts_are_detected(synth_root):
    for layout in ("official", "kaggle", "imagefolder"):
        assert ingest.detect_layout(str(synth_root / layout)) == layout


def test_unknown_layout_names_what_was_expected(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ingest.IngestError, match="ILSVRC2012_img_train.tar.*Kaggle.*ImageFolder"):
        ingest.detect_layout(str(tmp_path))
    with pytest.raises(ingest.IngestError, match="does not exist"):
        ingest.detect_layout(str(tmp_path / "missing"))


def test_three_layouts_index_the_same_images_with_the_same_labels(indexes, synth_root):
    info = SynthInfo.from_json((synth_root / "official" / "synth_info.json").read_text())
    reference = _rows(indexes["official"])
    assert len(reference) == len(info.train) + len(info.val)
    for layout in ("kaggle", "imagefolder"):
        assert _rows(indexes[layout]) == reference, layout
        assert indexes[layout].wnids == indexes["official"].wnids == sorted(info.wnids)
    contents = [_bytes(indexes[layout]) for layout in ("official", "kaggle", "imagefolder")]
    assert contents[0] == contents[1] == contents[2]


def test_labels_are_sorted_wnid_positions_not_devkit_ids(indexes, synth_root):
    info = SynthInfo.from_json((synth_root / "official" / "synth_info.json").read_text())
    # the synthetic devkit numbers classes in an order different from sorted wnids, like the real one
    assert [w for w, _ in sorted(info.ilsvrc_ids.items(), key=lambda kv: kv[1])] != sorted(info.wnids)
    truth = {key: wnid for key, wnid in info.train + info.val}
    for split, key, wnid, label in _rows(indexes["official"]):
        assert wnid == truth[key], key
        assert label == sorted(info.wnids).index(wnid)


def test_devkit_keeps_only_leaf_synsets(synth_root):
    devkit = ingest.read_devkit(str(synth_root / "official" / formats.IMAGENET_DEVKIT))
    info = SynthInfo.from_json((synth_root / "official" / "synth_info.json").read_text())
    assert devkit.wnids == sorted(info.wnids)
    assert devkit.id_to_wnid == {v: k for k, v in info.ilsvrc_ids.items()}
    assert len(devkit.val_ground_truth) == len(info.val)


def test_official_index_points_into_the_tars(indexes, synth_root):
    t = indexes["official"].table
    uris = set(t["uri"].to_pylist())
    assert uris == {str(synth_root / "official" / formats.IMAGENET_TRAIN_TAR), str(synth_root / "official" / formats.IMAGENET_VAL_TAR)}
    # the PNG in disguise is found by its real name
    assert "n02105855_2933" in t["key"].to_pylist()


def test_s3_sources_give_identical_rows_and_bytes(synth_root, indexes, s3_endpoint, ray_local):
    for layout in ("official", "kaggle", "imagefolder"):
        uri = upload_tree(synth_root / layout, "ingest-src", layout)
        remote = ingest.index_imagenet(uri)
        assert remote.layout == layout
        assert _rows(remote) == _rows(indexes[layout])
        assert _bytes(remote) == _bytes(indexes[layout])


def test_range_reader_matches_the_file(tmp_path):
    data = bytes(range(256)) * 4000
    (tmp_path / "blob").write_bytes(data)
    with pafs.LocalFileSystem().open_input_file(str(tmp_path / "blob")) as f:
        r = ingest.RangeReader(f, 1000, 500_000, block_size=4096)
        assert r.read(10) == data[1000:1010]
        r.seek(123_456)
        assert r.read(70_000) == data[1000 + 123_456 : 1000 + 193_456]
        r.seek(-5, io.SEEK_END)
        assert r.read(100) == data[1000 + 499_995 : 1000 + 500_000]
        assert r.read(1) == b""


def test_read_range_keeps_only_archives_open(tmp_path):
    data = bytes(range(256)) * 40
    for name in ("a.JPEG", "b.JPEG", "train.tar"):
        (tmp_path / name).write_bytes(data)
    files: dict = {}
    # single-image files: read and closed at once (an ImageFolder shard would otherwise hold thousands open)
    assert ingest.read_range(str(tmp_path / "a.JPEG"), 0, len(data), files) == data
    assert ingest.read_range(f"file://{tmp_path / 'b.JPEG'}", 100, 50, files) == data[100:150]
    assert files == {}
    # an archive stays open for the shard's next members; a range past the end comes back short
    tar = str(tmp_path / "train.tar")
    assert ingest.read_range(tar, 7, 3, files) == data[7:10]
    assert ingest.read_range(tar, len(data) - 2, 10, files) == data[-2:]
    assert list(files) == [tar]
    for f in files.values():
        f.close()


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


@pytest.mark.parametrize(
    "evil",
    [
        tarfile.TarInfo("../../etc/cron.d/evil.JPEG"),
        tarfile.TarInfo("/tmp/evil.JPEG"),
        "symlink",
    ],
)
def test_malicious_archives_are_refused(tmp_path, synth_root, evil, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(synth_root / "official" / formats.IMAGENET_DEVKIT, src)
    wnid = ingest.read_devkit(str(src / formats.IMAGENET_DEVKIT)).wnids[0]
    if evil == "symlink":
        evil = tarfile.TarInfo(f"{wnid}_1.JPEG")
        evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
    inner = _tar_bytes([(tarfile.TarInfo(f"{wnid}_0.JPEG"), b"\xff\xd8 fine"), (evil, b"payload")])
    (src / formats.IMAGENET_TRAIN_TAR).write_bytes(_tar_bytes([(tarfile.TarInfo(f"{wnid}.tar"), inner)]))
    with pytest.raises(ingest.UnsafeArchiveError, match="refusing"):
        ingest.index_imagenet(str(src), parallel=False)
    # the same member at the top level of the val tar is refused too, with the archive named
    (src / formats.IMAGENET_TRAIN_TAR).unlink()
    (src / formats.IMAGENET_VAL_TAR).write_bytes(_tar_bytes([(evil, b"payload")]))
    with pytest.raises(ingest.UnsafeArchiveError, match=formats.IMAGENET_VAL_TAR):
        ingest.index_imagenet(str(src))


def test_a_corrupt_tar_is_reported_with_its_name(tmp_path, synth_root):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(synth_root / "official" / formats.IMAGENET_DEVKIT, src)
    (src / formats.IMAGENET_VAL_TAR).write_bytes(b"garbage!" * 200)
    with pytest.raises(ingest.IngestError, match=formats.IMAGENET_VAL_TAR):
        ingest.index_imagenet(str(src))


def _val_tar_members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


@pytest.mark.parametrize("where", ["inside a header", "after the last image", "inside the last image"])
def test_a_tar_cut_short_is_an_error_naming_it_not_fewer_images(tmp_path, synth_root, where):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(synth_root / "official" / formats.IMAGENET_DEVKIT, src)
    data = (synth_root / "official" / formats.IMAGENET_VAL_TAR).read_bytes()
    members = _val_tar_members(synth_root / "official" / formats.IMAGENET_VAL_TAR)
    last = members[-1]
    cut = {"inside a header": members[len(members) // 2].offset + 100,
           "after the last image": last.offset_data + -(-last.size // 512) * 512,  # no end-of-archive marker
           "inside the last image": last.offset_data + last.size // 2}[where]
    (src / formats.IMAGENET_VAL_TAR).write_bytes(data[:cut])
    # tarfile notices data cut short itself; a cut header or a missing end marker it takes for the end
    reason = "not a readable tar archive" if where == "inside the last image" else "truncated or damaged at byte"
    with pytest.raises(ingest.IngestError, match=rf"{formats.IMAGENET_VAL_TAR}: {reason}"):
        ingest.index_imagenet(str(src), parallel=False)


def test_an_archive_with_fewer_images_than_the_devkit_counts_is_an_error(tmp_path, synth_root, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(synth_root / "official" / formats.IMAGENET_DEVKIT, src)
    official = synth_root / "official" / formats.IMAGENET_VAL_TAR
    members = _val_tar_members(official)
    with tarfile.open(official) as full, tarfile.open(src / formats.IMAGENET_VAL_TAR, "w") as short:
        for m in members[:-1]:  # a well-formed tar that lacks one image
            short.addfile(m, full.extractfile(m))
    # the real devkit lists 50,000 validation images; this small one lists len(members)
    monkeypatch.setattr(formats, "IMAGENET_NUM_VAL", len(members))
    with pytest.raises(ingest.IngestError, match=rf"{formats.IMAGENET_VAL_TAR}: {len(members) - 1} validation images, "
                                                 rf"the official archive has {len(members)}"):
        ingest.index_imagenet(str(src), parallel=False)


def test_a_malformed_meta_mat_is_an_error_naming_the_devkit(tmp_path, synth_root):
    with tarfile.open(synth_root / "official" / formats.IMAGENET_DEVKIT) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for broken in (b"MATLAB 5.0 MAT-file, not really" + b"\0" * 200, b""):
        devkit = tmp_path / formats.IMAGENET_DEVKIT
        with tarfile.open(devkit, "w:gz") as tar:
            for name, data in {**files, formats.DEVKIT_META: broken}.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with pytest.raises(ingest.IngestError, match=rf"{formats.IMAGENET_DEVKIT}: data/meta.mat is not the devkit's"):
            ingest.read_devkit(str(devkit))
