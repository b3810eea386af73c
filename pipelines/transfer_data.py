"""The transfer datasets of the paper's successors, read from their official archives into a ``SourceIndex``.

The same index as ImageNet's (``pipelines.ingest``): one row per image naming the file that holds its bytes and
the byte range inside it, so ``pipelines.prepare`` preprocesses these datasets with the same Ray Data code.

``caltech101``
    ``101_ObjectCategories.tar.gz`` (``101_ObjectCategories/<category>/image_%04d.jpg``), or the newer
    ``caltech-101.zip`` that wraps it as ``caltech-101/101_ObjectCategories.tar.gz`` next to the annotations.
    The classes are the category folders in sorted order (case-sensitive, as ``sorted(os.listdir)`` in
    torchvision), ``BACKGROUND_Google`` excluded. One split, ``all``: the transfer protocol draws its per-class
    train/test images itself. Keys are ``<category>/image_0001``.
``flowers102``
    ``102flowers.tgz`` (``jpg/image_%05d.jpg``), ``imagelabels.mat`` (``labels``: the 1-based class of image
    ``i``) and ``setid.mat`` (``trnid``, ``valid``, ``tstid``: 1-based image numbers) -> splits ``train``,
    ``val``, ``test``. ``label`` is the official label minus 1; ``wnid`` is the official label as ``%03d``.
``voc2007``
    ``VOCtrainval_06-Nov-2007.tar`` and ``VOCtest_06-Nov-2007.tar``, both holding
    ``VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main}``. Splits ``train``, ``val``, ``test`` from
    ``ImageSets/Main/<split>.txt``; the 20 per-class flags from ``ImageSets/Main/<class>_<split>.txt`` (1 present,
    -1 absent, 0 difficult only) become the extra columns ``labels`` (1 where the flag is 1) and ``difficult``
    (where it is 0); ``label`` is the first present class or -1, ``wnid`` the present classes, comma-joined.

Plain tars are read in place. Gzip'd tars (Caltech's and Flowers' ``.tar.gz`` / ``.tgz``) cannot be read at a
byte offset, so each is decompressed **once**, streaming, into ``<cache>/<name>.tar`` (``prepare`` uses
``<out>/_cache``, local or S3, so Ray workers on other machines read it too) and indexed there; the zip is
opened in place and only its inner tar.gz is decompressed the same way. A stamp next to the copy records the
archive's size and modification time, so a rerun reuses the copy and a changed archive replaces it. Member names
are checked as for ImageNet: absolute or ``..`` names and links are refused, naming the archive.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import posixpath
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator

import pyarrow as pa

from pipelines import formats, ingest, storage
from pipelines.ingest import IngestError, SourceIndex

log = logging.getLogger(__name__)

__all__ = ["INDEXERS", "VOC_EXTRA_FIELDS", "decompressed_tar", "index_caltech101", "index_flowers102",
           "index_voc2007"]

#: VOC's per-image columns beyond the ImageNet ones, in ``formats.VOC_CLASSES`` order.
VOC_EXTRA_FIELDS = (pa.field("labels", pa.list_(pa.int8())), pa.field("difficult", pa.list_(pa.bool_())))


# --- gzip'd tars: one decompressed copy ---------------------------------------------------------------------------


def decompressed_tar(archive: str, cache: str | None = None, *, member: str | None = None) -> str:
    """The URI of an uncompressed copy of the gzip'd tar ``archive`` (or of the zip ``archive``'s ``member``).

    The copy is ``<cache>/<name>.tar``, made once and reused while the archive keeps its size and modification
    time. ``cache`` defaults to a folder under the system temporary directory (fine on one machine; ``prepare``
    passes ``<out>/_cache`` so that the workers of a cluster see it).
    """
    if cache is None:
        cache = os.path.join(tempfile.gettempdir(), "alexnet-cache", hashlib.sha256(archive.encode()).hexdigest()[:16])
    fs, path = storage.filesystem(archive)
    info = fs.get_file_info(path)
    name = posixpath.basename(member or archive)
    for suffix in (".tar.gz", ".tgz", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    target, stamp_uri = storage.join(cache, f"{name}.tar"), storage.join(cache, f"{name}.tar.json")
    stamp = {"archive": archive, "member": member, "size": info.size, "mtime_ns": info.mtime_ns}
    if storage.exists(stamp_uri) and storage.exists(target):
        previous = storage.read_json(stamp_uri)
        if previous.get("source") == stamp and previous.get("bytes") == ingest.file_size(target):
            return target

    log.info("decompressing %s%s once into %s", archive, f" ({member})" if member else "", target)
    if storage.is_s3(target):
        tmp_dir = tempfile.mkdtemp(prefix="alexnet-cache-")
    else:
        tmp_dir = storage.filesystem(cache)[1]
        os.makedirs(tmp_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            if member is None:
                with fs.open_input_file(path) as raw:
                    _gunzip(raw, out, archive)
            else:
                try:
                    with _open_zip(archive) as zf, zf.open(member) as inner:
                        _gunzip(inner, out, f"{archive} ({member})")
                except zipfile.BadZipFile as e:  # the member's local header
                    raise IngestError(f"{archive}: not a readable zip archive ({e}); re-download it and check its "
                                      "MD5") from None
        nbytes = os.path.getsize(tmp)
        storage.upload_file(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    storage.write_json(stamp_uri, {"source": stamp, "bytes": nbytes})
    return target


def _gunzip(src, out, what: str) -> None:  # type: ignore[no-untyped-def]
    try:
        with gzip.GzipFile(fileobj=src, mode="rb") as gz:
            while block := gz.read(8 << 20):
                out.write(block)
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:  # BadZipFile: a zip member's CRC or header
        raise IngestError(f"{what}: not a readable gzip file ({e}); re-download it and check its MD5") from None


@contextlib.contextmanager
def _open_zip(archive: str) -> Iterator[zipfile.ZipFile]:
    """The zip ``archive``, read in place (its central directory and members by byte range), names checked."""
    fs, path = storage.filesystem(archive)
    with fs.open_input_file(path) as raw:
        try:
            zf = zipfile.ZipFile(raw)
        except zipfile.BadZipFile as e:
            raise IngestError(f"{archive}: not a readable zip archive ({e}); re-download it and check its MD5") from None
        with zf:
            for info in zf.infolist():
                link = stat.S_ISLNK(info.external_attr >> 16)
                ingest.check_member(archive, info.filename, link_or_device=link)
            yield zf


def _zip_member(archive: str, basename: str) -> str:
    """The name of the member of the zip ``archive`` called ``basename`` (macOS resource forks skipped)."""
    with _open_zip(archive) as zf:
        names = [n for n in zf.namelist() if posixpath.basename(n) == basename and not n.startswith("__MACOSX/")]
    if not names:
        raise IngestError(f"{archive}: no member {basename}; is this the official {posixpath.basename(archive)}?")
    return names[0]


def _require(source: str, *names: str) -> list[str]:
    uris = [storage.join(source, n) for n in names]
    missing = [n for n, u in zip(names, uris) if not storage.exists(u)]
    if missing:
        raise IngestError(f"{source}: missing {', '.join(missing)} (expected {', '.join(names)}; "
                          "`alexnet download DATASET` fetches them)")
    return uris


def _relative(name: str, root: str) -> str | None:
    """``name`` below ``root`` (a leading ``./`` ignored), or None for members outside it."""
    name = name[2:] if name.startswith("./") else name
    return name[len(root) + 1:] if name.startswith(root + "/") else None


# --- Caltech-101 -----------------------------------------------------------------------------------------------


def index_caltech101(source: str, *, cache: str | None = None) -> SourceIndex:
    """Index ``101_ObjectCategories.tar.gz`` (or ``caltech-101.zip``) at ``source``: split ``all``."""
    tgz, wrapped = storage.join(source, formats.CALTECH101_TGZ), storage.join(source, formats.CALTECH101_ZIP)
    member = None
    if storage.exists(tgz):
        archive, tar = tgz, decompressed_tar(tgz, cache)
    elif storage.exists(wrapped):
        member = _zip_member(wrapped, posixpath.basename(formats.CALTECH101_ZIP_TGZ))
        archive, tar = wrapped, decompressed_tar(wrapped, cache, member=member)
    else:
        raise IngestError(f"{source}: neither {formats.CALTECH101_TGZ} nor {formats.CALTECH101_ZIP} found "
                          "(`alexnet download caltech101` fetches one)")
    found, folders, members = [], [], []
    for name, offset, size in ingest.iter_tar(tar, archive=archive, directories=folders):
        rel = _relative(name, formats.CALTECH101_ROOT)
        if rel is None or not ingest.is_image(rel):
            if rel is not None and "/" in rel:
                folders.append(posixpath.dirname(name))  # a folder holding only other files
            continue
        parts = rel.split("/")
        if len(parts) != 2:
            raise IngestError(f"{archive}: {name!r} is not {formats.CALTECH101_ROOT}/<category>/<image>")
        if parts[0] != formats.CALTECH101_BACKGROUND:
            found.append((parts[0], ingest.image_key(parts[1]), offset, size))
            members.append(f"{_origin(archive, member)}: {name}")
    categories = sorted({c for c, *_ in found})
    if not categories:
        raise IngestError(f"{archive}: no images below {formats.CALTECH101_ROOT}/<category>/")
    # An empty category folder is no class (as torchvision's ImageFolder would make it): say so, loudly.
    in_root = {_relative(f.rstrip("/"), formats.CALTECH101_ROOT) for f in folders}
    empty = sorted({c for c in in_root if c and "/" not in c} - set(categories) - {formats.CALTECH101_BACKGROUND})
    for c in empty:
        log.warning("%s: category folder %s/%s holds no images; it is left out of the %d classes", archive,
                    formats.CALTECH101_ROOT, c, len(categories))
    labels = {c: i for i, c in enumerate(categories)}
    rows = [("all", f"{c}/{key}", c, labels[c], tar, off, size) for c, key, off, size in found]
    return SourceIndex(
        posixpath.basename(archive), source, categories, {c: c for c in categories},
        _with_origins(ingest.rows_table(rows), members), {archive: ingest.file_size(archive)},
        dataset="caltech101", splits=("all",),
        label_convention=f"index of the category folder in sorted folder order ({formats.CALTECH101_BACKGROUND} "
        "excluded)",
        empty_classes=tuple(f"{formats.CALTECH101_ROOT}/{c}" for c in empty),
    )


def _origin(archive: str, member: str | None) -> str:
    """The file the user gave, as rejects name it: ``archive``, or ``archive (member)`` for a tar.gz in a zip."""
    return f"{archive} ({member})" if member else archive


def _with_origins(table: pa.Table, origins: list[str]) -> pa.Table:
    """The index sorted by split and key, with the ``origin`` column (``<archive>: <member>``): rejects name the
    archive the user gave and the member path, not the decompressed copy that the rows' ``uri`` points to."""
    return ingest.concat_index([table.append_column("origin", pa.array(origins, pa.string()))])


