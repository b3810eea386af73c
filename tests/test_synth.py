"""Tests of the synthetic ImageNet: official file formats, quirks, layout equivalence, determinism, learnability."""

from __future__ import annotations

import csv
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipelines import synth, synth_render
from pipelines.formats import (
    CMYK_JPEGS,
    DEVKIT_META,
    DEVKIT_VAL_GROUND_TRUTH,
    IMAGENET_DEVKIT,
    IMAGENET_FILES,
    IMAGENET_TRAIN_TAR,
    IMAGENET_VAL_TAR,
    KAGGLE_SYNSET_MAPPING,
    KAGGLE_TRAIN_DIR,
    KAGGLE_TRAIN_SOLUTION,
    KAGGLE_VAL_DIR,
    KAGGLE_VAL_SOLUTION,
    PNG_DISGUISED_AS_JPEG,
    VAL_NAME_FORMAT,
)
from pipelines.synth import SynthInfo, write_synthetic_imagenet

# Small but with every quirk: 4 classes x (5 train + 2 val); the large quirk images dominate the cost.
PARAMS = dict(classes=4, train_per_class=5, val_per_class=2, size=64, seed=3)
WNID = re.compile(r"^n\d{8}$")


# --- Readers: the minimum an ingest needs, written independently of pipelines.synth ------------------------------


def read_official(root: Path) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """(key -> file bytes, train key -> wnid, val key -> wnid), val labels from the devkit only."""
    files, train, val = {}, {}, {}
    with tarfile.open(root / IMAGENET_TRAIN_TAR) as outer:
        for member in outer:
            inner = tarfile.open(fileobj=outer.extractfile(member))
            for m in inner:
                key = m.name.removesuffix(".JPEG")
                files[key] = inner.extractfile(m).read()
                train[key] = member.name.removesuffix(".tar")
    with tarfile.open(root / IMAGENET_DEVKIT) as devkit:
        meta = scipy.io.loadmat(io.BytesIO(devkit.extractfile(DEVKIT_META).read()), squeeze_me=True)["synsets"]
        truth = devkit.extractfile(DEVKIT_VAL_GROUND_TRUTH).read().decode().split()
    id_to_wnid = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in meta if int(row["num_children"]) == 0}
    with tarfile.open(root / IMAGENET_VAL_TAR) as val_tar:
        for i, member in enumerate(val_tar):
            key = member.name.removesuffix(".JPEG")
            files[key] = val_tar.extractfile(member).read()
            val[key] = id_to_wnid[int(truth[i])]
    return files, train, val


def read_kaggle(root: Path) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    files, train, val = {}, {}, {}
    for path in (root / KAGGLE_TRAIN_DIR).glob("*/*.JPEG"):
        files[path.stem] = path.read_bytes()
        train[path.stem] = path.parent.name
    with open(root / KAGGLE_VAL_SOLUTION, newline="") as f:
        labels = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    for path in (root / KAGGLE_VAL_DIR).glob("*.JPEG"):
        files[path.stem] = path.read_bytes()
        val[path.stem] = labels[path.stem]
    return files, train, val


def read_imagefolder(root: Path) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    files, splits = {}, {"train": {}, "val": {}}
    for split, labels in splits.items():
        for path in (root / split).glob("*/*.JPEG"):
            files[path.stem] = path.read_bytes()
            labels[path.stem] = path.parent.name
    return files, splits["train"], splits["val"]


READERS = {"official": read_official, "kaggle": read_kaggle, "imagefolder": read_imagefolder}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[Path, SynthInfo]]:
    out = {}
    for layout in synth.LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        out[layout] = root, write_synthetic_imagenet(root, layout=layout, **PARAMS)
    return out


