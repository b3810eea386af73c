"""Find every image of an ImageNet distribution, read in place, as an index of byte ranges.

Three layouts are recognised, local or on S3:

``official``
    ``ILSVRC2012_img_train.tar`` (a tar of 1000 per-class ``<wnid>.tar``), ``ILSVRC2012_img_val.tar`` (flat
    ``ILSVRC2012_val_%08d.JPEG``) and ``ILSVRC2012_devkit_t12.tar.gz`` (``data/meta.mat`` and the validation
    ground truth, in ILSVRC2012_ID terms).
``kaggle``
    ``ILSVRC/Data/CLS-LOC/{train/<wnid>,val}``, ``LOC_synset_mapping.txt`` and ``LOC_val_solution.csv``.
``imagefolder``
    ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

Nothing is extracted: the index holds, for each image, the file (URI) that contains it and the byte range of the
image inside it, so that Ray tasks can read images in parallel with local seeks or S3 range requests. The train
tar (138 GB in the real world) is indexed one inner class tar per Ray task.

Labels follow the torchvision / Kaggle / Caffe convention: the index of the wnid in **sorted wnid order**. The
devkit's ILSVRC2012_ID order is mapped through ``meta.mat``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import formats, storage

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
LAYOUTS = ("official", "kaggle", "imagefolder")

#: Columns of the index, one row per source image.
INDEX_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("key", pa.string()),  # file name without extension
        ("wnid", pa.string()),
        ("label", pa.int32()),  # index of wnid in sorted wnid order
        ("uri", pa.string()),  # file holding the image bytes
        ("offset", pa.int64()),  # first byte of the image inside that file
        ("size", pa.int64()),  # number of bytes
    ]
)


class IngestError(ValueError):
    """The source does not look like a supported distribution, or contradicts itself."""


class UnsafeArchiveError(IngestError):
    """An archive member with an absolute or parent-relative name, or a link: refused, never read."""


#: How ImageNet labels are numbered (the manifest's ``label_convention``).
IMAGENET_LABELS = "index of the wnid in sorted wnid order (torchvision/Kaggle/Caffe)"


@dataclass
class SourceIndex:
    """Everything the preprocessing needs to know about a source dataset.

    ImageNet fills the first fields only. Other datasets (``pipelines.transfer_data``) name themselves, their
    splits, and any per-image columns beyond ``INDEX_SCHEMA`` that ``table`` carries into the shards as they are
    (VOC's ``labels`` and ``difficult``).
    """

    layout: str
    source: str
    wnids: list[str]  # class names; label = position
    words: dict[str, str] = field(default_factory=dict)
    table: pa.Table = field(default_factory=lambda: INDEX_SCHEMA.empty_table())
    #: files the index was built from, with their sizes, to tell whether a cached index is still valid
    files: dict[str, int] = field(default_factory=dict)
    dataset: str = "imagenet"
    #: the splits of the prepared dataset, in manifest order; each may be empty
    splits: tuple[str, ...] = SPLITS
    #: columns of ``table`` after ``INDEX_SCHEMA``, copied into every shard
    extra_fields: tuple[pa.Field, ...] = ()
    #: several classes per image (``labels``), ``label`` being the first of them
    multi_label: bool = False
    label_convention: str = IMAGENET_LABELS
    #: class folders of the source that hold no images and so are no class (Caltech-101), named in the manifest
    empty_classes: tuple[str, ...] = ()

    def split(self, name: str) -> pa.Table:
        import pyarrow.compute as pc

        return self.table.filter(pc.equal(self.table["split"], name))


# --- reading byte ranges ----------------------------------------------------------------------------------------


class RangeReader(io.RawIOBase):
    """A seekable, read-only view of bytes ``[start, start+length)`` of a file on any ``pyarrow.fs``.

    Reads are served from one cached block of ``block_size`` bytes. Walking a tar's headers on S3 then costs one
    range request per block instead of one per member (a 110 KB average member needs about one request per 70
    headers with 8 MiB blocks); on local disks a small block makes it a plain seek-and-read.
    """

    def __init__(self, f: pafs.NativeFile, start: int, length: int, block_size: int) -> None:
        self._f, self._start, self._length, self._block_size = f, start, length, block_size
        self._pos = 0
        self._block_start, self._block = 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        out = memoryview(buffer)
        done = 0
        while done < n:
            rel = self._pos - self._block_start
            if not 0 <= rel < len(self._block):
                self._block_start = self._pos
                want = min(max(self._block_size, n - done), self._length - self._pos)
                self._block = self._f.read_at(want, self._start + self._pos)
                if not self._block:
                    break
                rel = 0
            take = min(n - done, len(self._block) - rel)
            out[done : done + take] = self._block[rel : rel + take]
            done += take
            self._pos += take
        return done


def _block_size(uri: str, *, headers_only: bool) -> int:
    if not storage.is_s3(uri):
        return 64 << 10
    # The outer train tar has 1000 members of ~140 MB each: fetch headers only. Inner tars are dense with headers.
    return 64 << 10 if headers_only else 8 << 20


_NOT_OFFICIAL = "The archive is not an official distribution file: re-download it and check its MD5."


def check_member(archive: str, name: str, *, link_or_device: bool = False) -> None:
    """Refuse an archive member (tar or zip) with an absolute or parent-relative name, or a link/device member."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(
            f"{archive}: refusing unsafe member name {name!r} (absolute or containing '..'). {_NOT_OFFICIAL}"
        )
    if link_or_device:
        raise UnsafeArchiveError(f"{archive}: refusing link or device member {name!r}. {_NOT_OFFICIAL}")


