"""Tests for pipelines.download against real servers on loopback: an HTTP server with Range support and fault
modes, a moto S3 server, and local folders. Nothing in the download code is mocked; only the retry backoff is
shortened so that the tests stay fast.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines import download as dl
from pipelines.download import (
    ChecksumError,
    DownloadError,
    download_file,
    download_imagenet,
    parse_headers,
)
from pipelines.formats import IMAGENET_FILES

TOKEN = "Bearer s3cret"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _payload(size: int, seed: int = 0) -> bytes:
    # Deterministic, non-repeating bytes so that an offset error changes the checksum.
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "_BACKOFF_BASE_S", 0.01)


# --- HTTP server on loopback ------------------------------------------------------------------------------------


@dataclass
class ServerState:
    root: Path
    auth: str | None = None  # required Authorization value; 401 without it
    ignore_range: bool = False  # always answer 200 with the whole file
    cut_after: int | None = None  # on faulty requests: send this many body bytes, then drop the connection
    faults: int = 0  # how many of the next requests are faulty (cut, or answered with fail_status)
    fail_status: int | None = None  # status for faulty requests instead of cutting the body
    extra_headers: dict[str, str] = field(default_factory=dict)  # added to every file response
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> URL: answered with a 302 to the URL
    headers_seen: list[dict[str, str]] = field(default_factory=list)  # the request headers, per request
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        st = self.server.state
        range_header = self.headers.get("Range")
        with st.lock:
            st.requests.append((self.path, range_header))
            st.headers_seen.append(dict(self.headers.items()))
            faulty = st.faults > 0
            st.faults -= faulty
        if self.path in st.redirects:
            return self._reply(302, {"Location": st.redirects[self.path]})
        if st.auth is not None and self.headers.get("Authorization") != st.auth:
            return self._reply(401, body=b"unauthorized")
        if faulty and st.fail_status is not None:
            return self._reply(st.fail_status, body=b"try again")
        path = st.root / urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if not path.is_file():
            return self._reply(404, body=b"not found")
        data = path.read_bytes()
        start, status, headers = 0, 200, {}
        if range_header and not st.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, range_header
            start = int(match[1])
            if start >= len(data):
                return self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
            status, headers = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        self.send_response(status)
        for name, value in {**headers, **st.extra_headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if faulty and st.cut_after is not None:
            # Promise the whole body, send part of it, hang up: what a connection reset looks like to a client.
            self.wfile.write(body[: st.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up (a reset after an unread error body, a dropped resume) are expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, ServerState]]:
    yield from _running_server(tmp_path / "served")


def _running_server(root: Path) -> Iterator[tuple[str, ServerState]]:
    root.mkdir()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = ServerState(root=root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _serve(state: ServerState, name: str, data: bytes) -> None:
    (state.root / name).write_bytes(data)


# --- parse_headers ----------------------------------------------------------------------------------------------


def test_parse_headers() -> None:
    assert parse_headers([]) == {}
    assert parse_headers(["Authorization: Bearer a:b", "X-Empty:", " Cookie :  k=v "]) == {
        "Authorization": "Bearer a:b",
        "X-Empty": "",
        "Cookie": "k=v",
    }


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        (["Bearer secret-token"], "no ':'"),
        ([": value"], "empty or invalid name"),
        (["Bad Name: v"], "empty or invalid name"),
        (["A: 1", "a: 2"], "more than once"),
    ],
)
def test_parse_headers_errors(values: list[str], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        parse_headers(values)
    assert "secret-token" not in str(info.value)  # values are secrets: never echoed


# --- HTTP -------------------------------------------------------------------------------------------------------


def test_http_download_verifies_and_writes_sidecar(http_server, tmp_path: Path) -> None:
    url, state = http_server
    data = _payload(100_000)
    _serve(state, "a.tar", data)
    dest = tmp_path / "out" / "a.tar"

    assert download_file(f"{url}/a.tar", dest, md5=_md5(data).upper(), progress=False) == dest

    assert dest.read_bytes() == data
    assert not dest.with_name("a.tar.part").exists()
    sidecar = (tmp_path / "out" / "a.tar.md5").read_text()
    assert _md5(data) in sidecar and str(len(data)) in sidecar


def test_http_resumes_after_dropped_connection(http_server, tmp_path: Path) -> None:
    url, state = http_server
    data = _payload(300_000)
    _serve(state, "a.tar", data)
    state.cut_after, state.faults = 70_000, 2  # two drops: each retry continues from the bytes on disk

    # A chunk size dividing the cut: a partly read chunk is dropped with the error and fetched again, which is
    # correct but would make the resume offsets below depend on buffering.
    dest = download_file(f"{url}/a.tar", tmp_path / "a.tar", md5=_md5(data), progress=False, chunk_size=1000)

    assert dest.read_bytes() == data
    ranges = [r for _, r in state.requests]
    assert ranges[0] is None
    assert ranges[1] == "bytes=70000-" and ranges[2] == "bytes=140000-"
    assert len(ranges) == 3


def test_http_resumes_existing_part(http_server, tmp_path: Path) -> None:
    url, state = http_server
    data = _payload(50_000)
    _serve(state, "a.tar", data)
    (tmp_path / "a.tar.part").write_bytes(data[:12_345])

    dest = download_file(f"{url}/a.tar", tmp_path / "a.tar", md5=_md5(data), progress=False)

    assert dest.read_bytes() == data
    assert state.requests == [("/a.tar", "bytes=12345-")]


def test_http_server_ignoring_range_restarts_from_zero(http_server, tmp_path: Path) -> None:
    url, state = http_server
    state.ignore_range = True
    data = _payload(50_000)
    _serve(state, "a.tar", data)
    (tmp_path / "a.tar.part").write_bytes(b"x" * 1000)  # garbage: kept only if the restart path were wrong

    # progress=True here (to captured stderr) exercises the bar through hashing the part and a reset.
    dest = download_file(f"{url}/a.tar", tmp_path / "a.tar", md5=_md5(data), progress=True)

    assert dest.read_bytes() == data
    assert state.requests == [("/a.tar", "bytes=1000-")]


def test_http_416_means_part_complete(http_server, tmp_path: Path) -> None:
    url, state = http_server
    data = _payload(20_000)
    _serve(state, "a.tar", data)
    (tmp_path / "a.tar.part").write_bytes(data)

    dest = download_file(f"{url}/a.tar", tmp_path / "a.tar", md5=_md5(data), progress=False)

    assert dest.read_bytes() == data
    assert state.requests == [("/a.tar", "bytes=20000-")]


def test_http_gzip_content_encoding_is_not_decoded(http_server, tmp_path: Path) -> None:
    url, state = http_server
    state.extra_headers = {"Content-Encoding": "gzip"}  # how many servers label .tar.gz files
    data = gzip.compress(_payload(20_000))
    _serve(state, "devkit.tar.gz", data)

    dest = download_file(f"{url}/devkit.tar.gz", tmp_path / "devkit.tar.gz", md5=_md5(data), progress=False)

    assert dest.read_bytes() == data


def test_http_5xx_is_retried(http_server, tmp_path: Path) -> None:
    url, state = http_server
    data = _payload(10_000)
    _serve(state, "a.tar", data)
    state.fail_status, state.faults = 503, 2

    download_file(f"{url}/a.tar", tmp_path / "a.tar", md5=_md5(data), progress=False)

    assert (tmp_path / "a.tar").read_bytes() == data
    assert len(state.requests) == 3


def test_http_gives_up_after_retries_and_keeps_part(http_server, tmp_path: Path) -> None:
    url, state = http_server
    _serve(state, "a.tar", _payload(10_000))
    state.fail_status, state.faults = 500, 100

    with pytest.raises(DownloadError, match=r"after 2 retries.*HTTP 500") as info:
        download_file(f"{url}/a.tar", tmp_path / "a.tar", progress=False, retries=2)

    assert f"{url}/a.tar" in str(info.value)
    assert len(state.requests) == 3
    assert (tmp_path / "a.tar.part").exists() and not (tmp_path / "a.tar").exists()


def test_http_404_fails_at_once(http_server, tmp_path: Path) -> None:
    url, state = http_server

    with pytest.raises(DownloadError, match="404") as info:
        download_file(f"{url}/missing.tar", tmp_path / "missing.tar", progress=False)

    assert f"{url}/missing.tar" in str(info.value)
    assert info.value.status == 404
    assert len(state.requests) == 1
    assert not (tmp_path / "missing.tar").exists()


def test_http_401_names_header_option_and_headers_fix_it(http_server, tmp_path: Path) -> None:
    url, state = http_server
    state.auth = TOKEN
    data = _payload(5_000)
    _serve(state, "a.tar", data)

    with pytest.raises(DownloadError, match="--header") as info:
        download_file(f"{url}/a.tar", tmp_path / "a.tar", progress=False)
    assert info.value.status == 401 and len(state.requests) == 1

    headers = parse_headers([f"Authorization: {TOKEN}"])
    download_file(f"{url}/a.tar", tmp_path / "a.tar", md5=_md5(data), headers=headers, progress=False)
    assert (tmp_path / "a.tar").read_bytes() == data


def test_auth_headers_follow_a_redirect_only_within_the_origin(http_server, tmp_path: Path) -> None:
    url, state = http_server
    other = _running_server(tmp_path / "other")  # the same host on another port: another origin
    other_url, other_state = next(other)
    try:
        data = _payload(4_000)
        _serve(state, "b.tar", data)
        _serve(other_state, "a.tar", data)
        headers = parse_headers([f"Authorization: {TOKEN}", "X-Api-Key: key-123", "Cookie: session=abc"])
        secret = {"authorization", "x-api-key", "cookie"}
        # within the origin: /moved/b.tar -> /b.tar keeps them
        state.redirects["/moved/b.tar"] = f"{url}/b.tar"
        download_file(f"{url}/moved/b.tar", tmp_path / "b.tar", md5=_md5(data), headers=headers, progress=False)
        assert [seen["X-Api-Key"] for seen in state.headers_seen] == ["key-123", "key-123"]
        # to another port: /a.tar -> other/a.tar; the other server never sees them
        state.redirects["/a.tar"] = f"{other_url}/a.tar"
        download_file(f"{url}/a.tar", tmp_path / "a.tar", md5=_md5(data), headers=headers, progress=False)
        assert (tmp_path / "a.tar").read_bytes() == data and state.headers_seen[-1]["Cookie"] == "session=abc"
        leaked = {k for seen in other_state.headers_seen for k in seen if k.lower() in secret}
        assert len(other_state.headers_seen) == 1 and not leaked, other_state.headers_seen
        # and back: other/c.tar -> /b.tar; dropped once, never sent again on that chain
        other_state.redirects["/c.tar"] = f"{url}/b.tar"
        download_file(f"{other_url}/c.tar", tmp_path / "c.tar", md5=_md5(data), headers=headers, progress=False)
        assert not {k for k in state.headers_seen[-1] if k.lower() in secret}
    finally:
        next(other, None)


def test_checksum_mismatch_keeps_corrupt_file(http_server, tmp_path: Path) -> None:
    url, state = http_server
    data = _payload(5_000)
    _serve(state, "a.tar", data)
    wrong = "0" * 32

    with pytest.raises(ChecksumError) as info:
        download_file(f"{url}/a.tar", tmp_path / "a.tar", md5=wrong, progress=False)

    message = str(info.value)
    assert "a.tar" in message and wrong in message and _md5(data) in message
    assert "a.tar.corrupt" in message and "--no-verify" in message
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "a.tar.part").exists()
    assert (tmp_path / "a.tar.corrupt").read_bytes() == data
    assert info.value.path == tmp_path / "a.tar.corrupt"


def test_present_file_is_skipped_via_sidecar(http_server, tmp_path: Path) -> None:
    url, state = http_server
    data = _payload(5_000)
    _serve(state, "a.tar", data)
    dest = tmp_path / "a.tar"
    download_file(f"{url}/a.tar", dest, md5=_md5(data), progress=False)
    assert len(state.requests) == 1

    # Flip a byte but keep size and mtime: a re-hash would notice, a trusted sidecar does not.
    stat = dest.stat()
    dest.write_bytes(b"\xff" + data[1:])
    os.utime(dest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    download_file(f"{url}/a.tar", dest, md5=_md5(data), progress=False)
    assert len(state.requests) == 1

    # A new mtime invalidates the sidecar: the file is hashed again and the flipped byte is caught.
    os.utime(dest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ChecksumError, match="existing file"):
        download_file(f"{url}/a.tar", dest, md5=_md5(data), progress=False)
    assert len(state.requests) == 1
    assert (tmp_path / "a.tar.corrupt").exists() and not dest.exists()


def test_present_file_without_sidecar_is_hashed_once(tmp_path: Path) -> None:
    data = _payload(5_000)
    dest = tmp_path / "a.tar"
    dest.write_bytes(data)

    # The source does not exist: success proves nothing was fetched.
    download_file(str(tmp_path / "nowhere" / "a.tar"), dest, md5=_md5(data), progress=False)

    assert _md5(data) in (tmp_path / "a.tar.md5").read_text()


def test_part_being_written_elsewhere_is_refused(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    (tmp_path / "src.bin").write_bytes(b"data")
    with open(tmp_path / "a.bin.part", "ab") as other_writer:
        fcntl.flock(other_writer.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DownloadError, match="another process"):
            download_file(str(tmp_path / "src.bin"), tmp_path / "a.bin", progress=False)
    assert not (tmp_path / "a.bin").exists()


# --- local and file:// ------------------------------------------------------------------------------------------


def _fake_imagenet(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    contents = {name: _payload(3_000 + 1_000 * i, seed=i) for i, name in enumerate(IMAGENET_FILES)}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return contents


@pytest.mark.parametrize("as_uri", [False, True], ids=["folder", "file-uri"])
def test_imagenet_from_local_source(tmp_path: Path, as_uri: bool) -> None:
    src = tmp_path / "src dir"  # a space: file URIs must be percent-encoded
    contents = _fake_imagenet(src)
    source = src.as_uri() if as_uri else str(src)
    name0 = IMAGENET_FILES[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{name0}.part").write_bytes(contents[name0][:1234])  # resumed by seeking

    paths = download_imagenet(source, tmp_path / "out", md5={n: _md5(d) for n, d in contents.items()},
                              progress=False)

    assert paths == [tmp_path / "out" / name for name in IMAGENET_FILES]
    for path in paths:
        assert path.read_bytes() == contents[path.name]


def test_local_resume_appends_to_part(tmp_path: Path) -> None:
    data = _payload(8_000)
    (tmp_path / "src.bin").write_bytes(data)
    (tmp_path / "a.bin.part").write_bytes(b"y" * 100)

    # Unverified on purpose: the result shows the part was continued at byte 100, not rewritten.
    download_file(str(tmp_path / "src.bin"), tmp_path / "a.bin", progress=False)

    assert (tmp_path / "a.bin").read_bytes() == b"y" * 100 + data[100:]


def test_imagenet_published_checksums_and_no_verify(tmp_path: Path) -> None:
    src = tmp_path / "src"
    contents = _fake_imagenet(src)

    with pytest.raises(ChecksumError, match=IMAGENET_FILES[0]):
        download_imagenet(str(src), tmp_path / "checked", progress=False)

    paths = download_imagenet(str(src), tmp_path / "unchecked", verify=False, progress=False)
    assert [p.read_bytes() for p in paths] == [contents[n] for n in IMAGENET_FILES]


def test_missing_checksum_fails_before_downloading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no MD5 known for extra.tar"):
        download_imagenet(str(tmp_path), tmp_path / "out", files=["extra.tar"], progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_local_missing_and_bad_scheme(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="does not exist"):
        download_file(str(tmp_path / "none.tar"), tmp_path / "out.tar", progress=False)
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        download_file("ftp://host/a.tar", tmp_path / "out.tar", progress=False)


# --- S3 (moto server on loopback) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    import boto3

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50]
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    return client, bucket


def test_s3_imagenet_with_md5_overrides_and_resume(s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    contents = {name: _payload(3_000 + 1_000 * i, seed=i) for i, name in enumerate(IMAGENET_FILES)}
    for name, data in contents.items():
        client.put_object(Bucket=bucket, Key=f"imagenet/raw/{name}", Body=data)
    out = tmp_path / "out"
    out.mkdir()
    name1 = IMAGENET_FILES[1]
    (out / f"{name1}.part").write_bytes(contents[name1][:2_500])

    paths = download_imagenet(f"s3://{bucket}/imagenet/raw", out, md5={n: _md5(d) for n, d in contents.items()},
                              progress=False)

    assert [p.read_bytes() for p in paths] == [contents[n] for n in IMAGENET_FILES]


def test_s3_resume_uses_range(s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    data = _payload(6_000)
    client.put_object(Bucket=bucket, Key="x/a.tar", Body=data)
    (tmp_path / "a.tar.part").write_bytes(b"z" * 500)

    # Unverified on purpose: the result shows the ranged get continued at byte 500.
    download_file(f"s3://{bucket}/x/a.tar", tmp_path / "a.tar", progress=False)

    assert (tmp_path / "a.tar").read_bytes() == b"z" * 500 + data[500:]


def test_s3_missing_object(s3_bucket, tmp_path: Path) -> None:
    _, bucket = s3_bucket
    uri = f"s3://{bucket}/x/missing.tar"

    with pytest.raises(DownloadError, match="not found") as info:
        download_file(uri, tmp_path / "missing.tar", progress=False)

    assert uri in str(info.value)
