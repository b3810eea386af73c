"""Fetch dataset archives from a local path, ``file://``, ``http(s)://`` or ``s3://``, with published checksums.

The first stage of the pipeline: it only puts verified files on local disk. Everything it does has to survive
a 138 GB train archive on a flaky link, so:

- a download is written to ``<dest>.part`` and renamed into place only after it is complete *and* verified;
  a file under its final name is therefore always whole;
- an existing ``.part`` is continued (HTTP ``Range``, S3 ranged ``get_object``, a seek for local files), and
  transient failures (connection resets, timeouts, 5xx) are retried with exponential backoff, each attempt
  resuming from the bytes already on disk;
- the MD5 is computed while the bytes are written (a resumed part is hashed once first), so verification
  costs no second read;
- a verified file gets a sidecar ``<name>.md5`` (JSON: md5, size, mtime_ns), so later runs skip it without
  re-hashing; a file whose size or mtime no longer matches its sidecar is hashed again;
- a checksum mismatch never deletes anything: the file is kept as ``<dest>.corrupt`` and the error says so.

S3 endpoints come from the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables, which boto3
(>= 1.28.57; the project requires >= 1.34) reads itself, together with the usual credential chain.

Public API: :func:`download_file` (one URI, generic), :func:`download_files` (names under a source prefix, for
any dataset), :func:`download_dataset` (the official files of ImageNet, Caltech-101, Flowers-102 or VOC 2007),
:func:`download_imagenet` (the three ILSVRC-2012 files), :func:`parse_headers` (for a CLI ``--header`` option),
and the two errors :class:`ChecksumError` and :class:`DownloadError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from pipelines.formats import DATASET_FILES, IMAGENET_FILES, IMAGENET_MD5, IMAGENET_SIZES, TRANSFER_MD5
from pipelines.redact import redact_text, redact_uri

log = logging.getLogger(__name__)

__all__ = [
    "ChecksumError",
    "DownloadError",
    "download_file",
    "download_dataset",
    "download_files",
    "download_imagenet",
    "parse_headers",
]

#: Backoff before retry n (1-based) is ``min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (n - 1))``, jittered.
_BACKOFF_BASE_S = 1.0
_BACKOFF_MAX_S = 60.0
#: (connect, read) timeouts; the read timeout is per socket read, not for the whole body.
_HTTP_TIMEOUT_S = (30.0, 120.0)

_PART_SUFFIX = ".part"
_CORRUPT_SUFFIX = ".corrupt"
_SIDECAR_SUFFIX = ".md5"

_NO_VERIFY_HINT = "or, for a subset or synthetic data with other checksums, pass --no-verify (verify=False)"


class ChecksumError(RuntimeError):
    """A file's MD5 differs from the expected one. ``path`` is where the bad file was kept."""

    def __init__(self, message: str, *, path: Path | None = None, expected: str = "", actual: str = "") -> None:
        super().__init__(redact_text(message))  # the source URI may be presigned
        self.path, self.expected, self.actual = path, expected, actual

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the attributes when the error crosses a process boundary (Prefect, Ray pickle exceptions).
        return (_rebuild, (type(self), str(self), {"path": self.path, "expected": self.expected,
                                                   "actual": self.actual}))


class DownloadError(RuntimeError):
    """A download failed for good (4xx, missing object, retries exhausted). ``status`` is the HTTP status if any;
    ``missing`` says the source has no such file (HTTP 404, no S3 object, no local file)."""

    def __init__(self, message: str, *, uri: str = "", status: int | None = None, missing: bool = False) -> None:
        super().__init__(redact_text(message))  # the source URI may be presigned or carry a password
        self.uri, self.status, self.missing = redact_uri(uri), status, missing

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), {"uri": self.uri, "status": self.status, "missing": self.missing}))


def _rebuild(cls: type[Exception], message: str, attrs: dict[str, Any]) -> Exception:
    return cls(message, **attrs)


class _Transient(Exception):
    """Raised by a fetcher for a failure worth retrying; the retry loop resumes from the bytes on disk."""


