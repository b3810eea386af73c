"""Small, learnable Caltech-101, Flowers-102 and VOC 2007 in the exact formats of their official archives.

The transfer tests need data that looks like the real archives to ``pipelines.transfer_data`` and that a network
trained on the synthetic ImageNet (``pipelines.synth``) can transfer to. The images come from the same renderer:
each class is a (shape, colour, fill) style of the same family, drawn over the same kind of textured background,
but from styles the default synthetic ImageNet (up to 16 classes) does not use (``STYLE_OFFSET``), so features
of shapes and colours transfer while the classes are new.

``caltech101``
    ``101_ObjectCategories.tar.gz`` (``101_ObjectCategories/<category>/image_%04d.jpg``) and/or the newer
    ``caltech-101.zip`` wrapping it as ``caltech-101/101_ObjectCategories.tar.gz`` next to
    ``caltech-101/Annotations.tar``. Real category names, mixed case (sorted order puts ``Faces_easy`` before
    ``accordion``), written in unsorted order; per-class counts spread evenly over
    ``[min_per_class, max_per_class]`` (the default 35..85 exercises the protocol's 30 train / at most 50 test per
    class); a ``BACKGROUND_Google`` folder of clutter that readers must exclude.
``flowers102``
    ``102flowers.tgz`` (``jpg/image_%05d.jpg``, classes shuffled over image numbers), ``imagelabels.mat``
    (``labels``: 1 x N uint8, 1-based) and ``setid.mat`` (``trnid``, ``valid``, ``tstid``: 1 x K uint16, 1-based
    image numbers, grouped by class as in the real file).
``voc2007``
    ``VOCtrainval_06-Nov-2007.tar`` and ``VOCtest_06-Nov-2007.tar`` with ``VOCdevkit/VOC2007/{JPEGImages,
    Annotations,ImageSets/Main}``: ``<id>.xml`` annotations (boxes, ``<difficult>``), ``{train,val,trainval}.txt``
    and ``test.txt``, and ``<class>_<split>.txt`` for every class and split (``1`` present, ``-1`` absent, ``0``
    only difficult instances). Each image shows 1 to ``max_objects`` objects of different classes; some objects
    are difficult (small), so some flags are 0 and some images have no class with flag 1.

``corrupt`` replaces that many images by truncated JPEGs (kept under their names and labels) for reject tests.
Everything is a pure function of the parameters: the same call writes byte-identical archives.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import formats
from pipelines.synth_render import (
    MAX_CLASSES,
    random_backdrop,
    encode,
    file_bytes,
    image_size,
    mat_bytes,
    object_colour,
    paint,
    rng_for,
    class_style,
    Style,
    tar_add,
    tar_add_dir,
    tar_writer,
    mat_uint,
)

__all__ = ["WRITERS", "TransferSynthInfo", "write_synthetic_caltech101", "write_synthetic_flowers102",
           "write_synthetic_voc2007"]

#: Transfer classes use styles from this index on: the default synthetic ImageNet (<= 16 classes) uses none of them.
STYLE_OFFSET = 16

#: The real Caltech-101 categories, mixed case first so that even a few classes sort case-sensitively.
CALTECH_CATEGORIES = (
    "accordion", "Faces_easy", "airplanes", "Leopards", "anchor", "Motorbikes", "ant", "Faces", "barrel", "bass",
    "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon", "car_side",
    "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body", "cougar_face", "crab", "crayfish",
    "crocodile", "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin", "dragonfly", "electric_guitar",
    "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "flamingo_head", "garfield", "gerenuk",
    "gramophone", "grand_piano", "hawksbill", "headphone", "hedgehog", "helicopter", "ibis", "inline_skate",
    "joshua_tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly",
    "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza",
    "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors", "scorpion",
    "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish", "stegosaurus", "stop_sign", "strawberry",
    "sunflower", "tick", "trilobite", "umbrella", "watch", "water_lilly", "wheelchair", "wild_cat",
    "windsor_chair", "wrench", "yin_yang",
)
#: Clutter images use hatched styles, which no transfer class of the default sizes uses.
_CLUTTER_STYLES = range(MAX_CLASSES // 2, MAX_CLASSES)

_VOC_ANNOTATION = """<annotation>
\t<folder>VOC2007</folder>
\t<filename>{key}.jpg</filename>
\t<source>
\t\t<database>The VOC2007 Database</database>
\t\t<annotation>PASCAL VOC2007</annotation>
\t\t<image>synthetic</image>
\t</source>
\t<size>
\t\t<width>{width}</width>
\t\t<height>{height}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
{objects}</annotation>
"""
_VOC_OBJECT = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>{difficult}</difficult>
\t\t<bndbox>
\t\t\t<xmin>{x0}</xmin>
\t\t\t<ymin>{y0}</ymin>
\t\t\t<xmax>{x1}</xmax>
\t\t\t<ymax>{y1}</ymax>
\t\t</bndbox>
\t</object>
"""


