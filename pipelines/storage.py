"""Locations as URIs: a local path or ``s3://bucket/prefix``, read and written through ``pyarrow.fs``.

Every stage takes and returns URIs so that it runs unchanged on a laptop (local folders) and on a cluster (S3).
S3-compatible endpoints (MinIO, Ceph, a moto server in tests) come from the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` variables; pyarrow's S3 filesystem ignores them, so they are passed to it explicitly here.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import uuid
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the standard AWS variables, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


#: Variables that say where S3 is; handed to Ray workers (see ``worker_env``). Not the credentials
#: (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``): a runtime_env is shown to anyone who
#: can run ``ray list tasks --detail`` or open the dashboard. Workers find credentials as any AWS client does, by
#: the cluster's own means: the nodes' environment, ``~/.aws`` (``AWS_PROFILE`` names a profile there) or an
#: instance role.
S3_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)


def worker_env() -> dict[str, Any]:
    """A Ray ``runtime_env`` giving tasks the driver's S3 endpoint and region (never its credentials).

    Workers of an already running Ray (a cluster, or a local one started earlier) do not see variables set in the
    driver later, so tasks that open ``s3://`` URIs carry them explicitly.
    """
    env = {k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)}
    return {"env_vars": env} if env else {}


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    # No explicit keys: the filesystem is pickled into Ray task arguments, and keys given to it would travel (and be
    # stored) with it. Without them each process resolves credentials itself through the AWS default chain.
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path of ``uri`` inside it."""
    if is_s3(uri):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return _s3_filesystem(s3_endpoint(), region), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), local_path(uri)


def local_path(uri: str) -> str:
    """The absolute path of a local ``uri`` (a path or ``file://`` URI)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"unsupported location {uri!r}: use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """A URI with a local path made absolute (Ray workers and jobs do not share the caller's working directory)."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI (local or s3://) with forward slashes."""
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old object or the complete new one, never a part.

    On S3 a single PUT is atomic; locally the bytes go to a temporary name in the same folder, then are renamed.
    """
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path), recursive=True)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_numpy(uri: str, array: Any) -> bytes:
    """Save ``array`` in .npy format; returns the bytes written (to hash them without reading back)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(uri, buf.getvalue())
    return buf.getvalue()


def read_numpy(uri: str) -> Any:
    import numpy as np

    return np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)


def list_files(uri: str, *, recursive: bool = True) -> list[tuple[str, int]]:
    """(relative path, size) of every file below ``uri``, sorted; an absent folder lists nothing."""
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"{uri} is not a folder")
    selector = pafs.FileSelector(root, recursive=recursive, allow_not_found=True)
    out = []
    for entry in fs.get_file_info(selector):
        if entry.type == pafs.FileType.File:
            out.append((posixpath.relpath(entry.path, root) if is_s3(uri) else os.path.relpath(entry.path, root), entry.size))
    return sorted(out)


def delete_tree(uri: str) -> None:
    """Remove a folder and everything below it (no error when absent)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(path)


def upload_file(local_path: str, uri: str) -> None:
    """Move a finished local file to ``uri`` so that it appears there complete or not at all."""
    if not is_s3(uri):
        _, path = filesystem(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.replace(local_path, path)
        except OSError:  # another filesystem: copy next to the target first, then rename atomically
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
            os.remove(local_path)
        return
    fs, path = filesystem(uri)
    pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    os.remove(local_path)
