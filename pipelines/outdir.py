"""The output location of ``prepare``: which files there are the pipeline's, whether its recorded shards are intact,
and a lock against a second run.

``--overwrite`` deletes only what :func:`own_files` names (shards, ``_state/``, ``manifest.json``, the statistics
derived from the shards, temporaries) and only where :func:`check_ours` found the pipeline's own plan or manifest
(or nothing at all): a mistyped ``--out`` pointing at someone's photos is refused, not emptied.

:func:`lock` keeps two runs from writing one output (the second would delete the first's temporaries). Locally it
is ``OUT/_prepare.lock``, held with ``flock`` for the run and naming the holder (host, pid, start time): the kernel
drops the ``flock`` of a dead process, so a crashed run never blocks the next one; where ``flock`` is not
available the recorded pid is checked on the same host. On S3 it is a lease object created with a conditional PUT
(``If-None-Match: *``), renewed while the run lives (``If-Match`` its ETag) and taken over once it has not been
renewed for :data:`LEASE_TTL_S` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pipelines import storage

log = logging.getLogger(__name__)

LOCK_NAME = "_prepare.lock"
#: A lease not renewed for this long belongs to a run that is gone (renewed every LEASE_TTL_S / 10).
LEASE_TTL_S = 600.0

#: Files ``prepare`` (and ``stats``, from its shards) writes below OUT, as paths relative to OUT.
_OWN = re.compile(
    r"^(?:(?:manifest\.json|stats\.json|mean_image\.npy)(?:\.tmp-[0-9a-f]{32})?"
    r"|_state/.*|_cache/.*|" + re.escape(LOCK_NAME) +
    r"|[^/]+/part-\d{5}-of-\d{5}\.parquet|[^/]+/\.tmp/.*)$"
)
#: Kept by ``--overwrite``: the lock being held, and the decompressed archives (checked against their source's
#: size and modification time before every use, so a stale copy is replaced anyway).
_KEPT = re.compile(r"^(?:" + re.escape(LOCK_NAME) + r"|_cache/.*)$")


class OutputError(RuntimeError):
    """OUT is not the pipeline's to overwrite, or another run holds it."""


class OutputLocked(OutputError):
    """Another run holds the lock of OUT."""


def _relative(files: list[tuple[str, int]]) -> list[str]:
    return [rel.replace(os.sep, "/") for rel, _ in files]


def _is_json_with(uri: str, key: str, value: Any = None) -> bool:
    try:
        data = storage.read_json(uri)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and key in data and (value is None or data[key] == value)


def check_ours(out: str, *, format_version: str) -> None:
    """Refuse (``OutputError``) unless ``out`` is absent, empty, or holds this pipeline's plan or manifest."""
    files = _relative(storage.list_files(out))
    if not files or all(_OWN.match(f) for f in files):
        return
    if "manifest.json" in files and _is_json_with(storage.join(out, "manifest.json"), "format", format_version):
        return
    if "_state/plan.json" in files and _is_json_with(storage.join(out, "_state", "plan.json"), "plan_hash"):
        return
    foreign = [f for f in files if not _OWN.match(f)]
    raise OutputError(
        f"refusing to overwrite {out}: it holds files that `alexnet prepare` did not write (e.g. "
        f"{', '.join(foreign[:3])}) and no manifest.json or _state/plan.json of a prepared dataset. "
        "Choose an empty or new --out."
    )


def own_files(out: str) -> list[str]:
    """The files below ``out`` that ``--overwrite`` deletes (relative paths)."""
    return [f for f in _relative(storage.list_files(out)) if _OWN.match(f) and not _KEPT.match(f)]


def delete_own_files(out: str) -> int:
    """Delete :func:`own_files` (and, locally, the folders they leave empty); returns how many files went."""
    files = own_files(out)
    fs, root = storage.filesystem(out)
    for rel in files:
        fs.delete_file(f"{root}/{rel}")
    if not storage.is_s3(out):
        for folder in sorted({os.path.dirname(os.path.join(root, f)) for f in files}, key=len, reverse=True):
            while folder != root and os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
                folder = os.path.dirname(folder)
    return len(files)


# --- resuming ---