@dataclass
class TransferSynthInfo:
    """What a synthetic transfer dataset contains; written to ``<out>/synth_info.json``.

    Keys are those of the prepared dataset: Caltech ``<category>/image_0001``, Flowers ``image_00001``,
    VOC ``000005``.
    """

    dataset: str
    seed: int
    size: int
    #: archive files written to ``out``
    files: list[str]
    #: class names in label order (Caltech: sorted folders; Flowers: ``%03d``; VOC: the devkit order)
    classes: list[str]
    #: split of the prepared dataset -> its keys, sorted (Caltech: ``all``)
    splits: dict[str, list[str]]
    #: key -> 0-based label (VOC: the first class with flag 1, or -1)
    labels: dict[str, int]
    #: VOC: key -> the 20 flags of ``<class>_<split>.txt`` (1 present, -1 absent, 0 difficult only)
    flags: dict[str, list[int]] = field(default_factory=dict)
    #: key -> "truncated": files a decoder must reject
    bad: dict[str, str] = field(default_factory=dict)
    #: archive members that are not dataset images (Caltech's BACKGROUND_Google)
    excluded: list[str] = field(default_factory=list)
    #: class -> what its images show
    styles: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TransferSynthInfo:
        return cls(**json.loads(text))


def _class_styles(names: list[str]) -> dict[str, Style]:
    return {name: class_style(STYLE_OFFSET + i) for i, name in enumerate(names)}


def _describe(styles: dict[str, Style]) -> dict[str, str]:
    return {name: f"{s.colour} {s.shape} ({s.fill})" for name, s in styles.items()}


def _corrupt_keys(seed: int, dataset: str, keys: list[str], corrupt: int) -> dict[str, str]:
    if not 0 <= corrupt <= len(keys):
        raise ValueError(f"corrupt must be in 0..{len(keys)}, got {corrupt}")
    picks = rng_for(seed, dataset, "corrupt").permutation(len(keys))[:corrupt]
    return {keys[i]: "truncated" for i in sorted(picks)}


def _finish(out: Path, info: TransferSynthInfo) -> TransferSynthInfo:
    (out / "synth_info.json").write_text(info.to_json())
    return info


def _check(size: int, **counts: int) -> None:
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# --- Caltech-101 -----------------------------------------------------------------------------------------------