# --- public API -------------------------------------------------------------------------------------------------


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    """Parse ``["Name: value", ...]`` (a CLI ``--header`` option) into a dict.

    Raises ``ValueError`` for an entry without a colon, an empty or invalid name, or a name given twice
    (case-insensitively). Messages never echo header values, which are typically secrets.
    """
    headers: dict[str, str] = {}
    seen: dict[str, str] = {}
    for index, entry in enumerate(values, start=1):
        name, sep, value = entry.partition(":")
        name = name.strip()
        if not sep:
            raise ValueError(f"header #{index} has no ':'; expected 'Name: value', e.g. 'Authorization: Bearer TOKEN'")
        if not name or any(c.isspace() or not c.isprintable() for c in name):
            raise ValueError(f"header #{index} has an empty or invalid name; expected 'Name: value'")
        if name.lower() in seen:
            raise ValueError(f"header {name!r} is given more than once (also as {seen[name.lower()]!r})")
        seen[name.lower()] = name
        headers[name] = value.strip()
    return headers


def download_file(
    uri: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    headers: Mapping[str, str] | None = None,
    progress: bool = True,
    retries: int = 5,
    chunk_size: int = 8 << 20,
) -> Path:
    """Fetch ``uri`` to ``dest``, resuming ``<dest>.part`` and verifying ``md5`` if given; return ``dest``.

    ``uri`` is a local path, ``file://``, ``http(s)://`` or ``s3://bucket/key``. ``headers`` are sent with HTTP
    requests only (e.g. ``Authorization``). ``retries`` counts consecutive failed attempts that brought no new
    bytes, so a long download over a link that drops now and then keeps going while a dead one gives up.

    If ``dest`` already exists it is not downloaded again: with ``md5`` it is verified (through the sidecar when
    that still matches the file, otherwise by hashing it once), without ``md5`` it is taken as is.

    Raises :class:`ChecksumError` on a mismatch (the file is kept as ``<dest>.corrupt``), :class:`DownloadError`
    when the source cannot be fetched (the ``.part`` is kept for the next run), ``ValueError`` for a URI with an
    unsupported scheme.
    """
    dest = Path(dest)
    expected = md5.strip().lower() if md5 else None
    fetch = _fetcher_for(uri, headers or {}, chunk_size)
    dest.parent.mkdir(parents=True, exist_ok=True)

    if dest.exists():
        if expected is None:
            log.info("%s exists; no checksum given, not verifying", dest)
            return dest
        actual = _verified_md5(dest, chunk_size, progress)
        if actual == expected:
            log.info("%s exists and is verified; skipping", dest)
            return dest
        raise _quarantine(dest, dest, uri, expected, actual, was_present=True)

    part_path = dest.with_name(dest.name + _PART_SUFFIX)
    with _PartFile(part_path, chunk_size, progress, dest.name) as part:
        log.info("downloading %s -> %s%s", redact_uri(uri), dest, f" (resuming at {part.size} bytes)" if part.size else "")
        _fetch_with_retries(fetch, uri, part, retries)
        actual = part.finish()
        size = part.size

    if expected is not None and actual != expected:
        raise _quarantine(part_path, dest, uri, expected, actual, was_present=False)
    os.replace(part_path, dest)
    _write_sidecar(dest, actual)
    log.info("downloaded %s (%d bytes, md5 %s%s)", dest, size, actual, ", verified" if expected else "")
    return dest


