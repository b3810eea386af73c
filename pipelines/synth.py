"""A tiny, learnable, deterministic ImageNet written in the exact formats of the official distributions.

Smoke runs and the ingest tests need data that looks like ILSVRC-2012 to the code that reads it, without the
150 GB download. This module writes such a dataset in one of three layouts:

``official``
    The three files from image-net.org: ``ILSVRC2012_img_train.tar`` (a tar of per-class tars, each holding
    flat ``<wnid>_<n>.JPEG`` files), ``ILSVRC2012_img_val.tar`` (flat ``ILSVRC2012_val_%08d.JPEG``) and
    ``ILSVRC2012_devkit_t12.tar.gz`` (``meta.mat`` with the synset struct array, leaf IDs deliberately *not*
    in sorted-wnid order, a few non-leaf synsets, and the validation ground truth as ILSVRC2012_IDs).
``kaggle``
    The "ImageNet Object Localization Challenge" copy: ``LOC_synset_mapping.txt``, ``LOC_val_solution.csv``,
    ``LOC_train_solution.csv`` and ``ILSVRC/Data/CLS-LOC/{train/<wnid>,val,test}/``, the test images being
    distractors that ingest must skip.
``imagefolder``
    ``train/<wnid>/<key>.JPEG`` and ``val/<wnid>/<key>.JPEG``, the torchvision ``ImageFolder`` convention.

For the same parameters every layout holds the same keys with byte-identical files and the same labels, so
ingest results can be compared row by row across layouts. Every image is a pure function of ``(seed, key)``
(and the class set and quirk plan those parameters imply), never of the layout or the order of generation.

Images are learnable yet not trivial: each class is one combination of shape, colour and fill, drawn at a
random position, scale and rotation over a low-saturation textured background with per-image noise, at
ImageNet-like sizes and aspect ratios (mostly 4:3, both orientations). A small CNN separates the classes in a
few CPU minutes even through resize, random crops, flips and colour jitter.

With ``quirks=True`` the dataset also reproduces what breaks naive readers of the real archive: the PNG named
``n02105855_2933.JPEG``, CMYK JPEGs under their real names, grayscale JPEGs, very large and very small images,
and undecodable files (empty and truncated) that keep their names and labels. :class:`SynthInfo` records
where each of them is, so tests can check that ingest handles every one.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.formats import (
    CMYK_JPEGS,
    DEVKIT_META,
    DEVKIT_VAL_GROUND_TRUTH,
    IMAGENET_DEVKIT,
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
from pipelines.synth_render import (  # noqa: F401 - SHAPES, COLOURS, MAX_CLASSES re-exported (__all__)
    COLOURS, MAX_CLASSES, SHAPES, Style, class_style, encode, mat_bytes, mat_uint, rng_for, tar_add, tar_add_dir,
    tar_writer)
from pipelines.synth_transfer import WRITERS

__all__ = ["LAYOUTS", "SHAPES", "COLOURS", "MAX_CLASSES", "SynthInfo", "write_synthetic", "write_synthetic_imagenet"]

#: Datasets :func:`write_synthetic` writes; the transfer ones are in ``pipelines.synth_transfer``.
DATASETS = ("imagenet", "caltech101", "flowers102", "voc2007")

LAYOUTS = ("official", "kaggle", "imagefolder")




#: Class and file number of the PNG with a .JPEG name.
PNG_WNID, PNG_NUMBER = PNG_DISGUISED_AS_JPEG.removesuffix(".JPEG").split("_")
#: The CMYK entries whose classes the quirky synthetic set always contains.
CMYK_CHOSEN = CMYK_JPEGS[:2]
#: Real words of the real wnids in a quirky class set, so meta.mat and LOC_synset_mapping.txt read like the real ones.
REAL_WORDS = {
    "n02105855": "Shetland sheepdog, Shetland sheep dog, Shetland",
    "n01739381": "vine snake",
    "n02077923": "sea lion",
}

#: Non-leaf synsets of meta.mat (real WordNet roots); ingest must drop them because num_children > 0.
NON_LEAF_SYNSETS = (
    ("n00001740", "entity", "that which is perceived or known or inferred to have its own distinct existence"),
    ("n00001930", "physical entity", "an entity that has physical existence"),
    ("n00002137", "abstraction, abstract entity", "a general concept formed by extracting common features"),
)



KAGGLE_TEST_DIR = "ILSVRC/Data/CLS-LOC/test"
KAGGLE_TEST_NAME_FORMAT = "ILSVRC2012_test_{:08d}.JPEG"
KAGGLE_NUM_TEST = 2

#: Train-set quirks placed on ordinary keys (the PNG and CMYK files have fixed names instead), and val quirks.
TRAIN_QUIRK_ROLES = ("empty", "truncated", "grayscale", "grayscale", "large", "tiny")
VAL_QUIRK_ROLES = ("truncated", "grayscale", "large", "tiny")


@dataclass
class SynthInfo:
    """What a synthetic dataset contains; written to ``<out>/synth_info.json``.

    Keys are file names without extension (``n01440764_10026``, ``ILSVRC2012_val_00000001``).
    """

    layout: str
    seed: int
    size: int
    #: Class wnids in sorted order; a label is an index into this list.
    wnids: list[str]
    #: wnid -> comma-separated words, as in meta.mat and LOC_synset_mapping.txt.
    words: dict[str, str]
    #: wnid -> ILSVRC2012_ID (1-based, the devkit's order, which differs from sorted order).
    ilsvrc_ids: dict[str, int]
    #: (key, wnid) for every train file, undecodable ones included.
    train: list[tuple[str, str]]
    #: (key, wnid) for every val file, in file-number order.
    val: list[tuple[str, str]]
    #: key -> "empty" | "truncated": files that a decoder must reject.
    bad: dict[str, str] = field(default_factory=dict)
    #: "png" | "cmyk" | "grayscale" | "large" | "tiny" -> keys of decodable but unusual files.
    quirks: dict[str, list[str]] = field(default_factory=dict)
    #: wnid -> what its images show, e.g. "red circle (solid)", for debugging a model's confusions.
    styles: dict[str, str] = field(default_factory=dict)
    #: Paths (relative to the layout root) of image files that belong to neither train nor val.
    distractors: list[str] = field(default_factory=list)

    def label(self, wnid: str) -> int:
        """The integer label of ``wnid``: its index in sorted wnid order."""
        return self.wnids.index(wnid)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SynthInfo:
        data = json.loads(text)
        data["train"] = [tuple(pair) for pair in data["train"]]
        data["val"] = [tuple(pair) for pair in data["val"]]
        return cls(**data)


def write_synthetic(dataset: str, out: str | Path, **sizes: Any) -> Any:
    """Write the synthetic ``dataset`` (one of :data:`DATASETS`) into ``out``; ``sizes`` are the keyword
    arguments of its writer: :func:`write_synthetic_imagenet` (returns :class:`SynthInfo`) or
    ``pipelines.synth_transfer.write_synthetic_{caltech101,flowers102,voc2007}`` (``TransferSynthInfo``)."""
    if dataset == "imagenet":
        return write_synthetic_imagenet(out, **sizes)
    if dataset not in WRITERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    return WRITERS[dataset](out, **sizes)


def write_synthetic_imagenet(
    out: str | Path,
    *,
    layout: str = "official",
    classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 10,
    size: int = 320,
    seed: int = 0,
    quirks: bool = True,
) -> SynthInfo:
    """Write a synthetic ILSVRC-2012 in ``layout`` directly into ``out`` and return what it contains.

    ``size`` is the typical longer side of an image in pixels. With ``quirks`` the class set holds the real
    wnids that the archive's odd files belong to (so ``classes`` must be at least 3) and some files are
    replaced by PNG, CMYK, grayscale, large, tiny, empty or truncated versions; the per-class counts are
    unchanged. ``out/synth_info.json`` receives the returned :class:`SynthInfo`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in 1..{MAX_CLASSES}, got {classes}")
    if quirks and classes < 3:
        raise ValueError("quirks=True needs classes >= 3 (the PNG class and two CMYK classes are real wnids)")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("train_per_class and val_per_class must be >= 1")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")

    plan = _plan(classes, train_per_class, val_per_class, size, seed, quirks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = {"official": _write_official, "kaggle": _write_kaggle, "imagefolder": _write_imagefolder}[layout]
    distractors = writer(out, plan)

    info = SynthInfo(
        layout=layout,
        seed=seed,
        size=size,
        wnids=plan.wnids,
        words=plan.words,
        ilsvrc_ids=plan.ilsvrc_ids,
        train=plan.train,
        val=plan.val,
        bad={k: r for k, r in plan.roles.items() if r in ("empty", "truncated")},
        quirks={q: sorted(k for k, r in plan.roles.items() if r == q)
                for q in ("png", "cmyk", "grayscale", "large", "tiny")},
        styles={w: f"{s.colour} {s.shape} ({s.fill})" for w, s in plan.styles.items()},
        distractors=distractors,
    )
    (out / "synth_info.json").write_text(info.to_json())
    return info


# --- The plan: classes, keys, labels and quirk roles ------------------------------------------------------------




@dataclass
class _Plan:
    seed: int
    size: int
    wnids: list[str]
    words: dict[str, str]
    glosses: dict[str, str]
    ilsvrc_ids: dict[str, int]
    styles: dict[str, Style]
    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    #: key -> quirk role; keys absent here are ordinary RGB JPEGs.
    roles: dict[str, str]
    train_per_class: int

    def train_by_class(self) -> dict[str, list[str]]:
        by_class: dict[str, list[str]] = {w: [] for w in self.wnids}
        for key, wnid in self.train:
            by_class[wnid].append(key)
        return by_class

    def encode(self, key: str, wnid: str) -> tuple[bytes, list[tuple[int, int, int, int]]]:
        """The file bytes of ``key`` and the boxes of the objects drawn in it."""
        return encode(self.seed, key, self.styles[wnid], self.roles.get(key, "normal"), self.size)






def _fake_wnids(seed: int, count: int, taken: set[str]) -> list[str]:
    # Same form and range as real wnids (n01440764 .. n15075141); drawn one by one so that a larger class
    # count extends a smaller one.
    rng = rng_for(seed, "wnids")
    fakes: list[str] = []
    while len(fakes) < count:
        wnid = f"n{int(rng.integers(1_000_000, 15_100_000)):08d}"
        if wnid not in taken:
            taken.add(wnid)
            fakes.append(wnid)
    return fakes


def _plan(classes: int, train_per_class: int, val_per_class: int, size: int, seed: int, quirks: bool) -> _Plan:
    fixed_names: dict[str, list[int]] = {}  # wnid -> file numbers that must exist with their real names
    fixed_roles: dict[str, str] = {}
    if quirks:
        fixed_names[PNG_WNID] = [int(PNG_NUMBER)]
        fixed_roles[f"{PNG_WNID}_{PNG_NUMBER}"] = "png"
        for name in CMYK_CHOSEN:
            wnid, number = name.removesuffix(".JPEG").split("_")
            fixed_names.setdefault(wnid, []).append(int(number))
            fixed_roles[f"{wnid}_{number}"] = "cmyk"
    reserved = {w for w, _, _ in NON_LEAF_SYNSETS} | {n.split("_")[0] for n in (*CMYK_JPEGS, PNG_DISGUISED_AS_JPEG)}
    wnids = sorted([*fixed_names, *_fake_wnids(seed, classes - len(fixed_names), reserved)])
    styles = {w: class_style(i) for i, w in enumerate(wnids)}
    words = {w: REAL_WORDS.get(w, f"{s.colour} {s.shape}, synthetic {s.shape}") for w, s in styles.items()}
    glosses = {w: f"synthetic class: a {s.colour} {s.shape} ({s.fill}) on a textured background"
               for w, s in styles.items()}

    # The devkit numbers classes in WordNet order, not sorted-wnid order; a shuffle makes any code that
    # confuses the two fail loudly.
    order = rng_for(seed, "ilsvrc-ids").permutation(classes)
    if classes > 1 and np.array_equal(order, np.arange(classes)):
        order = np.roll(order, 1)
    ilsvrc_ids = {wnids[i]: rank + 1 for rank, i in enumerate(order)}

    train: list[tuple[str, str]] = []
    for wnid in wnids:
        # Real file numbers are sparse (n01440764_10026, n01440764_10027, n01440764_10029, ...).
        rng = rng_for(seed, "train-numbers", wnid)
        pool = np.arange(1, max(30_000, 4 * train_per_class) + 1)
        required = fixed_names.get(wnid, [])
        drawn = [int(n) for n in rng.choice(pool, size=train_per_class + len(required), replace=False)]
        numbers = list(dict.fromkeys([*required, *drawn]))[:train_per_class]
        train += [(f"{wnid}_{n}", wnid) for n in sorted(numbers)]

    # Real val files are numbered in random class order.
    val_wnids = [w for w in wnids for _ in range(val_per_class)]
    val_order = rng_for(seed, "val-order").permutation(len(val_wnids))
    val = [(VAL_NAME_FORMAT.format(i + 1).removesuffix(".JPEG"), val_wnids[j]) for i, j in enumerate(val_order)]

    roles = dict(fixed_roles) if quirks else {}
    if quirks:
        roles.update(_train_quirk_roles(seed, train, fixed_roles))
        if len(val) < len(VAL_QUIRK_ROLES):
            raise ValueError(f"quirks=True needs at least {len(VAL_QUIRK_ROLES)} val images in total")
        picks = rng_for(seed, "val-quirks").permutation(len(val))[: len(VAL_QUIRK_ROLES)]
        roles.update({val[i][0]: role for i, role in zip(picks, VAL_QUIRK_ROLES)})

    return _Plan(seed, size, wnids, words, glosses, ilsvrc_ids, styles, train, val, roles, train_per_class)


def _train_quirk_roles(seed: int, train: list[tuple[str, str]], fixed: dict[str, str]) -> dict[str, str]:
    # Deals the quirk roles round-robin over classes, so that they land in different classes when possible.
    rng = rng_for(seed, "train-quirks")
    by_class: dict[str, list[str]] = {}
    for key, wnid in train:
        if key not in fixed:
            by_class.setdefault(wnid, []).append(key)
    columns = [list(rng.permutation(keys)) for keys in by_class.values()]
    columns = [columns[i] for i in rng.permutation(len(columns))]
    dealt = [str(col[row]) for row in range(max(map(len, columns), default=0)) for col in columns if row < len(col)]
    if len(dealt) < len(TRAIN_QUIRK_ROLES):
        raise ValueError(f"quirks=True needs at least {len(TRAIN_QUIRK_ROLES)} train images besides the "
                         f"{len(fixed)} PNG/CMYK files; raise train_per_class")
    return dict(zip(dealt, TRAIN_QUIRK_ROLES))


# --- Images --------------------------------------------------------------------------------------------------
























# --- Layouts -------------------------------------------------------------------------------------------------








def _write_official(out: Path, plan: _Plan) -> list[str]:
    with tarfile.open(out / IMAGENET_TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid, keys in plan.train_by_class().items():
            # Each class is a tar inside the tar; building one in memory at a time bounds memory by a class.
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w", format=tarfile.GNU_FORMAT) as inner:
                for key in keys:
                    tar_add(inner, f"{key}.JPEG", plan.encode(key, wnid)[0])
            tar_add(outer, f"{wnid}.tar", inner_buf.getvalue())

    with tarfile.open(out / IMAGENET_VAL_TAR, "w", format=tarfile.GNU_FORMAT) as val_tar:
        for key, wnid in plan.val:
            tar_add(val_tar, f"{key}.JPEG", plan.encode(key, wnid)[0])

    root = DEVKIT_META.split("/")[0]
    ground_truth = "".join(f"{plan.ilsvrc_ids[wnid]}\n" for _, wnid in plan.val).encode()
    readme = (
        "Synthetic ILSVRC2012 development kit, written by pipelines.synth for tests and smoke runs.\n"
        "data/meta.mat: synsets (ILSVRC2012_ID, WNID, words, gloss, num_children, children, wordnet_height,\n"
        "num_train_images); the classes are the synsets with num_children == 0.\n"
        "data/ILSVRC2012_validation_ground_truth.txt: ILSVRC2012_ID of val image i on line i.\n"
    ).encode()
    with open(out / IMAGENET_DEVKIT, "wb") as raw, tar_writer(raw, gz=True) as devkit:
        tar_add_dir(devkit, root)
        tar_add_dir(devkit, f"{root}/data")
        tar_add(devkit, f"{root}/readme.txt", readme)
        tar_add(devkit, DEVKIT_META, _meta_mat(plan))
        tar_add(devkit, DEVKIT_VAL_GROUND_TRUTH, ground_truth)
    return []




def _meta_mat(plan: _Plan) -> bytes:
    """meta.mat: a (N, 1) struct array ``synsets``, leaves (the classes) first by ILSVRC2012_ID."""
    k = len(plan.wnids)
    leaves = sorted(plan.wnids, key=plan.ilsvrc_ids.__getitem__)
    leaf_ids = [plan.ilsvrc_ids[w] for w in leaves]
    # entity -> {physical entity: odd leaf IDs, abstraction: even leaf IDs}
    groups = [leaf_ids[0::2], leaf_ids[1::2]]
    groups = [g for g in groups if g]
    parent_ids = [k + 2 + i for i in range(len(groups))]
    rows: list[dict[str, Any]] = []
    for wnid in leaves:
        rows.append(dict(id=plan.ilsvrc_ids[wnid], wnid=wnid, words=plan.words[wnid], gloss=plan.glosses[wnid],
                         children=[], height=0, images=plan.train_per_class))
    root_wnid, root_words, root_gloss = NON_LEAF_SYNSETS[0]
    rows.append(dict(id=k + 1, wnid=root_wnid, words=root_words, gloss=root_gloss, children=parent_ids,
                     height=2, images=plan.train_per_class * k))
    for pid, group, (wnid, words, gloss) in zip(parent_ids, groups, NON_LEAF_SYNSETS[1:]):
        rows.append(dict(id=pid, wnid=wnid, words=words, gloss=gloss, children=group, height=1,
                         images=plan.train_per_class * len(group)))

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = (mat_uint(row["id"]), row["wnid"], row["words"], row["gloss"], mat_uint(len(row["children"])),
                         mat_uint(row["children"]), mat_uint(row["height"]), mat_uint(row["images"]))
    return mat_bytes({"synsets": synsets})




def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _box_string(wnid: str, boxes: list[tuple[int, int, int, int]]) -> str:
    # Kaggle's PredictionString: "<wnid> x0 y0 x1 y1 " repeated, with the trailing space of the real files.
    return "".join(f"{wnid} {x0} {y0} {x1} {y1} " for x0, y0, x1, y1 in boxes)


def _write_kaggle(out: Path, plan: _Plan) -> list[str]:
    (out / KAGGLE_SYNSET_MAPPING).write_text("".join(f"{w} {plan.words[w]}\n" for w in plan.wnids))

    # Real solution files are in no particular order and cover only part of train; readers must not rely on
    # either.
    train_rows, val_rows = [], []
    for i, (key, wnid) in enumerate(plan.train):
        data, boxes = plan.encode(key, wnid)
        _write_file(out / KAGGLE_TRAIN_DIR / wnid / f"{key}.JPEG", data)
        if i % 2 == 0:
            train_rows.append((key, _box_string(wnid, boxes)))
    for key, wnid in plan.val:
        data, boxes = plan.encode(key, wnid)
        _write_file(out / KAGGLE_VAL_DIR / f"{key}.JPEG", data)
        val_rows.append((key, _box_string(wnid, boxes)))
    for name, rows, tag in ((KAGGLE_VAL_SOLUTION, val_rows, "val-csv"), (KAGGLE_TRAIN_SOLUTION, train_rows,
                                                                          "train-csv")):
        order = rng_for(plan.seed, tag).permutation(len(rows))
        with open(out / name, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["ImageId", "PredictionString"])
            writer.writerows(rows[i] for i in order)

    image_sets = out / "ILSVRC/ImageSets/CLS-LOC"
    image_sets.mkdir(parents=True, exist_ok=True)
    (image_sets / "train_cls.txt").write_text(
        "".join(f"{wnid}/{key} {i + 1}\n" for i, (key, wnid) in enumerate(plan.train)))
    (image_sets / "val.txt").write_text("".join(f"{key} {i + 1}\n" for i, (key, _) in enumerate(plan.val)))
    (out / "ILSVRC/Annotations/CLS-LOC").mkdir(parents=True, exist_ok=True)

    # Test images carry no labels; ingest must skip them rather than treat "test" as a split or a class.
    distractors = []
    for i in range(KAGGLE_NUM_TEST):
        name = KAGGLE_TEST_NAME_FORMAT.format(i + 1)
        wnid = plan.wnids[int(rng_for(plan.seed, "test", name).integers(len(plan.wnids)))]
        path = f"{KAGGLE_TEST_DIR}/{name}"
        _write_file(out / path, plan.encode(name.removesuffix(".JPEG"), wnid)[0])
        distractors.append(path)
    return distractors


def _write_imagefolder(out: Path, plan: _Plan) -> list[str]:
    for split, items in (("train", plan.train), ("val", plan.val)):
        for key, wnid in items:
            _write_file(out / split / wnid / f"{key}.JPEG", plan.encode(key, wnid)[0])
    return []