def write_synthetic_caltech101(
    out: str | Path,
    *,
    classes: int = 5,
    min_per_class: int = 35,
    max_per_class: int = 85,
    background: int = 10,
    archive: str = "tar.gz",
    size: int = 256,
    seed: int = 0,
    corrupt: int = 0,
) -> TransferSynthInfo:
    """Write a synthetic Caltech-101 into ``out``: ``archive`` is ``tar.gz`` (``101_ObjectCategories.tar.gz``),
    ``zip`` (``caltech-101.zip``) or ``both``."""
    if archive not in ("tar.gz", "zip", "both"):
        raise ValueError(f"archive must be tar.gz, zip or both, got {archive!r}")
    if not 1 <= classes <= len(CALTECH_CATEGORIES):
        raise ValueError(f"classes must be in 1..{len(CALTECH_CATEGORIES)}, got {classes}")
    if min_per_class > max_per_class:
        raise ValueError(f"min_per_class {min_per_class} > max_per_class {max_per_class}")
    if background < 0:
        raise ValueError(f"background must be >= 0, got {background}")
    _check(size, min_per_class=min_per_class)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(CALTECH_CATEGORIES[:classes])
    styles = _class_styles(names)
    counts = np.linspace(min_per_class, max_per_class, classes).round().astype(int)
    counts = counts[rng_for(seed, "caltech", "counts").permutation(classes)]
    items = [(name, f"{name}/image_{n:04d}") for name, count in zip(names, counts) for n in range(1, int(count) + 1)]
    bad = _corrupt_keys(seed, "caltech101", [k for _, k in items], corrupt)
    clutter = rng_for(seed, "caltech", "clutter").choice(_CLUTTER_STYLES, size=background)
    members = [(f"{formats.CALTECH101_BACKGROUND}/image_{n + 1:04d}", class_style(int(i))) for n, i in enumerate(clutter)]
    members += [(key, styles[name]) for name, key in items]

    buf = io.BytesIO()
    with tar_writer(buf, gz=True) as tar:
        tar_add_dir(tar, formats.CALTECH101_ROOT)
        for folder in [formats.CALTECH101_BACKGROUND, *names]:
            tar_add_dir(tar, f"{formats.CALTECH101_ROOT}/{folder}")
        for key, style in members:
            data = encode(seed, key, style, bad.get(key, "normal"), size)[0]
            tar_add(tar, f"{formats.CALTECH101_ROOT}/{key}.jpg", data)
    files = []
    if archive in ("tar.gz", "both"):
        (out / formats.CALTECH101_TGZ).write_bytes(buf.getvalue())
        files.append(formats.CALTECH101_TGZ)
    if archive in ("zip", "both"):
        _write_caltech_zip(out / formats.CALTECH101_ZIP, buf.getvalue(), names)
        files.append(formats.CALTECH101_ZIP)

    ordered = sorted(names)
    return _finish(out, TransferSynthInfo(
        dataset="caltech101", seed=seed, size=size, files=files, classes=ordered,
        splits={"all": sorted(k for _, k in items)}, labels={k: ordered.index(n) for n, k in items}, bad=bad,
        excluded=[key for key, _ in members[:background]], styles=_describe(styles),
    ))


def _write_caltech_zip(path: Path, tgz: bytes, names: list[str]) -> None:
    annotations = io.BytesIO()
    with tar_writer(annotations) as tar:
        tar_add_dir(tar, "Annotations")
        for name in names:
            tar_add_dir(tar, f"Annotations/{name}")
    stamp = (2012, 6, 6, 0, 0, 0)  # fixed member times: byte-identical reruns
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("caltech-101/", stamp), b"")
        # stored, not deflated: the tar.gz would not shrink
        zf.writestr(zipfile.ZipInfo(formats.CALTECH101_ZIP_TGZ, stamp), tgz, compress_type=zipfile.ZIP_STORED)
        zf.writestr(zipfile.ZipInfo(formats.CALTECH101_ZIP_ANNOTATIONS, stamp), annotations.getvalue())
        zf.writestr(zipfile.ZipInfo("caltech-101/show_annotation.m", stamp),
                    b"% synthetic Caltech-101: annotations are not used by the transfer protocol\n")


# --- Oxford Flowers-102 ----------------------------------------------------------------------------------------