def download_files(
    source: str,
    dest: str | Path,
    files: Sequence[str],
    *,
    md5: Mapping[str, str] | None = None,
    verify: bool = True,
    headers: Mapping[str, str] | None = None,
    sizes: Mapping[str, int] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch ``<source>/<name>`` into ``<dest>/<name>`` for each name in ``files``; return the local paths.

    The generic form of :func:`download_imagenet`, for any dataset whose archives share a source prefix
    (``https://host/path``, ``s3://bucket/prefix``, ``file:///dir`` or a local folder). With ``verify`` every
    name needs an entry in ``md5``, checked before anything is downloaded. ``sizes`` (expected bytes per name,
    where known) only feeds an early warning when the destination looks short of space.
    """
    dest = Path(dest)
    checksums = {name: value.lower() for name, value in (md5 or {}).items()}
    if verify:
        missing = [name for name in files if name not in checksums]
        if missing:
            raise ValueError(f"no MD5 known for {', '.join(missing)}: pass md5={{name: md5}} for them, "
                             f"{_NO_VERIFY_HINT}")
    dest.mkdir(parents=True, exist_ok=True)
    _warn_if_short_of_space(dest, files, sizes or {})
    return [
        download_file(_join_uri(source, name), dest / name, md5=checksums.get(name) if verify else None,
                      headers=headers, progress=progress)
        for name in files
    ]


def download_imagenet(
    source: str,
    dest: str | Path,
    *,
    verify: bool = True,
    headers: Mapping[str, str] | None = None,
    md5: Mapping[str, str] | None = None,
    files: Sequence[str] = IMAGENET_FILES,
    progress: bool = True,
) -> list[Path]:
    """Fetch the ILSVRC-2012 archives ``<source>/<name>`` into ``<dest>/<name>``; return the local paths.

    With ``verify`` each file is checked against the published ``IMAGENET_MD5``; entries of ``md5`` override or
    extend it, so a subset with its own checksums can still be verified. ``verify=False`` skips all checks.
    """
    checksums = {**IMAGENET_MD5, **(md5 or {})}
    # The published sizes describe the official files only, not overridden ones.
    sizes = {name: size for name, size in IMAGENET_SIZES.items() if checksums.get(name) == IMAGENET_MD5[name]}
    return download_files(source, dest, files, md5=checksums, verify=verify, headers=headers, sizes=sizes,
                          progress=progress)


def download_dataset(
    dataset: str,
    source: str,
    dest: str | Path,
    *,
    verify: bool = True,
    headers: Mapping[str, str] | None = None,
    md5: Mapping[str, str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch the official files of ``dataset`` (a key of ``formats.DATASET_FILES``) from ``source`` into ``dest``.

    ``source`` is a folder, ``file://``, ``https://`` or ``s3://`` prefix, as for :func:`download_imagenet` (which
    this is for ``imagenet``). Published MD5s are checked (``formats.TRANSFER_MD5``; ``md5`` overrides or extends
    them; ``verify=False`` skips all checks). Where a dataset comes in alternative packagings (Caltech-101's
    ``101_ObjectCategories.tar.gz`` or ``caltech-101.zip``), one already in ``dest`` is kept, else the first the
    source has is fetched. Returns the local paths.
    """
    if dataset == "imagenet":
        return download_imagenet(source, dest, verify=verify, headers=headers, md5=md5, progress=progress)
    if dataset not in DATASET_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_FILES)}")
    checksums = {**TRANSFER_MD5, **(md5 or {})}
    paths = []
    for group in DATASET_FILES[dataset]:
        present = [name for name in group if (Path(dest) / name).exists()]
        for name in present[:1] or group:
            try:
                paths += download_files(source, dest, [name], md5=checksums, verify=verify, headers=headers,
                                        progress=progress)
                break
            except DownloadError as exc:
                if not exc.missing or len(group) == 1:
                    raise
                empty_part = Path(dest) / (name + _PART_SUFFIX)
                if empty_part.exists() and empty_part.stat().st_size == 0:
                    empty_part.unlink()  # opened before the source turned out not to have it
                log.info("%s is not at %s; trying the other packagings of %s", name, redact_uri(source), dataset)
        else:
            raise DownloadError(f"none of {', '.join(group)} is at {source}; fix: check the source prefix",
                                uri=source, missing=True)
    return paths


# --- the part file and the retry loop ---------------------------------------------------------------------------


class _PartFile:
    """An append-only ``.part`` file with a running MD5 and a progress bar.

    Opening it hashes what is already there, so the digest always covers the whole file without a second read.
    """

    def __init__(self, path: Path, chunk_size: int, progress: bool, label: str) -> None:
        self.path = path
        self._hasher = _new_md5()
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed in __exit__
        try:
            _lock_exclusively(self._file)
        except BaseException:
            self._file.close()
            raise
        existing = self._file.tell()
        if existing:
            with open(path, "rb") as f, _progress_bar(existing, progress, f"hashing {label}.part") as bar:
                while data := f.read(chunk_size):
                    self._hasher.update(data)
                    bar.update(len(data))
        self.size = existing
        self._bar = _progress_bar(None, progress, label, initial=existing)

    def __enter__(self) -> _PartFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
        self._file.close()

    def set_total(self, total: int | None) -> None:
        if total is not None and self._bar.total != total:
            self._bar.total = total
            self._bar.refresh()

    def append(self, data: bytes) -> None:
        self._file.write(data)
        self._hasher.update(data)
        self.size += len(data)
        self._bar.update(len(data))

    def restart(self) -> None:
        """Drop what was written so far (the source cannot continue it)."""
        self._file.truncate(0)
        self._file.seek(0)
        self._hasher = _new_md5()
        self.size = 0
        self._bar.initial = 0  # tqdm keeps `initial` across reset(), which would show a negative rate
        self._bar.reset(total=self._bar.total)

    def finish(self) -> str:
        """Flush the part to stable storage and return its MD5."""
        self._file.flush()
        # fsync before the rename makes "final name means complete" hold across a power loss, too.
        os.fsync(self._file.fileno())
        return self._hasher.hexdigest()