def _check_member(archive: str, member: tarfile.TarInfo) -> None:
    check_member(archive, member.name, link_or_device=member.issym() or member.islnk() or member.isdev())


def iter_tar(uri: str, *, start: int = 0, length: int | None = None, headers_only: bool = False,
             archive: str | None = None, directories: list[str] | None = None):
    """Yield ``(name, absolute_offset, size)`` of the regular files of the tar at ``uri`` (or at a byte range of
    it, for a tar inside a tar), validating every member name. Errors name ``archive`` (default ``uri``): the
    file the user has, where ``uri`` is a decompressed copy of it. Directory members' names are appended to
    ``directories`` when given (an empty folder has no file to show it)."""
    archive = archive or uri
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        total = f.size() if length is None else length
        reader = io.BufferedReader(RangeReader(f, start, total, _block_size(uri, headers_only=headers_only)), 512)
        try:
            with tarfile.open(fileobj=reader, mode="r:") as tar:
                for member in tar:
                    _check_member(archive, member)
                    if member.isfile():
                        yield member.name, start + member.offset_data, member.size
                    elif member.isdir() and directories is not None:
                        directories.append(member.name)
                # tarfile ends its iteration quietly at a damaged or cut header after the first one: the archive
                # must go on with its end-of-archive marker (a zero block) exactly there
                reader.seek(tar.offset)
                end = reader.read(512)
                if len(end) < 512 or end.strip(b"\0"):
                    raise IngestError(
                        f"{archive}: truncated or damaged at byte {start + tar.offset} (a tar header or the end-of-"
                        f"archive marker is missing or invalid there, {total - tar.offset} bytes before the end); "
                        "re-download it and check its MD5"
                    )
        except tarfile.ReadError as e:
            raise IngestError(f"{archive}: not a readable tar archive ({e}); re-download it and check its MD5") from None


# --- layout detection -------------------------------------------------------------------------------------------


def detect_layout(source: str) -> str:
    """``official``, ``kaggle`` or ``imagefolder``, from the files present at ``source``."""
    fs, root = storage.filesystem(source)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise IngestError(f"{source} does not exist: pass the folder (or s3:// prefix) holding the dataset")

    def present(*rel: str) -> bool:
        return all(fs.get_file_info(posixpath.join(root, r)).type != pafs.FileType.NotFound for r in rel)

    if present(formats.IMAGENET_DEVKIT) and (present(formats.IMAGENET_TRAIN_TAR) or present(formats.IMAGENET_VAL_TAR)):
        return "official"
    if present(formats.KAGGLE_TRAIN_DIR, formats.KAGGLE_SYNSET_MAPPING):
        return "kaggle"
    if present("train"):
        return "imagefolder"
    raise IngestError(
        f"{source}: no ImageNet layout found. Expected one of: the official files "
        f"({', '.join(formats.IMAGENET_FILES)}); the Kaggle layout ({formats.KAGGLE_TRAIN_DIR}/ and "
        f"{formats.KAGGLE_SYNSET_MAPPING}); or an ImageFolder layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)."
    )