# --- Oxford Flowers-102 ----------------------------------------------------------------------------------------


def _mat_vector(uri: str, key: str) -> list[int]:
    import io

    import scipy.io

    try:
        data = scipy.io.loadmat(io.BytesIO(storage.read_bytes(uri)))
    except (ValueError, TypeError, OSError) as e:
        raise IngestError(f"{uri}: not a readable .mat file ({e}); re-download it and check its MD5") from None
    if key not in data:
        raise IngestError(f"{uri}: no variable {key!r} (found {sorted(k for k in data if not k.startswith('__'))})")
    return [int(v) for v in data[key].ravel()]


def index_flowers102(source: str, *, cache: str | None = None) -> SourceIndex:
    """Index ``102flowers.tgz`` with ``imagelabels.mat`` and ``setid.mat``: splits ``train``, ``val``, ``test``."""
    tgz, labels_uri, setid_uri = _require(source, formats.FLOWERS102_TGZ, formats.FLOWERS102_LABELS,
                                          formats.FLOWERS102_SETID)
    official = _mat_vector(labels_uri, "labels")  # official[n - 1]: 1-based class of image n
    if not official or min(official) < 1:
        raise IngestError(f"{labels_uri}: labels must be 1-based class numbers")
    split_of: dict[int, str] = {}
    for split, key in formats.FLOWERS102_SPLIT_KEYS.items():
        for number in _mat_vector(setid_uri, key):
            if number in split_of:
                raise IngestError(f"{setid_uri}: image {number} is in both {split_of[number]} and {split}")
            if not 1 <= number <= len(official):
                raise IngestError(f"{setid_uri}: image {number} ({key}) has no label in {labels_uri}")
            split_of[number] = split

    tar = decompressed_tar(tgz, cache)
    rows, seen, members = [], set(), []
    for name, offset, size in ingest.iter_tar(tar, archive=tgz):
        if not ingest.is_image(name):
            continue
        key = ingest.image_key(name)
        try:
            number = int(key.rsplit("_", 1)[1])
        except (IndexError, ValueError):
            raise IngestError(f"{tgz}: unexpected image name {name!r} (want jpg/image_%05d.jpg)") from None
        if number not in split_of:
            log.warning("%s: %s is in no split of %s; skipped", tgz, name, setid_uri)
            continue
        seen.add(number)
        label = official[number - 1]
        rows.append((split_of[number], key, f"{label:03d}", label - 1, tar, offset, size))
        members.append(f"{tgz}: {name}")
    missing = sorted(set(split_of) - seen)
    if missing:
        raise IngestError(f"{tgz}: {len(missing)} images listed in {formats.FLOWERS102_SETID} are missing "
                          f"(first: image_{missing[0]:05d}.jpg)")
    wnids = [f"{label:03d}" for label in range(1, max(official) + 1)]
    return SourceIndex(
        formats.FLOWERS102_TGZ, source, wnids, {}, _with_origins(ingest.rows_table(rows), members),
        {u: ingest.file_size(u) for u in (tgz, labels_uri, setid_uri)},
        dataset="flowers102", splits=tuple(formats.FLOWERS102_SPLIT_KEYS),
        label_convention="official label (imagelabels.mat, 1-based) minus 1; wnid is the official label as %03d",
    )