_Fetch = Callable[["_PartFile"], None]


def _fetch_with_retries(fetch: _Fetch, uri: str, part: _PartFile, retries: int) -> None:
    failures = 0
    while True:
        before = part.size
        try:
            fetch(part)
            return
        except _Transient as exc:
            if part.size > before:
                failures = 0  # bytes arrived: the link is flaky, not dead
            failures += 1
            if failures > retries:
                raise DownloadError(
                    f"giving up on {uri} after {retries} retries without progress: {exc}. "
                    f"{part.size} bytes are kept in {part.path}; fix: check the network or the server and rerun "
                    f"to resume from there",
                    uri=uri,
                ) from exc
            delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
            log.warning("%s: %s; retry %d/%d in %.1f s from byte %d", redact_uri(uri), redact_text(str(exc)), failures, retries, delay, part.size)
            time.sleep(delay)


# --- fetchers: each continues the part from part.size to the end of the source ----------------------------------


def _fetcher_for(uri: str, headers: Mapping[str, str], chunk_size: int) -> _Fetch:
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        return lambda part: _fetch_http(uri, part, headers, chunk_size)
    if headers:
        log.warning("headers are only sent to http(s) sources; ignoring them for %s", redact_uri(uri))
    if scheme == "s3":
        bucket, key = _split_s3(uri)
        # One client per file: created lazily, reused by the retries, nothing kept at module level.
        client: list[Any] = []
        return lambda part: _fetch_s3(uri, bucket, key, part, chunk_size, client)
    if scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a host is not supported: {uri} (use file:///absolute/path)")
        path = Path(urllib.request.url2pathname(parts.path))
        return lambda part: _fetch_local(uri, path, part, chunk_size)
    if scheme == "":
        return lambda part: _fetch_local(uri, Path(uri), part, chunk_size)
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri}: use a local path, file://, http(s):// or s3://")


def _fetch_local(uri: str, path: Path, part: _PartFile, chunk_size: int) -> None:
    try:
        src = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError as exc:
        raise DownloadError(f"{uri} does not exist; fix: check the source folder and the file name", uri=uri,
                            missing=True) from exc
    except OSError as exc:
        raise DownloadError(f"cannot read {uri}: {exc}; fix: check the path and its permissions", uri=uri) from exc
    with src:
        total = os.fstat(src.fileno()).st_size
        part.set_total(total)
        if part.size > total:
            log.warning("%s is larger than its source %s; starting over", part.path, uri)
            part.restart()
        src.seek(part.size)
        while data := src.read(chunk_size):
            part.append(data)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())


def _origin_bound_session(headers: Mapping[str, str]) -> Any:
    """A ``requests.Session`` that drops the caller's ``headers`` (typically credentials) when a redirect leaves the
    origin (scheme, host and port) they were given for; requests itself strips only ``Authorization``, and keeps
    it on an http -> https redirect."""
    import requests

    class Session(requests.Session):
        def rebuild_auth(self, prepared_request: Any, response: Any) -> None:
            super().rebuild_auth(prepared_request, response)
            if _origin(prepared_request.url) != _origin(response.request.url):
                for name in headers:
                    prepared_request.headers.pop(name, None)  # case-insensitive; stays dropped on later hops

    return Session()