# --- official ILSVRC-2012 files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Devkit:
    wnids: list[str]  # sorted leaf wnids
    words: dict[str, str]
    id_to_wnid: dict[int, str]  # ILSVRC2012_ID -> wnid
    val_ground_truth: list[int]  # ILSVRC2012_ID of val image i+1


def read_devkit(uri: str) -> Devkit:
    """Parse ``meta.mat`` (leaf synsets: ``num_children == 0``) and the validation ground truth."""
    import scipy.io

    data = storage.read_bytes(uri)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for m in members.values():
                _check_member(uri, m)

            def member(suffix: str) -> bytes:
                for name, m in members.items():
                    if name.endswith(suffix) and m.isfile():
                        f = tar.extractfile(m)
                        assert f is not None
                        return f.read()
                raise IngestError(f"{uri}: no member ending in {suffix!r}; is this ILSVRC2012_devkit_t12.tar.gz?")

            meta = member("data/meta.mat")
            truth = member("data/ILSVRC2012_validation_ground_truth.txt")
    except tarfile.ReadError as e:
        raise IngestError(f"{uri}: not a readable .tar.gz ({e}); re-download it and check its MD5") from None

    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        id_to_wnid, words = {}, {}
        for s in synsets.ravel():
            if int(s["num_children"]) == 0:
                wnid = str(s["WNID"])
                id_to_wnid[int(s["ILSVRC2012_ID"])] = wnid
                words[wnid] = str(s["words"])
    except (ValueError, TypeError, KeyError, IndexError, OSError, scipy.io.matlab.MatReadError) as e:
        raise IngestError(f"{uri}: data/meta.mat is not the devkit's synset table ({type(e).__name__}: {e}); "
                          "re-download it and check its MD5") from None
    try:
        ground_truth = [int(line) for line in truth.decode().split()]
    except (ValueError, UnicodeDecodeError) as e:
        raise IngestError(f"{uri}: data/ILSVRC2012_validation_ground_truth.txt is not one ILSVRC2012_ID per line "
                          f"({e}); re-download it and check its MD5") from None
    return Devkit(sorted(id_to_wnid.values()), words, id_to_wnid, ground_truth)


def _check_count(archive: str, found: int, expected: int, what: str) -> None:
    if found != expected:
        raise IngestError(f"{archive}: {found} {what}, the official archive has {expected}: it is truncated or not "
                          "the official file; re-download it and check its MD5")


def _index_inner_tar(train_tar: str, name: str, offset: int, size: int, labels: dict[str, int]) -> pa.Table:
    wnid = posixpath.splitext(posixpath.basename(name))[0]
    if wnid not in labels:
        raise IngestError(f"{train_tar}: member {name!r} is not a class listed in the devkit's meta.mat")
    rows = []
    for member, moff, msize in iter_tar(train_tar, start=offset, length=size):
        key = posixpath.splitext(posixpath.basename(member))[0]
        rows.append(("train", key, wnid, labels[wnid], train_tar, moff, msize))
    return rows_table(rows)


def rows_table(rows: list[tuple]) -> pa.Table:
    """An index table from ``(split, key, wnid, label, uri, offset, size)`` tuples."""
    columns = list(zip(*rows)) if rows else [[] for _ in INDEX_SCHEMA]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, INDEX_SCHEMA)], schema=INDEX_SCHEMA)