def write_synthetic_flowers102(
    out: str | Path,
    *,
    classes: int = 5,
    train_per_class: int = 10,
    val_per_class: int = 10,
    test_per_class: int = 15,
    size: int = 256,
    seed: int = 0,
    corrupt: int = 0,
) -> TransferSynthInfo:
    """Write a synthetic Flowers-102 (``102flowers.tgz``, ``imagelabels.mat``, ``setid.mat``) into ``out``."""
    if not 1 <= classes <= MAX_CLASSES - STYLE_OFFSET:
        raise ValueError(f"classes must be in 1..{MAX_CLASSES - STYLE_OFFSET}, got {classes}")
    _check(size, train_per_class=train_per_class, val_per_class=val_per_class, test_per_class=test_per_class)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_class = train_per_class + val_per_class + test_per_class
    # official[n - 1] is the 1-based class of image n; classes are interleaved over the numbers, as in the real set
    official = rng_for(seed, "flowers", "labels").permutation(np.repeat(np.arange(1, classes + 1), per_class))
    setid: dict[str, list[int]] = {key: [] for key in formats.FLOWERS102_SPLIT_KEYS.values()}
    split_of = {}
    for label in range(1, classes + 1):
        numbers = rng_for(seed, "flowers", "split", label).permutation(np.flatnonzero(official == label) + 1)
        bounds = np.cumsum([0, train_per_class, val_per_class, test_per_class])
        for (split, key), lo, hi in zip(formats.FLOWERS102_SPLIT_KEYS.items(), bounds, bounds[1:]):
            setid[key] += sorted(int(n) for n in numbers[lo:hi])
            split_of.update({int(n): split for n in numbers[lo:hi]})
    names = [f"{label:03d}" for label in range(1, classes + 1)]
    styles = _class_styles(names)
    keys = [f"image_{n:05d}" for n in range(1, len(official) + 1)]
    bad = _corrupt_keys(seed, "flowers102", keys, corrupt)

    with open(out / formats.FLOWERS102_TGZ, "wb") as raw, tar_writer(raw, gz=True) as tar:
        tar_add_dir(tar, "jpg")
        for key, label in zip(keys, official):
            data = encode(seed, key, styles[names[label - 1]], bad.get(key, "normal"), size)[0]
            tar_add(tar, f"jpg/{key}.jpg", data)
    (out / formats.FLOWERS102_LABELS).write_bytes(mat_bytes({"labels": mat_uint([int(v) for v in official])}))
    # the real setid.mat stores uint16 whatever the count
    (out / formats.FLOWERS102_SETID).write_bytes(mat_bytes(
        {key: np.array(numbers, dtype=np.uint16, ndmin=2) for key, numbers in setid.items()}))

    splits = {split: sorted(k for n, k in enumerate(keys, 1) if split_of[n] == split)
              for split in formats.FLOWERS102_SPLIT_KEYS}
    return _finish(out, TransferSynthInfo(
        dataset="flowers102", seed=seed, size=size,
        files=[formats.FLOWERS102_TGZ, formats.FLOWERS102_LABELS, formats.FLOWERS102_SETID], classes=names,
        splits=splits, labels={k: int(label) - 1 for k, label in zip(keys, official)}, bad=bad,
        styles=_describe(styles),
    ))


# --- PASCAL VOC 2007 -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VocObject:
    name: str
    difficult: bool


