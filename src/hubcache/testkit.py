"""Builders and servers for testing hubcache and its backends: models, archives (good and
hostile), a local origin server that injects faults, an isolated environment, and an object
replaced in the middle of a download. Public through :mod:`hubcache.testing`, which adds the
conformance suite (:mod:`hubcache.conformance`, built on this module); nothing here touches the
network beyond 127.0.0.1 or needs pytest."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import random
import struct
import tarfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import SplitResult, parse_qs, urlsplit

from .plugins.markers import hookimpl

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only (pytest is not needed here)
    import pytest
    from _typeshed import WriteableBuffer

    from .core.events import Event
    from .download.fetch import Source


FORMATS = ("tar", "gz", "zst", "bz2", "xz")
SUFFIX = {"tar": ".tar", "gz": ".tar.gz", "zst": ".tar.zst", "bz2": ".tar.bz2", "xz": ".tar.xz"}


# -- models and archives ------------------------------------------------------------------------


def build_model_dir(path: str | os.PathLike[str], *, weights_bytes: int = 64 << 10, shards: int = 1,
                    seed: int = 0) -> str:
    """Write a SavedModel-shaped directory (not loadable by TensorFlow; see ``hubcache.tf`` tests
    for real SavedModels): ``saved_model.pb``, ``variables/`` with an index and data shards of
    float32-like random bytes, ``assets/``, and an empty directory.
    """
    rng = random.Random(seed)
    path = os.fspath(path)
    os.makedirs(os.path.join(path, "variables"), exist_ok=True)
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"\x08\x01\x12" + rng.randbytes(2000))
    with open(os.path.join(path, "fingerprint.pb"), "wb") as f:
        f.write(rng.randbytes(64))
    with open(os.path.join(path, "variables", "variables.index"), "wb") as f:
        f.write(rng.randbytes(300))
    per_shard = max(1, weights_bytes // shards)
    for i in range(shards):
        name = f"variables.data-{i:05d}-of-{shards:05d}"
        with open(os.path.join(path, "variables", name), "wb") as f:
            f.write(rng.randbytes(per_shard))
    with open(os.path.join(path, "assets", "vocab.txt"), "w") as f:
        f.write("\n".join(f"token{i}" for i in range(100)))
    return path


def compress(data: bytes, fmt: str) -> bytes:
    """Compress a tar stream into ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "tar":
        return data
    if fmt == "gz":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if fmt == "zst":
        import zstandard

        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    if fmt == "bz2":
        return bz2.compress(data)
    if fmt == "xz":
        return lzma.compress(data)
    raise ValueError(fmt)


def tar_directory(path: str | os.PathLike[str], *, prefix: str = "") -> bytes:
    """A tar stream of a directory's contents (members relative to it, as tfhub archives are)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = os.fspath(path)
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=prefix + name)
    return buf.getvalue()


def archive_of(path: str | os.PathLike[str], fmt: str = "gz") -> bytes:
    """The bytes of an archive of a directory, in ``fmt``."""
    return compress(tar_directory(path), fmt)


def read_tree(path: str, fs: Any = None) -> dict[str, bytes]:
    """Every regular file under a local or fsspec directory, as ``{relative path: bytes}``.

    Args:
        path: a local path or fsspec URL.
        fs: the filesystem to read it with (default: the one fsspec builds for the URL).
    """
    import fsspec

    if fs is None:
        fs, root = fsspec.core.url_to_fs(path)
    else:
        root = fs._strip_protocol(path)
    root = root.rstrip("/")
    out = {}
    for full in fs.find(root):
        rel = full[len(root) + 1:]
        out[rel] = fs.cat_file(full)
    return out


def tree_of(path: str) -> dict[str, bytes]:
    """Every regular file under a local directory, as ``{relative path: bytes}``."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            with open(full, "rb") as f:
                out[os.path.relpath(full, path).replace(os.sep, "/")] = f.read()
    return out


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