def _val_key_number(key: str, where: str) -> int:
    try:
        return int(key.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise IngestError(f"{where}: unexpected validation file name {key!r} (want ILSVRC2012_val_%08d)") from None


def index_official(source: str, *, parallel: bool = True) -> SourceIndex:
    devkit_uri = storage.join(source, formats.IMAGENET_DEVKIT)
    devkit = read_devkit(devkit_uri)
    labels = {w: i for i, w in enumerate(devkit.wnids)}
    tables, files = [], {}
    files[devkit_uri] = file_size(devkit_uri)

    train_tar = storage.join(source, formats.IMAGENET_TRAIN_TAR)
    if storage.exists(train_tar):
        files[train_tar] = file_size(train_tar)
        inner = list(iter_tar(train_tar, headers_only=True))
        if len(devkit.wnids) == formats.IMAGENET_NUM_CLASSES:  # the real devkit: the real archive's counts
            _check_count(train_tar, len(inner), formats.IMAGENET_NUM_CLASSES, "class archives")
        log.info("indexing %d class archives in %s", len(inner), train_tar)
        if parallel and len(inner) > 1:
            import ray

            task = ray.remote(num_cpus=0.25, runtime_env=storage.worker_env())(_index_inner_tar)
            tables += ray.get([task.remote(train_tar, n, o, s, labels) for n, o, s in inner])
        else:
            tables += [_index_inner_tar(train_tar, n, o, s, labels) for n, o, s in inner]

    val_tar = storage.join(source, formats.IMAGENET_VAL_TAR)
    if storage.exists(val_tar):
        files[val_tar] = file_size(val_tar)
        rows = []
        for name, off, size in iter_tar(val_tar):
            key = posixpath.splitext(posixpath.basename(name))[0]
            number = _val_key_number(key, val_tar)
            if not 1 <= number <= len(devkit.val_ground_truth):
                raise IngestError(f"{val_tar}: {name} has no entry in the devkit's validation ground truth")
            wnid = devkit.id_to_wnid.get(devkit.val_ground_truth[number - 1])
            if wnid is None:
                raise IngestError(f"{devkit_uri}: ground truth of {key} is not a leaf ILSVRC2012_ID")
            rows.append(("val", key, wnid, labels[wnid], val_tar, off, size))
        if len(devkit.val_ground_truth) == formats.IMAGENET_NUM_VAL:
            _check_count(val_tar, len(rows), formats.IMAGENET_NUM_VAL, "validation images")
        tables.append(rows_table(rows))
    return SourceIndex("official", source, devkit.wnids, devkit.words, concat_index(tables), files)


def file_size(uri: str) -> int:
    """Size in bytes of a local or S3 file."""
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).size


def concat_index(tables: list[pa.Table]) -> pa.Table:
    """One index table, rows ordered by split and key."""
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    return table.sort_by([("split", "ascending"), ("key", "ascending")])


# --- folder layouts ---------------------------------------------------------------------------------------------


def is_image(path: str) -> bool:
    """Whether a file name has an image ending (``formats.IMAGE_SUFFIXES``)."""
    return path.lower().endswith(formats.IMAGE_SUFFIXES)


def image_key(path: str) -> str:
    """The file name without folder and extension: the ``key`` of an image."""
    return posixpath.splitext(posixpath.basename(path))[0]


def _class_folder_rows(split: str, root: str, labels: dict[str, int], files: list[tuple[str, int]]) -> list[tuple]:
    rows = []
    for rel, size in files:
        rel = rel.replace("\\", "/")
        if not is_image(rel):
            continue
        parts = rel.split("/")
        if len(parts) != 2:
            raise IngestError(f"{storage.join(root, rel)}: expected <wnid>/<image> below {root}")
        wnid = parts[0]
        if wnid not in labels:
            raise IngestError(f"{storage.join(root, rel)}: class folder {wnid!r} is not one of the training classes")
        rows.append((split, image_key(rel), wnid, labels[wnid], storage.join(root, rel), 0, size))
    return rows