def _voc_scene(seed: int, key: str, objects: list[_VocObject], styles: dict[str, Style], size: int
               ) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Objects side by side along the longer side of the image; difficult ones small. Returns boxes too."""
    rng = rng_for(seed, "voc", key)
    w, h = image_size(rng, size)
    backdrop = random_backdrop(rng)
    k = len(objects)
    placed = []
    for slot, obj in enumerate(objects):
        along = (slot + 0.5) / k + rng.uniform(-0.04, 0.04)
        across = rng.uniform(0.35, 0.65)
        radius = rng.uniform(0.05, 0.08) if obj.difficult else rng.uniform(0.2, 0.3) / math.sqrt(k)
        place = (along, across, radius) if w >= h else (across, along, radius)
        style = styles[obj.name]
        placed.append((style, object_colour(rng, style), place, rng.uniform(0, 2 * math.pi)))
    img, boxes = paint(rng, w, h, backdrop, placed)
    return img, [b or (0, 0, w - 1, h - 1) for b in boxes]


def _voc_plan(seed: int, ids: list[str], max_objects: int, forced: dict[str, list[bool]]) -> dict[str, list[_VocObject]]:
    """The objects of every image: 1..max_objects distinct classes, about 15% difficult, or ``forced`` flags."""
    plan = {}
    for key in ids:
        rng = rng_for(seed, "voc", "objects", key)
        difficult = forced.get(key) or list(rng.random(int(rng.integers(1, max_objects + 1))) < 0.15)
        classes = rng.choice(len(formats.VOC_CLASSES), size=len(difficult), replace=False)
        plan[key] = [_VocObject(formats.VOC_CLASSES[c], bool(d)) for c, d in zip(classes, difficult)]
    return plan


def _voc_flags(objects: list[_VocObject]) -> list[int]:
    flags = []
    for name in formats.VOC_CLASSES:
        mine = [o.difficult for o in objects if o.name == name]
        flags.append(-1 if not mine else 0 if all(mine) else 1)
    return flags


def write_synthetic_voc2007(
    out: str | Path,
    *,
    train: int = 40,
    val: int = 40,
    test: int = 60,
    max_objects: int = 3,
    size: int = 256,
    seed: int = 0,
    corrupt: int = 0,
) -> TransferSynthInfo:
    """Write synthetic ``VOCtrainval_06-Nov-2007.tar`` and ``VOCtest_06-Nov-2007.tar`` into ``out``.

    ``train``, ``val``, ``test`` are image counts. The first image of each split holds a difficult object (a 0
    flag) and the second of each split only difficult ones (label -1), whatever the seed.
    """
    if not 1 <= max_objects <= len(formats.VOC_CLASSES):
        raise ValueError(f"max_objects must be in 1..{len(formats.VOC_CLASSES)}, got {max_objects}")
    _check(size, train=train, val=val, test=test)
    if min(train, val, test) < 2:
        raise ValueError("train, val and test must each be >= 2 (each split holds difficult-only entries)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Real ids interleave trainval and test (000001 test, 000002 train, ...).
    ids = [f"{n:06d}" for n in range(1, train + val + test + 1)]
    order = rng_for(seed, "voc", "splits").permutation(len(ids))
    bounds = np.cumsum([0, train, val, test])
    splits = {s: sorted(ids[i] for i in order[lo:hi]) for s, lo, hi in zip(formats.VOC2007_SPLITS, bounds, bounds[1:])}
    forced = {}
    for keys in splits.values():
        forced[keys[0]] = [False, True]  # one present class and one difficult-only class
        forced[keys[1]] = [True]  # nothing but a difficult object: no class with flag 1
    plan = _voc_plan(seed, ids, max_objects, forced)
    flags = {key: _voc_flags(objects) for key, objects in plan.items()}
    bad = _corrupt_keys(seed, "voc2007", splits["train"], corrupt)
    styles = _class_styles(list(formats.VOC_CLASSES))

    image_sets = {**splits, "trainval": sorted(splits["train"] + splits["val"])}
    tars = {formats.VOC2007_TRAINVAL_TAR: ("trainval", "train", "val"), formats.VOC2007_TEST_TAR: ("test",)}
    root = formats.VOC2007_ROOT
    for tar_name, sets in tars.items():
        with open(out / tar_name, "wb") as raw, tar_writer(raw) as tar:
            for folder in ("VOCdevkit", root, f"{root}/Annotations", f"{root}/ImageSets", f"{root}/ImageSets/Main",
                           f"{root}/JPEGImages"):
                tar_add_dir(tar, folder)
            for key in image_sets[sets[0]]:  # trainval, or test
                img, boxes = _voc_scene(seed, key, plan[key], styles, size)
                tar_add(tar, f"{root}/JPEGImages/{key}.jpg", file_bytes(img, bad.get(key, "normal")))
                tar_add(tar, f"{root}/Annotations/{key}.xml", _voc_annotation(key, img.size, plan[key], boxes))
            for s in sets:
                keys = image_sets[s]
                tar_add(tar, f"{root}/ImageSets/Main/{s}.txt", "".join(f"{k}\n" for k in keys).encode())
                for c, name in enumerate(formats.VOC_CLASSES):
                    text = "".join(f"{k} {flags[k][c]:2d}\n" for k in keys)
                    tar_add(tar, f"{root}/ImageSets/Main/{name}_{s}.txt", text.encode())

    labels = {k: next((c for c, f in enumerate(v) if f == 1), -1) for k, v in flags.items()}
    return _finish(out, TransferSynthInfo(
        dataset="voc2007", seed=seed, size=size, files=list(tars), classes=list(formats.VOC_CLASSES),
        splits=splits, labels=labels, flags=flags, bad=bad, styles=_describe(styles),
    ))


def _voc_annotation(key: str, size: tuple[int, int], objects: list[_VocObject], boxes: list) -> bytes:
    # VOC boxes are 1-based and inclusive
    parts = [_VOC_OBJECT.format(name=o.name, difficult=int(o.difficult), x0=x0 + 1, y0=y0 + 1, x1=x1 + 1, y1=y1 + 1)
             for o, (x0, y0, x1, y1) in zip(objects, boxes)]
    return _VOC_ANNOTATION.format(key=key, width=size[0], height=size[1], objects="".join(parts)).encode()


#: dataset -> writer(out, **sizes) -> TransferSynthInfo
WRITERS: dict[str, Callable[..., TransferSynthInfo]] = {
    "caltech101": write_synthetic_caltech101,
    "flowers102": write_synthetic_flowers102,
    "voc2007": write_synthetic_voc2007,
}