@pytest.fixture(scope="module")
def official(datasets):
    root, info = datasets["official"]
    return root, info, *read_official(root)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def saturated_mean(img: Image.Image) -> np.ndarray:
    """Mean colour of the strongly saturated pixels: the class object, since backgrounds are desaturated."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    sat = rgb.max(1) - rgb.min(1)
    return rgb[sat > 0.5 * sat.max()].mean(0)


def class_colour(info: SynthInfo, wnid: str) -> np.ndarray:
    colour = info.styles[wnid].split(" (")[0].rsplit(" ", 1)[0]
    return np.array(synth.COLOURS[colour], dtype=np.float32)


# --- Official layout ---------------------------------------------------------------------------------------------


def test_official_files_and_tar_structure(official):
    root, info, _, _, _ = official
    assert sorted(p.name for p in root.iterdir()) == sorted([*IMAGENET_FILES, "synth_info.json"])

    with tarfile.open(root / IMAGENET_TRAIN_TAR, "r:") as outer:  # "r:" insists on an uncompressed tar
        members = outer.getmembers()
        assert [m.name for m in members] == [f"{w}.tar" for w in info.wnids]
        for member in members:
            wnid = member.name.removesuffix(".tar")
            inner = tarfile.open(fileobj=outer.extractfile(member), mode="r:")
            names = inner.getnames()
            assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", n) for n in names), names  # flat, no folders
            assert sorted(n.removesuffix(".JPEG") for n in names) == sorted(k for k, w in info.train if w == wnid)
            numbers = sorted(int(n[len(wnid) + 1:-5]) for n in names)
            assert numbers != list(range(numbers[0], numbers[0] + len(numbers)))  # sparse, like the real set

    with tarfile.open(root / IMAGENET_VAL_TAR, "r:") as val_tar:
        names = val_tar.getnames()
    assert names == [VAL_NAME_FORMAT.format(i) for i in range(1, len(info.val) + 1)]
    assert [k for k, _ in info.val] == [n.removesuffix(".JPEG") for n in names]

    with tarfile.open(root / IMAGENET_DEVKIT, "r:gz") as devkit:
        files = {m.name for m in devkit if m.isfile()}
    assert files == {DEVKIT_META, DEVKIT_VAL_GROUND_TRUTH, "ILSVRC2012_devkit_t12/readme.txt"}


def test_meta_mat_like_the_real_devkit(official):
    root, info, _, _, _ = official
    k = PARAMS["classes"]
    with tarfile.open(root / IMAGENET_DEVKIT) as devkit:
        raw = devkit.extractfile(DEVKIT_META).read()

    synsets = scipy.io.loadmat(io.BytesIO(raw), squeeze_me=True)["synsets"]
    assert synsets.dtype.names == ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                   "wordnet_height", "num_train_images")
    # torchvision's parse_meta_mat reads fields by position and keeps rows with num_children == 0.
    leaves = [row for row in synsets if row[4] == 0]
    assert len(leaves) == k
    ids = {str(row["WNID"]): int(row["ILSVRC2012_ID"]) for row in leaves}
    assert ids == info.ilsvrc_ids
    assert sorted(ids.values()) == list(range(1, k + 1))
    assert sorted(ids, key=ids.__getitem__) != sorted(ids)  # devkit order is not sorted-wnid order
    assert all(str(row["words"]) == info.words[str(row["WNID"])] for row in leaves)

    non_leaves = [row for row in synsets if row[4] > 0]
    assert non_leaves
    all_ids = {int(row["ILSVRC2012_ID"]) for row in synsets}
    for row in non_leaves:
        assert int(row["ILSVRC2012_ID"]) > k
        children = np.atleast_1d(row["children"]).tolist()
        assert len(children) == int(row["num_children"]) and set(children) <= all_ids

    unsqueezed = scipy.io.loadmat(io.BytesIO(raw))["synsets"]
    assert unsqueezed.shape == (len(synsets), 1)
    first = unsqueezed[0, 0]
    assert first["ILSVRC2012_ID"][0, 0] == 1 and WNID.match(first["WNID"][0])
    assert first["children"].size == 0


def test_torchvision_imagenet_reads_the_official_files(official, tmp_path, monkeypatch):
    """torchvision's ImageNet parses the devkit with code written for the real meta.mat; it must work unchanged
    (bar the MD5 check) and agree with SynthInfo."""
    imagenet = pytest.importorskip("torchvision.datasets.imagenet")
    root, info, _, _, _ = official
    for name in IMAGENET_FILES:
        (tmp_path / name).symlink_to(root / name)
    monkeypatch.setattr(imagenet, "_verify_archive", lambda *args: None)
    for split, expected in (("train", info.train), ("val", info.val)):
        dataset = imagenet.ImageNet(str(tmp_path), split=split)
        assert dataset.wnids == info.wnids
        assert dataset.classes[info.wnids.index("n02105855")] == ("Shetland sheepdog", "Shetland sheep dog",
                                                                  "Shetland")
        labels = {Path(path).stem: dataset.wnids[target] for path, target in dataset.samples}
        assert labels == dict(expected)


def test_ground_truth_maps_val_images_to_intended_wnids(official):
    _, info, files, train, val = official
    assert train == dict(info.train)
    assert val == dict(info.val)
    # ... and the intended wnid is what the image shows: its object has the class colour.
    for key, wnid in info.val:
        if key in info.bad or key in info.quirks["grayscale"] or key in info.quirks["tiny"]:
            continue
        assert np.abs(saturated_mean(decode(files[key])) - class_colour(info, wnid)).max() < 60, key


# --- Quirks ------------------------------------------------------------------------------------------------------


def test_class_set_holds_the_real_quirk_wnids(official):
    _, info, _, _, _ = official
    assert len(info.wnids) == PARAMS["classes"] and info.wnids == sorted(info.wnids)
    assert all(WNID.match(w) for w in info.wnids)
    assert "n02105855" in info.wnids
    cmyk_present = [n for n in CMYK_JPEGS if n.split("_")[0] in info.wnids]
    assert len(cmyk_present) >= 2
    assert sorted(info.quirks["cmyk"]) == sorted(n.removesuffix(".JPEG") for n in cmyk_present)
    counts = {w: 0 for w in info.wnids}
    for _, w in info.train:
        counts[w] += 1
    assert set(counts.values()) == {PARAMS["train_per_class"]}  # quirks replace images, never add any
    assert len(info.val) == PARAMS["classes"] * PARAMS["val_per_class"]


def test_each_quirk_is_present(official):
    _, info, files, train, val = official
    png_key = PNG_DISGUISED_AS_JPEG.removesuffix(".JPEG")
    assert info.quirks["png"] == [png_key] and train[png_key] == "n02105855"
    assert files[png_key].startswith(b"\x89PNG\r\n\x1a\n")
    png = decode(files[png_key])
    assert png.format == "PNG" and png.mode == "RGB"
    assert np.abs(saturated_mean(png) - class_colour(info, "n02105855")).max() < 60

    for key in info.quirks["cmyk"]:
        img = decode(files[key])
        assert img.format == "JPEG" and img.mode == "CMYK"
        assert np.abs(saturated_mean(img) - class_colour(info, train[key])).max() < 60, key

    grayscale = info.quirks["grayscale"]
    assert any(k in train for k in grayscale) and any(k in val for k in grayscale)
    assert all(decode(files[k]).mode == "L" for k in grayscale)

    assert len(info.quirks["large"]) >= 2
    assert all(decode(files[k]).width > 2000 for k in info.quirks["large"])
    assert len(info.quirks["tiny"]) >= 2
    assert {decode(files[k]).size for k in info.quirks["tiny"]} == {(20, 15), (8, 8)}

    assert sorted(info.bad.values()) == ["empty", "truncated", "truncated"]
    assert any(k in val and r == "truncated" for k, r in info.bad.items())
    for key, reason in info.bad.items():
        if reason == "empty":
            assert key in train and files[key] == b""
        with pytest.raises(OSError):  # UnidentifiedImageError is an OSError too
            decode(files[key])

    special = set(info.bad).union(*info.quirks.values())
    assert len(special) == len(info.bad) + sum(map(len, info.quirks.values()))  # one quirk per file
    for key in files.keys() - special:
        img = decode(files[key])
        assert (img.format, img.mode) == ("JPEG", "RGB"), key


def test_no_quirks(tmp_path):
    info = write_synthetic_imagenet(tmp_path, layout="imagefolder", classes=2, train_per_class=3, val_per_class=1,
                                    size=48, quirks=False)
    assert info.bad == {} and all(v == [] for v in info.quirks.values())
    assert all(WNID.match(w) for w in info.wnids)
    files, _, _ = read_imagefolder(tmp_path)
    assert len(files) == 2 * 3 + 2 * 1
    for data in files.values():
        img = decode(data)
        assert (img.format, img.mode) == ("JPEG", "RGB") and 30 < max(img.size) < 60


@pytest.mark.parametrize("kwargs", [dict(layout="tfrecord"), dict(classes=2), dict(classes=3, train_per_class=1),
                                    dict(val_per_class=0), dict(classes=synth.MAX_CLASSES + 1)])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_synthetic_imagenet(tmp_path, **kwargs)


# --- Layouts, determinism, metadata ------------------------------------------------------------------------------


def test_layouts_hold_identical_keys_bytes_and_labels(datasets, official):
    _, info, files, train, val = official
    for layout in ("kaggle", "imagefolder"):
        root, other_info = datasets[layout]
        other_files, other_train, other_val = READERS[layout](root)
        assert other_files.keys() == files.keys()
        assert all(other_files[k] == files[k] for k in files), layout
        assert (other_train, other_val) == (train, val)
        assert (other_info.train, other_info.val, other_info.wnids) == (info.train, info.val, info.wnids)
        assert (other_info.bad, other_info.quirks, other_info.ilsvrc_ids) == (info.bad, info.quirks,
                                                                               info.ilsvrc_ids)


def test_kaggle_metadata(datasets):
    root, info = datasets["kaggle"]
    mapping = (root / KAGGLE_SYNSET_MAPPING).read_text().splitlines()
    assert mapping == [f"{w} {info.words[w]}" for w in info.wnids]

    labels = dict(info.val)
    with open(root / KAGGLE_VAL_SOLUTION, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    assert sorted(r[0] for r in rows[1:]) == sorted(labels)
    for image_id, prediction in rows[1:]:
        assert prediction.endswith(" ")
        tokens = prediction.split()
        assert len(tokens) % 5 == 0 and set(tokens[0::5]) == {labels[image_id]}
        for i in range(0, len(tokens), 5):
            x0, y0, x1, y1 = map(int, tokens[i + 1:i + 5])
            assert 0 <= x0 <= x1 and 0 <= y0 <= y1

    train_labels = dict(info.train)
    with open(root / KAGGLE_TRAIN_SOLUTION, newline="") as f:
        train_rows = list(csv.DictReader(f))
    assert train_rows and all(r["PredictionString"].split()[0] == train_labels[r["ImageId"]] for r in train_rows)

    assert info.distractors and all((root / p).is_file() for p in info.distractors)
    assert all("/test/" in p for p in info.distractors)


def test_synth_info_json_round_trip(datasets):
    for root, info in datasets.values():
        assert SynthInfo.from_json((root / "synth_info.json").read_text()) == info
    info = datasets["official"][1]
    assert info.label(info.wnids[2]) == 2


def test_same_seed_same_bytes_different_seed_different(datasets, tmp_path):
    root, info = datasets["official"]
    again = write_synthetic_imagenet(tmp_path / "again", layout="official", **PARAMS)
    assert again == info
    for name in IMAGENET_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (root / name).read_bytes(), name

    other = write_synthetic_imagenet(tmp_path / "other", layout="imagefolder", **{**PARAMS, "seed": 4})
    assert other.wnids != info.wnids
    png = PNG_DISGUISED_AS_JPEG
    assert (tmp_path / "other/train/n02105855" / png).read_bytes() != \
        (datasets["imagefolder"][0] / "train/n02105855" / png).read_bytes()


def test_class_styles_are_distinct():
    styles = [synth_render.class_style(i) for i in range(synth.MAX_CLASSES)]
    assert len(set(styles)) == synth.MAX_CLASSES
    first = styles[: len(synth.SHAPES)]
    assert len({s.shape for s in first}) == len({s.colour for s in first}) == len(first)


# --- Learnability ------------------------------------------------------------------------------------------------


def hue_histogram(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Hue histogram of the saturated pixels of a random 7/8 crop, maybe flipped: the cheapest stand-in for a
    model that sees augmented crops (hue ignores brightness and contrast jitter)."""
    img = img.convert("RGB")
    w, h = img.size
    cw, ch = w * 7 // 8, h * 7 // 8
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = img.crop((x, y, x + cw, y + ch)).resize((32, 32))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    hsv = np.asarray(img.convert("HSV"), dtype=np.int64).reshape(-1, 3)
    hues = hsv[hsv[:, 1] > 128, 0] * 24 // 256
    return np.bincount(hues, minlength=24) / max(1, hues.size)


def test_learnable_by_nearest_class_mean(tmp_path):
    classes = 8
    write_synthetic_imagenet(tmp_path, layout="official", classes=classes, train_per_class=8, val_per_class=6,
                             size=96, seed=1, quirks=False)
    files, train, val = read_official(tmp_path)  # val labels go through meta.mat and the ground truth
    wnids = sorted(set(train.values()))
    rng = np.random.default_rng(0)
    feats = {k: hue_histogram(decode(files[k]), rng) for k in files}
    means = np.stack([np.mean([feats[k] for k, w in train.items() if w == wnid], axis=0) for wnid in wnids])
    correct = [wnids[np.abs(means - feats[k]).sum(1).argmin()] == w for k, w in val.items()]
    assert np.mean(correct) >= 0.9  # chance is 1/8