# --- PASCAL VOC 2007 -------------------------------------------------------------------------------------------


def index_voc2007(source: str, *, cache: str | None = None) -> SourceIndex:
    """Index the two VOC 2007 tars in place: splits ``train``, ``val``, ``test``, multi-label.

    ``cache`` is unused (the tars are not compressed); it is accepted so that every indexer has one signature.
    """
    tars = _require(source, formats.VOC2007_TRAINVAL_TAR, formats.VOC2007_TEST_TAR)
    images: dict[str, tuple[str, int, int]] = {}
    lists: dict[str, str] = {}  # ImageSets/Main/<name>.txt -> its text
    files: dict[str, object] = {}
    try:
        for tar in tars:
            for name, offset, size in ingest.iter_tar(tar):
                rel = _relative(name, formats.VOC2007_ROOT)
                if rel is None:
                    continue
                if rel.startswith("JPEGImages/") and ingest.is_image(rel):
                    images[ingest.image_key(rel)] = (tar, offset, size)
                elif rel.startswith("ImageSets/Main/") and rel.endswith(".txt"):
                    lists[posixpath.basename(rel)[:-4]] = ingest.read_range(tar, offset, size, files).decode()
    finally:
        for f in files.values():
            f.close()  # type: ignore[attr-defined]

    def lines(name: str) -> list[list[str]]:
        if name not in lists:
            split = name.rsplit("_", 1)[-1]
            tar = formats.VOC2007_TEST_TAR if split == "test" else formats.VOC2007_TRAINVAL_TAR
            raise IngestError(
                f"{source}: no {formats.VOC2007_ROOT}/ImageSets/Main/{name}.txt in the VOC tars: the {split} image "
                f"sets come in the official {tar} (with ImageSets/Main/{split}.txt and <class>_{split}.txt); "
                "supply that file (`alexnet download voc2007` fetches both tars)")
        return [line.split() for line in lists[name].splitlines() if line.strip()]

    rows, labels, difficult = [], [], []
    for split in formats.VOC2007_SPLITS:
        lines(split)  # the split's own list first: its absence is the one to name
        flags = {}
        for c in formats.VOC_CLASSES:
            flags[c] = {fields[0]: int(fields[1]) for fields in lines(f"{c}_{split}")}
        for (key, *_) in lines(split):
            if key not in images:
                raise IngestError(f"{source}: {key}.jpg of ImageSets/Main/{split}.txt is in neither VOC tar")
            try:
                row = [flags[c][key] for c in formats.VOC_CLASSES]
            except KeyError as e:
                raise IngestError(f"{source}: no entry for {key} in ImageSets/Main/{e.args[0]}_{split}.txt") from None
            present = [c for c, f in zip(formats.VOC_CLASSES, row) if f == 1]
            label = formats.VOC_CLASSES.index(present[0]) if present else -1
            rows.append((split, key, ",".join(present), label, *images[key]))
            labels.append([int(f == 1) for f in row])
            difficult.append([f == 0 for f in row])
    table = ingest.rows_table(rows)
    for field, values in zip(VOC_EXTRA_FIELDS, (labels, difficult)):
        table = table.append_column(field, pa.array(values, type=field.type))
    return SourceIndex(
        "VOCdevkit", source, list(formats.VOC_CLASSES), {c: c for c in formats.VOC_CLASSES},
        ingest.concat_index([table]), {t: ingest.file_size(t) for t in tars},
        dataset="voc2007", splits=formats.VOC2007_SPLITS, extra_fields=VOC_EXTRA_FIELDS, multi_label=True,
        label_convention="labels[c] = 1 where ImageSets/Main/<class>_<split>.txt says 1, difficult[c] where it "
        "says 0 (classes in the devkit order); label = the first class present, or -1",
    )


#: dataset name -> ``index(source, *, cache=None) -> SourceIndex``
INDEXERS: dict[str, Callable[..., SourceIndex]] = {
    "caltech101": index_caltech101,
    "flowers102": index_flowers102,
    "voc2007": index_voc2007,
}