def hostile_archives(*, max_bytes: int = 1 << 20, max_members: int = 1000) -> dict[str, bytes]:
    """Archives hubcache must refuse, by name. Sizes are chosen against the given limits."""
    ok = _file("saved_model.pb", b"model")
    archives = {
        "absolute_path": _tar([ok, _file("/tmp/hubcache-escape.txt")]),
        "dotdot": _tar([ok, _file("../escape.txt")]),
        "dotdot_nested": _tar([ok, _file("variables/../../escape.txt")]),
        "symlink_escape": _tar([ok, _special("evil", tarfile.SYMTYPE, linkname="../../etc/passwd")]),
        "symlink_absolute": _tar([ok, _special("evil", tarfile.SYMTYPE, linkname="/etc/passwd")]),
        "symlink_write_through": _tar([ok, _special("dir", tarfile.SYMTYPE, linkname="."),
                                       _file("dir/x.txt")]),
        "hardlink_escape": _tar([ok, _special("evil", tarfile.LNKTYPE, linkname="/etc/passwd")]),
        "hardlink_outside": _tar([ok, _special("evil", tarfile.LNKTYPE, linkname="../outside")]),
        "char_device": _tar([ok, _special("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)]),
        "block_device": _tar([ok, _special("blk", tarfile.BLKTYPE, devmajor=8, devminor=0)]),
        "fifo": _tar([ok, _special("pipe", tarfile.FIFOTYPE)]),
    }
    archives = {name: compress(data, "gz") for name, data in archives.items()}
    # A bomb: zeros compress ~1000:1, so a small download unpacks past the limit.
    archives["bomb"] = compress(_tar([ok, _file("weights.bin", bytes(max_bytes + 1))]), "gz")
    archives["too_many_members"] = compress(
        _tar([_file(f"f{i}", b"") for i in range(max_members + 1)]), "gz")
    good = _tar([ok, _file("variables/variables.data-00000-of-00001", random.Random(1).randbytes(20000))])
    gz, zst = compress(good, "gz"), compress(good, "zst")
    archives["truncated_gz"] = gz[: len(gz) // 2]
    archives["truncated_zst"] = zst[: len(zst) // 2]
    bad_crc = bytearray(gz)
    bad_crc[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    archives["bad_gzip_crc"] = bytes(bad_crc)
    archives["html"] = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>" * 20
    archives["empty"] = b""
    archives["not_a_tar"] = compress(b"just some text, not a tar archive\n" * 100, "gz")
    archives["random_bytes"] = random.Random(2).randbytes(4096)
    return archives


# -- isolation -------------------------------------------------------------------------------------

#: Settings that change what hubcache selects or does; :func:`isolate` clears them.
SETTINGS = ("HUBCACHE_BACKEND", "TFHUB_CACHE_DIR", "TFHUB_MODEL_LOAD_FORMAT", "HUBCACHE_OFFLINE",
            "HUBCACHE_MAX_SIZE", "HUBCACHE_DISABLE_PLUGINS", "TFHUB_DOWNLOAD_PROGRESS", "HUBCACHE_PINS",
            "HUBCACHE_DOWNLOAD_DEADLINE", "HUBCACHE_PATCH_TFHUB", "HUBCACHE_CONNECTIONS", "HUBCACHE_CHUNK_SIZE")


def isolate(monkeypatch: pytest.MonkeyPatch, root: str | os.PathLike[str]) -> None:
    """Give hubcache a private world under ``root`` for one test.

    ``TMPDIR`` (the ``tmp`` backend) and the user cache dir (``home``) move under ``root``,
    inherited hubcache settings are cleared, and so are the proxy and certificate variables
    (``download/network.py``), progress bars are off, cloud metadata servers are
    out of reach (nothing leaves the machine), and memoised resolves and
    backend instances are forgotten. Everything is restored by pytest's ``monkeypatch``; call
    ``hubcache.core.resolver.clear_memo()`` after the test too if you resolved in-process.
    """
    import tempfile

    from .core.resolver import clear_memo
    from .download.network import VARIABLES as NETWORK_SETTINGS

    root = os.fspath(root)
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    # A proxy or CA of the developer's would change (or carry off) requests to loopback servers.
    for name in NETWORK_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
    monkeypatch.setenv("TMPDIR", os.path.join(root, "tmp"))
    monkeypatch.setenv("XDG_CACHE_HOME", os.path.join(root, "home-cache"))
    monkeypatch.setenv("HUBCACHE_NO_PROGRESS", "1")
    # Cloud SDKs without credentials probe their metadata servers (169.254.169.254): a test must
    # never leave the machine, so google-auth gets a closed loopback port and botocore no IMDS.
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(tempfile, "tempdir", None)  # make tempfile re-read TMPDIR
    clear_memo()


# -- a local origin server --------------------------------------------------------------------------


#: A failure to inject (see :class:`Route`): its kind, then that kind's arguments.
Fault = tuple[Any, ...]


@dataclass
class Route:
    """What the origin answers for one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = True
    #: a tfhub.dev-style model: {"compressed": redirect target, "uncompressed": 303 body}
    tfhub: dict[str, str] | None = None
    #: failures to inject, consumed in order, one per request: ("status", code),
    #: ("cut", after_bytes) (clean close), ("reset", after_bytes[, pause]) (TCP RST, ``pause``
    #: seconds after those bytes: 0.05 by default),
    #: ("stall", after_bytes, seconds), ("delay", seconds): answer normally,
    #: but only after ``seconds`` (keeps a download in flight, e.g. to race other processes);
    #: for resumes: ("change", new_body): the object is replaced (a new ETag and Last-Modified),
    #: then this request is answered normally; ("ignore_range",): answer 200 with the whole
    #: body even to a Range request; ("bad_range", start_delta, total_delta): answer a Range
    #: request with a 206 whose Content-Range start (and the bytes sent) and total are off by
    #: these; ("extra", n): send ``n`` bytes beyond the announced Content-Length;
    #: ("unframed", n): no Content-Length, close-delimited, ``n`` bytes beyond the body (a 206
    #: keeps its Content-Range, so the client knows where it should have ended);
    #: ("slow_headers", seconds): a header line that never ends, one byte every ``seconds``;
    #: for range requests (``bytes=A-B`` is honoured): ("long_range", n) / ("short_range", n):
    #: a 206 whose Content-Range (and body) ends ``n`` bytes after / before the end asked for;
    #: ("body_delta", n): a 206 with the right Content-Range whose body (and Content-Length)
    #: has ``n`` bytes more (random) or, negative, fewer; ("length", n): announce a
    #: Content-Length of ``n`` (and a Content-Range total of ``n``), send the real body, close
    faults: list[Fault] = field(default_factory=list)
    #: failures for range requests starting at a given byte only: {start: [fault, ...]}, consumed
    #: in order by the requests for that start (before :attr:`faults`); see :meth:`OriginServer.fail_range`
    range_faults: dict[int, list[Fault]] = field(default_factory=dict)
    #: seconds before each answer (a round trip to a distant origin)
    latency: float = 0.0
    #: answer 503 to a request that would make more than this many being answered at once (an
    #: origin limiting connections), or ``None``
    max_active: int | None = None
    #: send the body at this many bytes per second (``None``: as fast as possible)
    rate: float | None = None
    #: bytes per write when ``rate`` is set (small values make a trickle)
    step: int = 16 << 10
    #: the validators sent: "etag" (strong), "weak" (W/ ETag), "last-modified", "none"
    validator: str = "etag"
    #: honour If-Range (False: a server that serves the range of whatever it now has)
    if_range: bool = True
    #: the object's version, bumped by the "change" fault (it moves Last-Modified by an hour)
    version: int = 0
    #: the ``Authorization`` header a request must carry (else 401), or ``None``
    auth: str | None = None


@dataclass
class Request:
    """One request the origin saw."""

    path: str
    query: str
    headers: dict[str, str]
    status: int = 0
    #: body bytes written to the client (a resumed download re-sends only the rest)
    sent: int = 0
    #: the client's port: one per connection (requests on a kept-alive connection share it)
    client: int = 0
    #: ``time.monotonic()`` when the request arrived, and when its answer was written (0: not yet)
    arrived: float = 0.0
    finished: float = 0.0


class OriginServer:
    """A threaded HTTP server on 127.0.0.1 (free port) that serves archives, redirects and
    tfhub.dev-style model handles, counts requests, and injects failures on demand.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: GETs being answered now, and the most at once
        self.active = 0
        self.peak_active = 0
        #: open client connections now, and the most at once; the client ports of those open
        self.connections = 0
        self.peak_connections = 0
        self.open_clients: set[int] = set()

    # -- set-up -----------------------------------------------------------------------------

    def add(self, path: str, body: bytes, *, status: int = 200, ranges: bool = True,
            headers: dict[str, str] | None = None) -> str:
        """Serve ``body`` at ``path``; returns its URL."""
        self.routes[path] = Route(body=body, status=status, ranges=ranges, headers=dict(headers or {}))
        return self.url(path)

    def redirect(self, path: str, to: str, status: int = 302) -> str:
        """Answer ``path`` with a redirect to ``to`` (a path or URL); returns the URL of ``path``."""
        location = to if "://" in to else self.url(to)
        self.routes[path] = Route(status=status, headers={"Location": location})
        return self.url(path)

    def add_tfhub_model(self, path: str, archive: bytes, *, fmt: str = "gz",
                        uncompressed: str | None = None) -> str:
        """Serve a tfhub.dev-style handle: ``?tf-hub-format=compressed`` redirects to the archive,
        ``?tf-hub-format=uncompressed`` answers 303 with ``uncompressed`` as its body (a gs://
        path), and the bare handle answers with an HTML page. Returns the handle URL."""
        archive_path = f"/storage{path}{SUFFIX[fmt]}"
        self.add(archive_path, archive)
        self.routes[path] = Route(tfhub={"compressed": self.url(archive_path),
                                         "uncompressed": uncompressed or ""})
        return self.url(path)

    def fail(self, path: str, *faults: Fault) -> None:
        """Inject failures on the next requests of ``path`` (see :class:`Route`)."""
        self.routes[path].faults.extend(faults)

    def fail_range(self, path: str, start: int, *faults: Fault) -> None:
        """Inject failures on the next range requests of ``path`` that start at byte ``start``
        (the other requests, however many run at once, are answered normally)."""
        self.routes[path].range_faults.setdefault(start, []).extend(faults)

    def network(self, path: str, rate: float | None, latency: float = 0.0, *, step: int = 64 << 10) -> None:
        """A distant origin for ``path``: each answer (hence each connection: one answer at a
        time) sent at ``rate`` bytes per second, after ``latency`` seconds."""
        self.throttle(path, rate, step=step)
        self.routes[path].latency = latency

    def reset_peaks(self) -> None:
        with self._lock:
            self.peak_active, self.peak_connections = self.active, self.connections

    def throttle(self, path: str, rate: float | None, *, step: int | None = None) -> None:
        """Send the body of ``path`` at ``rate`` bytes per second (``None``: full speed), so a
        download lasts long enough to be observed, interrupted or killed; ``step`` bytes per
        write (default 16 KiB; a few bytes every few milliseconds is a trickle that never
        trips a per-read timeout)."""
        route = self.routes[path]
        route.rate = rate
        if step is not None:
            route.step = step

    def validators(self, path: str, kind: str = "etag", *, if_range: bool = True) -> None:
        """Choose the validators ``path`` sends (``etag``, ``weak``, ``last-modified`` or
        ``none``) and whether it honours ``If-Range`` (``False``: it serves a requested range
        of whatever it now holds, as a buggy server or cache might)."""
        assert kind in ("etag", "weak", "last-modified", "none"), kind
        route = self.routes[path]
        route.validator, route.if_range = kind, if_range

    def require_auth(self, path: str, user: str, password: str) -> None:
        """Answer ``path`` only to requests with HTTP basic auth ``user:password`` (else 401)."""
        import base64

        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.routes[path].auth = f"Basic {token}"

    def url(self, path: str) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def count(self, path: str | None = None) -> int:
        """Requests seen for ``path`` (all paths if ``None``)."""
        with self._lock:
            return sum(1 for r in self.requests if path is None or r.path == path)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> OriginServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        # A short poll: stop() waits up to one poll interval (the default 0.5 s, per test).
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="origin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OriginServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_handler(origin: OriginServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        def handle(self) -> None:
            with origin._lock:
                origin.connections += 1
                origin.peak_connections = max(origin.peak_connections, origin.connections)
                origin.open_clients.add(self.client_address[1])
            try:
                super().handle()
            except (ConnectionResetError, BrokenPipeError):
                pass  # the client hung up (e.g. it gave up on a body it does not want): not news
            finally:
                with origin._lock:
                    origin.connections -= 1
                    origin.open_clients.discard(self.client_address[1])

        def do_GET(self) -> None:
            with origin._lock:
                origin.active += 1
                origin.peak_active = max(origin.peak_active, origin.active)
            try:
                self._get()
            finally:
                with origin._lock:
                    origin.active -= 1

        def _get(self) -> None:
            parts = urlsplit(self.path)
            record = Request(parts.path, parts.query, dict(self.headers), client=self.client_address[1],
                             arrived=time.monotonic())
            try:
                self._answer(record, parts)
            finally:
                record.finished = time.monotonic()

        def _answer(self, record: Request, parts: SplitResult) -> None:
            with origin._lock:
                origin.requests.append(record)
            route = origin.routes.get(parts.path)
            if route is None:
                return self._send(record, 404, b"not found", {"Content-Type": "text/plain"})
            if route.auth is not None and self.headers.get("Authorization") != route.auth:
                return self._send(record, 401, b"sign in", {"Content-Type": "text/plain",
                                                           "WWW-Authenticate": 'Basic realm="models"'})
            with origin._lock:
                busy = route.max_active is not None and origin.active > route.max_active
            if busy:
                return self._send(record, 503, b"too many connections", {"Content-Type": "text/plain"})
            if route.latency:
                time.sleep(route.latency)
            fault = None
            asked = self.headers.get("Range", "")
            with origin._lock:
                if asked.startswith("bytes=") and asked[6:].split("-", 1)[0].isdigit() \
                        and route.range_faults.get(int(asked[6:].split("-", 1)[0])):
                    fault = route.range_faults[int(asked[6:].split("-", 1)[0])].pop(0)
                elif route.faults:
                    fault = route.faults.pop(0)
            if fault and fault[0] == "status":
                return self._send(record, fault[1], b"injected failure", {"Content-Type": "text/plain"})
            if fault and fault[0] == "slow_headers":
                return self._slow_headers(record, fault[1])
            if fault and fault[0] == "delay":
                time.sleep(fault[1])
                fault = None
            if fault and fault[0] == "change":
                with origin._lock:
                    route.body = fault[1]
                    route.version += 1
                fault = None
            if route.tfhub is not None:
                fmt = parse_qs(parts.query).get("tf-hub-format", [""])[0]
                if fmt == "compressed":
                    return self._send(record, 302, b"", {"Location": route.tfhub["compressed"]})
                if fmt == "uncompressed":
                    return self._send(record, 303, route.tfhub["uncompressed"].encode(),
                                      {"Content-Type": "text/plain"})
                return self._send(record, 200, b"<!DOCTYPE html><html>a model page</html>",
                                  {"Content-Type": "text/html"})
            body, status, headers = route.body, route.status, dict(route.headers)
            headers.setdefault("Content-Type", "application/octet-stream")
            etag = f'"{len(body)}-{hash(body) & 0xFFFFFFFF:x}"'
            if route.validator == "etag":
                headers["ETag"] = etag
            elif route.validator == "weak":
                headers["ETag"] = "W/" + etag
            elif route.validator == "last-modified":
                headers["Last-Modified"] = formatdate(1_700_000_000 + 3600 * route.version, usegmt=True)
            start, stop = 0, len(body)  # the bytes sent: body[start:stop]
            range_header = self.headers.get("Range")
            ignore = fault is not None and fault[0] == "ignore_range"
            if (route.ranges and not ignore and status == 200 and range_header
                    and range_header.startswith("bytes=")):
                first, _, last = range_header[6:].partition("-")
                start = int(first)
                if last.strip():
                    stop = min(len(body), int(last) + 1)
                if_range = self.headers.get("If-Range")
                # A strong ETag or a Last-Modified date matches; a weak ETag never does (RFC 9110).
                current = headers.get("ETag") if route.validator == "etag" else headers.get("Last-Modified")
                if if_range is None or not route.if_range or if_range == current:
                    status = 206
                    total = len(body)
                    if fault and fault[0] == "bad_range":
                        start, total = start + fault[1], total + fault[2]
                    elif fault and fault[0] == "long_range":
                        stop = min(len(body), stop + fault[1])
                    elif fault and fault[0] == "short_range":
                        stop -= fault[1]
                    elif fault and fault[0] == "length":
                        total = fault[1]
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
                else:
                    start, stop = 0, len(body)
            if route.ranges:
                headers["Accept-Ranges"] = "bytes"
            sent = body[start:stop]
            if fault and fault[0] == "body_delta":
                sent = sent + random.Random(7).randbytes(fault[1]) if fault[1] > 0 else sent[:fault[1]]
            self._send(record, status, sent, headers, fault, route.rate, route.step)

        def _slow_headers(self, record: Request, interval: float) -> None:
            # A header line that never ends, one byte every ``interval`` seconds (at most 10 min).
            record.status = 200
            self.close_connection = True
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(int(600 / max(interval, 0.001))):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(interval)
            except OSError:
                pass

        def _send(self, record: Request, status: int, body: bytes, headers: dict[str, str],
                  fault: Fault | None = None, rate: float | None = None, step: int = 16 << 10) -> None:
            record.status = status
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if fault and fault[0] == "unframed":
                self.send_header("Connection", "close")
                self.close_connection = True
            elif fault and fault[0] == "length":  # a lie: the real body follows, then the close
                self.send_header("Content-Length", str(fault[1]))
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if fault and fault[0] in ("extra", "unframed"):
                body += random.Random(fault[1]).randbytes(fault[1])  # beyond what was announced
            if fault and fault[0] == "reset":
                import socket

                self.wfile.write(body[: fault[1]])
                self.wfile.flush()
                record.sent = len(body[: fault[1]])
                # Let the bytes leave, and the client read them: an RST discards what is queued.
                time.sleep(fault[2] if len(fault) > 2 else 0.05)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if fault and fault[0] == "cut":
                self.wfile.write(body[: fault[1]])
                self.wfile.flush()
                record.sent = len(body[: fault[1]])
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if fault and fault[0] == "stall":
                self.wfile.write(body[: fault[1]])
                self.wfile.flush()
                record.sent = len(body[: fault[1]])
                time.sleep(fault[2])
                self.close_connection = True
                return
            view = memoryview(body)
            step = step if rate else 1 << 20
            began = time.monotonic()
            try:
                for i in range(0, len(body), step):
                    self.wfile.write(view[i:i + step])
                    record.sent += len(view[i:i + step])
                    if rate:  # paced against the clock, so a busy machine does not slow it further
                        self.wfile.flush()
                        time.sleep(max(0.0, began + record.sent / rate - time.monotonic()))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler


# -- real host names, served on loopback ------------------------------------------------------


@contextlib.contextmanager
def instances_of(cls: type) -> Iterator[list[Any]]:
    """Every instance of ``cls`` built inside the ``with`` block, in order (a spy on its
    ``__init__``, which still runs): a test checks which reader a code path really used::

        with instances_of(objectread.ParallelRanges) as built:
            hubcache.resolve(url)
        assert built and built[0].connections == 8
    """
    built: list[Any] = []
    own = vars(cls).get("__init__")  # None: inherited, and inherited again afterwards
    real = getattr(cls, "__init__")

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        built.append(self)

    setattr(cls, "__init__", init)
    try:
        yield built
    finally:
        if own is None:
            delattr(cls, "__init__")
        else:
            setattr(cls, "__init__", own)


@contextlib.contextmanager
def routed_hosts(routes: dict[str, str]) -> Iterator[None]:
    """Send hubcache's HTTP requests for some origins to others, for tests only (in this
    process): a request for a URL that starts with a key of ``routes`` goes to that key's value
    plus the rest of the URL instead, redirect targets included, while hubcache itself keeps
    seeing the URLs as written (handles, cache keys, ``Location`` headers, what it records).

    The real hosts (tfhub.dev, www.kaggle.com, hub.tensorflow.google.cn, storage.googleapis.com)
    cannot be reached from a test, nor served on loopback under their names and ports; routing
    each to a path prefix on one :class:`OriginServer` lets that server answer as they do::

        with routed_hosts({"https://tfhub.dev/": origin.url("/tfhub.dev/")}):
            hubcache.resolve("https://tfhub.dev/google/spice/2")   # GET /tfhub.dev/google/spice/2?...

    It replaces hubcache's connection pools for the ``with`` block (``hubcache.download.fetch``); it
    is not a setting, so nothing outside a test can turn it on.
    """
    import urllib3

    from .download import fetch, pointer

    class RoutedPoolManager(urllib3.PoolManager):
        def urlopen(self, method: str, url: str, *args: Any, **kw: Any) -> urllib3.BaseHTTPResponse:
            for prefix, target in routes.items():
                if url.startswith(prefix):
                    url = target + url[len(prefix):]
                    break
            return super().urlopen(method, url, *args, **kw)

    routed = fetch._new_manager(RoutedPoolManager)
    # Every module that asks fetch for a pool (fetch itself, the pointer reader) gets this one.
    users = [module for module in (fetch, pointer) if hasattr(module, "_pool_manager")]
    saved = [module._pool_manager for module in users]
    for module in users:
        module._pool_manager = lambda url: routed  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, pool_manager in zip(users, saved):
            module._pool_manager = pool_manager  # type: ignore[attr-defined]
        routed.clear()


# -- an object replaced in the middle of a download ----------------------------------------------

def same_layout_models(root: str | os.PathLike[str], count: int = 3, *, weights_bytes: int = 12 << 20) -> list[str]:
    """``count`` models with the same layout (file names and sizes) and different bytes, down to
    the mtimes in their archives: a splice of two of their plain tar archives is itself a valid
    tar archive, whose digest is neither's (what a read that is not pinned to one version of an
    object would cache)."""
    made = []
    for i in range(count):
        path = build_model_dir(os.path.join(os.fspath(root), f"v{i}"), weights_bytes=weights_bytes,
                               shards=3, seed=i)
        for dirpath, dirs, files in os.walk(path):
            for name in dirs + files:
                os.utime(os.path.join(dirpath, name), (1_600_000_000 + i, 1_600_000_000 + i))
        made.append(path)
    return made


class ReplaceMidRead:
    """Writes the next archive over a download's object once ``after`` bytes of the download went
    downstream (the old version's bytes are in the pipeline; the rest is still to be read). The
    download's source is the real one; only its ``readinto`` is watched. A hubcache plugin: it
    records events through the public ``hubcache_event`` hook. Use :func:`replacing_mid_read`.

    Attributes:
        done: replacements written so far.
        events: the events seen.
    """

    def __init__(self, write: Callable[[bytes], None], replacements: list[bytes], after: int = 64 << 10):
        self.write = write
        self.replacements = list(replacements)
        self.after = after
        self.done = 0
        self.events: list[Event] = []

    def watch(self, source: Source) -> Source:
        read, armed = source.readinto, [True]

        def readinto(buffer: WriteableBuffer) -> int:
            n = read(buffer)
            if armed[0] and source.position >= self.after and self.replacements:
                armed[0] = False
                self.write(self.replacements.pop(0))
                self.done += 1
            return n

        source.readinto = readinto  # type: ignore[method-assign]  # this one instance's reads are watched
        return source

    @hookimpl
    def hubcache_event(self, event: Event) -> None:
        self.events.append(event)

    def restarts(self) -> list[Event]:
        """The downloads started again from byte 0."""
        return [e for e in self.events if e.kind == "download_retry" and e.data.get("offset") == 0]


@contextlib.contextmanager
def replacing_mid_read(write: Callable[[bytes], None], replacements: list[bytes],
                       after: int = 64 << 10) -> Iterator[ReplaceMidRead]:
    """While the block runs, each download (one after the other) has its object replaced by the
    next of ``replacements`` (``write(data)`` writes it, e.g. ``fs.pipe_file(path, data)``) once
    ``after`` of its bytes went downstream."""
    from .core import cache
    from .plugins.registry import get_registry

    plugin = ReplaceMidRead(write, replacements, after)
    registry = get_registry()
    name = f"hubcache-testing-replace-mid-read-{id(plugin)}"
    registry.pm.register(plugin, name=name)
    # Replaced where cache.py looks it up (cache.py imports it from fetch.py; it is not cache's API).
    real_open_source: Callable[..., Source] = getattr(cache, "open_source")
    setattr(cache, "open_source", lambda *a, **k: plugin.watch(real_open_source(*a, **k)))
    try:
        yield plugin
    finally:
        setattr(cache, "open_source", real_open_source)
        registry.pm.unregister(name=name)