def _sha256(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def verified(out: str, records: dict[tuple[str, int], dict]) -> dict[tuple[str, int], dict]:
    """The records whose shard is there with the recorded size and sha256; the others' shards are redone.

    A resumed run reads every recorded shard once (in parallel threads): a shard deleted, truncated or rewritten
    since its record must not end up in a manifest that calls it complete.
    """
    if not records:
        return records
    from concurrent.futures import ThreadPoolExecutor

    sizes = {rel.replace(os.sep, "/"): size for rel, size in storage.list_files(out)}

    def problem(rec: dict) -> str | None:
        size = sizes.get(rec["path"])
        if size is None:
            return "missing"
        if size != rec["bytes"]:
            return f"{size} bytes, recorded {rec['bytes']}"
        if _sha256(storage.join(out, rec["path"])) != rec["sha256"]:
            return "sha256 differs from its record"
        return None

    with ThreadPoolExecutor(8) as pool:
        problems = dict(zip(records, pool.map(problem, records.values())))
    for key, why in problems.items():
        if why:
            log.warning("%s: %s; the shard is written again", storage.join(out, records[key]["path"]), why)
    return {k: r for k, r in records.items() if not problems[k]}


# --- the lock ---------------------------------------------------------------------------------------------------


def _holder() -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "token": uuid.uuid4().hex}


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@contextlib.contextmanager
def lock(out: str) -> Iterator["_Lease | None"]:
    """Hold the lock of ``out`` for the ``with`` block; ``OutputLocked`` names the run that holds it."""
    if storage.is_s3(out):
        lease = _Lease(storage.join(out, LOCK_NAME))
        lease.acquire()
        try:
            yield lease
        finally:
            lease.release()
        return
    path = os.path.join(storage.local_path(out), LOCK_NAME)
    fd = _lock_local(path)
    try:
        yield None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # before dropping the flock: a waiter then re-checks the inode and retries
        os.close(fd)


def _read_fd(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _lock_local(path: str) -> int:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                raise OutputLocked(
                    f"{os.path.dirname(path)} is being written by another `alexnet prepare` "
                    f"({_describe(_read_fd(fd))}; lock {path}). Wait for it to finish or stop it, or choose another "
                    "--out."
                ) from None
            except OSError:  # a filesystem without flock: the recorded pid decides
                flocked = False
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError(path)  # released (deleted) between our open and flock: try again
            except FileNotFoundError:
                os.close(fd)
                continue
            previous = _read_fd(fd)
            if previous:
                same_host = previous.get("host") == socket.gethostname()
                if not same_host or (not flocked and _pid_alive(int(previous.get("pid", -1)))):
                    raise OutputLocked(
                        f"{os.path.dirname(path)} is locked by another `alexnet prepare` ({_describe(previous)}; lock "
                        f"{path}). {'If that run is no longer running, delete the lock file.' if not same_host else ''}"
                        .rstrip()
                    )
                log.warning("taking over the stale lock %s of a run that is gone (%s)", path, _describe(previous))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
            os.fsync(fd)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


class _Lease:
    """A lease object on S3: created with ``If-None-Match: *``, renewed with ``If-Match``, expired by age."""

    def __init__(self, uri: str, *, ttl_s: float = LEASE_TTL_S) -> None:
        self.uri, self.ttl_s = uri, ttl_s
        self.bucket, _, self.key = uri[len("s3://"):].partition("/")
        self.holder = _holder()
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _client():  # type: ignore[no-untyped-def]
        import boto3

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return boto3.client("s3", endpoint_url=storage.s3_endpoint(), region_name=region)

    def _put(self, client, **condition: str) -> str:  # type: ignore[no-untyped-def]
        body = json.dumps({**self.holder, "ttl_s": self.ttl_s}).encode()
        return client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        client = self._client()
        try:
            self.etag = self._put(client, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            current = client.get_object(Bucket=self.bucket, Key=self.key)
            other = json.loads(current["Body"].read() or b"{}")
            age = time.time() - current["LastModified"].timestamp()
            if age < float(other.get("ttl_s", self.ttl_s)):
                raise OutputLocked(
                    f"{self.uri.rsplit('/', 1)[0]} is being written by another `alexnet prepare` ({_describe(other)}; "
                    f"lease {self.uri}, renewed {age:.0f} s ago). Wait for it to finish or stop it, or choose another "
                    f"--out (a lease not renewed for {self.ttl_s:.0f} s is taken over)."
                ) from None
            try:  # expired: take it over, unless another run just did
                self.etag = self._put(client, IfMatch=current["ETag"])
            except ClientError:
                raise OutputLocked(f"{self.uri}: another `alexnet prepare` took over the expired lease first") from None
            log.warning("took over the expired lease %s of %s", self.uri, _describe(other))
        self._thread = threading.Thread(target=self._renew, name="alexnet-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        from botocore.exceptions import ClientError

        client = self._client()
        while not self._stop.wait(self.ttl_s / 10):
            try:
                self.etag = self._put(client, IfMatch=self.etag)
            except ClientError as e:
                self.lost = f"the lease {self.uri} could not be renewed ({e}); another run may have taken it over"
                log.error("%s", self.lost)
                return

    def check(self) -> None:
        """Raise ``OutputLocked`` when the lease was lost (before committing the run's result)."""
        if self.lost:
            raise OutputLocked(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.lost:
            return
        client = self._client()
        with contextlib.suppress(Exception):
            current = client.get_object(Bucket=self.bucket, Key=self.key)
            if json.loads(current["Body"].read()).get("token") == self.holder["token"]:
                client.delete_object(Bucket=self.bucket, Key=self.key)