def _fetch_http(uri: str, part: _PartFile, headers: Mapping[str, str], chunk_size: int) -> None:
    import requests  # deferred: only HTTP sources need them
    import urllib3

    # Identity encoding: byte ranges and the MD5 refer to the file itself, not to a compressed transfer.
    request_headers = {"Accept-Encoding": "identity", **headers}
    resuming = part.size > 0
    if resuming:
        request_headers["Range"] = f"bytes={part.size}-"
    try:
        with _origin_bound_session(headers) as session, \
                session.get(uri, headers=request_headers, stream=True, timeout=_HTTP_TIMEOUT_S) as resp:
            status = resp.status_code
            if status == 416 and resuming:
                total = _content_range(resp.headers.get("Content-Range"))[1]
                if total is None or total == part.size:
                    log.info("%s: server reports the range past the end; the part is complete", redact_uri(uri))
                    return
                log.warning("%s: %s has %d bytes but the source has %d; starting over", redact_uri(uri), part.path,
                            part.size, total)
                part.restart()
                raise _Transient(f"part larger than the source ({total} bytes)")
            _check_http_status(uri, status, resp.reason)
            if status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != part.size:
                    part.restart()
                    raise _Transient(f"server answered a range starting at {start}, not {part.size}")
            else:
                if resuming:
                    log.warning("%s: server ignored the Range request (HTTP %d); restarting from zero", redact_uri(uri), status)
                    part.restart()
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            part.set_total(total)
            try:
                # Undecoded: servers often label .tar.gz files "Content-Encoding: gzip", and the checksum and
                # the byte ranges refer to the file as stored, not to what a decoder would make of it.
                for data in resp.raw.stream(chunk_size, decode_content=False):
                    part.append(data)
            except urllib3.exceptions.HTTPError as exc:  # reset, timeout, truncated body: all mid-transfer
                raise _Transient(f"{type(exc).__name__}: {exc}") from exc
            if total is not None and part.size != total:
                raise _Transient(f"connection closed after {part.size} of {total} bytes")
    except requests.exceptions.SSLError as exc:
        raise DownloadError(f"TLS error for {uri}: {exc}; fix: check the URL and the CA bundle "
                            f"(REQUESTS_CA_BUNDLE)", uri=uri) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc
    except requests.RequestException as exc:  # invalid URL, too many redirects, ...: retrying will not help
        raise DownloadError(f"cannot fetch {uri}: {exc}", uri=uri) from exc