def index_kaggle(source: str) -> SourceIndex:
    mapping_uri = storage.join(source, formats.KAGGLE_SYNSET_MAPPING)
    words = {}
    for line in storage.read_bytes(mapping_uri).decode().splitlines():
        if line.strip():
            wnid, _, text = line.strip().partition(" ")
            words[wnid] = text
    wnids = sorted(words)
    labels = {w: i for i, w in enumerate(wnids)}
    train_root = storage.join(source, formats.KAGGLE_TRAIN_DIR)
    rows = _class_folder_rows("train", train_root, labels, storage.list_files(train_root))

    val_root = storage.join(source, formats.KAGGLE_VAL_DIR)
    val_files = storage.list_files(val_root, recursive=False)
    if val_files:
        solution_uri = storage.join(source, formats.KAGGLE_VAL_SOLUTION)
        if not storage.exists(solution_uri):
            raise IngestError(f"{solution_uri} is missing: the Kaggle layout needs it to label {val_root}")
        truth = {}
        for rec in csv.DictReader(io.StringIO(storage.read_bytes(solution_uri).decode())):
            truth[rec["ImageId"]] = rec["PredictionString"].split()[0]
        for rel, size in val_files:
            if not is_image(rel):
                continue
            key = image_key(rel)
            wnid = truth.get(key)
            if wnid is None:
                raise IngestError(f"{solution_uri}: no label for {key}")
            rows.append(("val", key, wnid, labels[wnid], storage.join(val_root, rel), 0, size))
    return SourceIndex("kaggle", source, wnids, words, concat_index([rows_table(rows)]), {mapping_uri: file_size(mapping_uri)})


def index_imagefolder(source: str) -> SourceIndex:
    train_root = storage.join(source, "train")
    train_files = storage.list_files(train_root)
    wnids = sorted({f.replace("\\", "/").split("/")[0] for f, _ in train_files if "/" in f.replace("\\", "/")})
    if not wnids:
        raise IngestError(f"{train_root}: no class folders (expected train/<wnid>/*.JPEG)")
    labels = {w: i for i, w in enumerate(wnids)}
    rows = _class_folder_rows("train", train_root, labels, train_files)
    val_root = storage.join(source, "val")
    rows += _class_folder_rows("val", val_root, labels, storage.list_files(val_root))
    return SourceIndex("imagefolder", source, wnids, {}, concat_index([rows_table(rows)]), {})


def index_imagenet(source: str, *, layout: str | None = None, parallel: bool = True) -> SourceIndex:
    """Index an ImageNet source in any supported layout (auto-detected unless ``layout`` is given)."""
    layout = layout or detect_layout(source)
    if layout == "official":
        index = index_official(source, parallel=parallel)
    elif layout == "kaggle":
        index = index_kaggle(source)
    elif layout == "imagefolder":
        index = index_imagefolder(source)
    else:
        raise IngestError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if index.table.num_rows == 0:
        raise IngestError(f"{source}: no images found in the {layout} layout")
    log.info("%s (%s): %d images, %d classes", source, layout, index.table.num_rows, len(index.wnids))
    return index


def read_range(uri: str, offset: int, size: int, _cache: dict | None = None) -> bytes:
    """The bytes of one indexed image: a local ``pread`` or an S3 range request.

    With ``_cache`` (a dict the caller closes), archives (``.tar``) stay open between calls: a shard reads many of
    their members. Single-image files are opened and closed per read, so a shard of an ImageFolder never holds
    thousands of descriptors. Local files are read with ``os.pread`` (no pyarrow file object per image).
    """
    keep = _cache is not None and uri.endswith(".tar")
    f = _cache.get(uri) if keep else None
    if f is None:
        if storage.is_s3(uri):
            fs, path = storage.filesystem(uri)
            f = fs.open_input_file(path)
        else:
            f = open(storage.local_path(uri), "rb", buffering=0)
        if keep:
            _cache[uri] = f
        else:
            with f:
                return _read_at(f, offset, size)
    return _read_at(f, offset, size)


def _read_at(f: Any, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` (fewer at the end of a truncated file: the decoder then names the damage)."""
    if isinstance(f, io.FileIO):
        return os.pread(f.fileno(), size, offset)
    return f.read_at(size, offset)