def _check_http_status(uri: str, status: int, reason: str) -> None:
    if status in (200, 206):
        return
    if status >= 500 or status in (408, 429):
        raise _Transient(f"HTTP {status} {reason}")
    if status in (401, 403):
        raise DownloadError(
            f"HTTP {status} {reason} for {uri}: the server wants credentials or refused them; fix: pass them with "
            f"--header 'Authorization: Bearer TOKEN' (headers= in Python) or use a signed URL",
            uri=uri, status=status,
        )
    if status == 404:
        raise DownloadError(f"HTTP 404 Not Found for {uri}; fix: check the source URL and the file name",
                            uri=uri, status=status, missing=True)
    raise DownloadError(f"HTTP {status} {reason} for {uri}; fix: check the source URL", uri=uri, status=status)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` into (start, total); unknown parts are None."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes "):].partition("/")
    start = span.partition("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _fetch_s3(uri: str, bucket: str, key: str, part: _PartFile, chunk_size: int, client: list[Any]) -> None:
    import boto3  # deferred: only S3 sources need it
    from botocore import exceptions as bex

    transient = (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError)
    try:
        if not client:
            client.append(boto3.session.Session().client("s3"))
        s3 = client[0]
        total = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
        part.set_total(total)
        if part.size == total:
            return
        if part.size > total:
            log.warning("%s is larger than its source %s; starting over", part.path, uri)
            part.restart()
        ranged = {"Range": f"bytes={part.size}-"} if part.size else {}
        body = s3.get_object(Bucket=bucket, Key=key, **ranged)["Body"]
        try:
            for data in body.iter_chunks(chunk_size):
                part.append(data)
        finally:
            body.close()
        if part.size != total:
            raise _Transient(f"stream ended after {part.size} of {total} bytes")
    except bex.ClientError as exc:
        raise _s3_client_error(uri, exc) from exc
    except (bex.NoCredentialsError, bex.PartialCredentialsError) as exc:
        raise DownloadError(f"no AWS credentials for {uri}: {exc}; fix: set AWS_ACCESS_KEY_ID/"
                            f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE", uri=uri) from exc
    except bex.SSLError as exc:
        raise DownloadError(f"TLS error for {uri}: {exc}; fix: check AWS_ENDPOINT_URL and AWS_CA_BUNDLE",
                            uri=uri) from exc
    except transient as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc


def _s3_client_error(uri: str, exc: Any) -> Exception:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if (status or 0) >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError"):
        return _Transient(f"S3 {code or status}")
    if status == 404 or code in ("404", "NoSuchKey", "NoSuchBucket"):
        return DownloadError(f"S3 object {uri} not found ({code}); fix: check the bucket, the prefix and "
                             f"AWS_ENDPOINT_URL", uri=uri, status=status, missing=True)
    if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return DownloadError(f"access to {uri} denied ({code}); fix: check the AWS credentials/profile and the "
                             f"bucket policy", uri=uri, status=status)
    return DownloadError(f"S3 error for {uri}: {code} (HTTP {status})", uri=uri, status=status)


def _split_s3(uri: str) -> tuple[str, str]:
    # Not urlsplit: S3 keys may contain '?' and '#', which are literal here as in the AWS CLI.
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"S3 URI must name an object, s3://bucket/key: {uri}")
    return bucket, key


def _join_uri(source: str, name: str) -> str:
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if not scheme:
        return os.path.join(source, name)
    base = source if source.endswith("/") else source + "/"
    # S3 keys are literal; http and file URIs need the name percent-encoded.
    return base + (name if scheme == "s3" else urllib.parse.quote(name))


# --- verification of present files ------------------------------------------------------------------------------


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _write_sidecar(path: Path, md5: str) -> None:
    st = path.stat()
    record = {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    sidecar = _sidecar_path(path)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, sidecar)


def _verified_md5(path: Path, chunk_size: int, progress: bool) -> str:
    """The MD5 of ``path``: from its sidecar while that matches size and mtime, otherwise hashed (and recorded)."""
    st = path.stat()
    try:
        record = json.loads(_sidecar_path(path).read_text())
        if record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns:
            return str(record["md5"]).lower()
        log.info("%s changed since it was verified; hashing it again", path)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no sidecar, or not one of ours: hash below
    hasher = _new_md5()
    with open(path, "rb") as f, _progress_bar(st.st_size, progress, f"hashing {path.name}") as bar:
        while data := f.read(chunk_size):
            hasher.update(data)
            bar.update(len(data))
    actual = hasher.hexdigest()
    _write_sidecar(path, actual)
    return actual


def _quarantine(bad: Path, dest: Path, uri: str, expected: str, actual: str, *, was_present: bool) -> ChecksumError:
    """Move a file that failed verification to ``<dest>.corrupt`` and build the error that says so."""
    corrupt = dest.with_name(dest.name + _CORRUPT_SUFFIX)
    os.replace(bad, corrupt)
    _sidecar_path(dest).unlink(missing_ok=True)
    origin = "the existing file" if was_present else f"the download from {uri}"
    message = (
        f"MD5 mismatch for {dest.name}: expected {expected}, got {actual} ({origin}). It was kept as {corrupt}. "
        f"Fix: check that the source holds the official, complete file, then delete {corrupt} and rerun to "
        f"download it again; {_NO_VERIFY_HINT}, or give the right MD5 for that file"
    )
    log.error("%s", message)
    return ChecksumError(message, path=corrupt, expected=expected, actual=actual)


# --- small helpers ----------------------------------------------------------------------------------------------


def _lock_exclusively(file: IO[bytes]) -> None:
    """Refuse a second writer: two processes appending to one ``.part`` would interleave their bytes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, and the checksum still catches the damage
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise DownloadError(f"{file.name} is being written by another process; fix: wait for it to finish, "
                            f"or stop it and rerun to resume") from exc


def _new_md5() -> Any:
    # usedforsecurity=False: MD5 is an integrity check here, and FIPS-mode Pythons refuse it otherwise.
    return hashlib.md5(usedforsecurity=False)


def _progress_bar(total: int | None, enabled: bool, desc: str, initial: int = 0) -> Any:
    from tqdm import tqdm  # not tqdm.auto: notebook widgets would ignore file=sys.stderr

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not enabled, leave=False)


def _warn_if_short_of_space(dest: Path, files: Sequence[str], sizes: Mapping[str, int]) -> None:
    needed = 0
    for name in files:
        if name in sizes and not (dest / name).exists():
            part = dest / (name + _PART_SUFFIX)
            needed += sizes[name] - (part.stat().st_size if part.exists() else 0)
    free = shutil.disk_usage(dest).free
    if needed > free:
        # A warning, not an error: free space on network or thin-provisioned filesystems is often misreported.
        log.warning("%s has %.1f GB free but the remaining downloads need %.1f GB", dest, free / 1e9, needed / 1e9)
