"""Fetch: open a stream of an archive's bytes, wherever it lives.

http(s) goes through urllib3 directly (fsspec's HTTP filesystem is asynchronous and heavier than
a plain streaming GET needs): redirects are followed (to http and https URLs only), transient
failures (connection errors, 429/5xx, a stall, a reset mid-body) are retried with backoff, and a
body cut short resumes with a ``Range`` request where that provably continues the same file, so
the decompressor downstream just sees one continuous stream. Local paths use ``open``; any other
URL goes through ``fsspec``, pinned to the object's version seen at open (``download/objectread.py``).
Every source stops at an overall deadline (``HUBCACHE_DOWNLOAD_DEADLINE``), however steadily bytes
arrive.

Resuming never splices two versions of a file. The first response's strong ``ETag`` (else its
``Last-Modified``) goes into ``If-Range``; the answer must be a 206 whose ``Content-Range`` starts
at the byte asked for and announces the same total, with the same validator, or a 200 with the same
strong ``ETag`` (the same file, sent from its start: the bytes already read are skipped). Anything
else, a file without a validator included, raises :class:`SourceChangedError`: the bytes already
read went downstream, so the whole download starts again from byte 0 (``core/cache.py``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, cast
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from ..core.errors import (
    DownloadError,
    HandleError,
    MissingDependencyError,
    SourceChangedError,
)
from ..core.handles import origin_of
from ..core.redact import split_credentials
from . import network
from .objectread import DEFAULT_CHUNK, open_pinned

if TYPE_CHECKING:  # urllib3 is imported where it is used: importing hubcache does not import it
    import urllib3
    from _typeshed import HasFileno, WriteableBuffer
    from urllib3.connection import HTTPConnection

    from .objectread import PinnedObject

USER_AGENT = "hubcache"
RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)
REDIRECT_STATUS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
#: The setting that bounds a whole download (named in the error).
DEADLINE_SETTING = "HUBCACHE_DOWNLOAD_DEADLINE"
CHANGED_HINT = "try again once the file on the server stops changing"
#: A read of a slow response returns what arrived within this many seconds (at least one byte)
#: instead of waiting for the whole size asked: the bytes reach the entry as they come, so
#: whoever judges a download by its temp dir growing (tensorflow_hub waiting for our lock, which
#: steals a lock whose temp dir did not grow for ``lock_file_timeout_sec``) sees its progress.
PARTIAL_AFTER = 0.2
#: A first socket read at least this large means the bytes come fast: the next reads wait for
#: the whole size asked (fewer, larger reads: less CPU per byte) while each takes less than
#: :data:`PARTIAL_AFTER`.
FAST_PIECE = 64 << 10

#: ``.source``: the HttpSource whose request this thread is making (see ``_tracked_pool``)
_requesting = threading.local()


def _pool_manager(url: str) -> urllib3.PoolManager:
    """The pools for ``url``: direct, or through the proxy the environment names for it, with the
    certificate settings it names (``download/network.py``); shared until those variables change."""
    return network.current().manager(url, _new_manager)


def _new_manager(cls: type[urllib3.PoolManager], **kwargs: Any) -> urllib3.PoolManager:
    """A ``PoolManager`` or ``ProxyManager`` (``cls``, with ``kwargs`` from network.py)."""
    import urllib3

    # maxsize: idle connections kept per host, up to twice HUBCACHE_CONNECTIONS' maximum (each
    # worker of a parallel download may have its next request open beside its current one; a
    # download over more connections than the pool keeps would open a connection per chunk).
    pool = cls(num_pools=8, maxsize=128, retries=False, **kwargs)
    pool.pool_classes_by_scheme = {"http": _tracked_pool(urllib3.HTTPConnectionPool),
                                   "https": _tracked_pool(urllib3.HTTPSConnectionPool)}
    return pool


def _tracked_pool(base: type[urllib3.HTTPConnectionPool]) -> type[urllib3.HTTPConnectionPool]:
    """``base`` whose connections tell the :class:`HttpSource` making the request which one is
    waiting for response headers: its deadline can then cut a server that trickles its headers
    (each byte within the read timeout) as it cuts one that trickles its body."""

    # A base known at run time only (the pool's own connection class): mypy cannot check it.
    class Connection(base.ConnectionCls):  # type: ignore[name-defined, misc]
        def getresponse(self, *args: Any, **kwargs: Any) -> urllib3.HTTPResponse:
            source = getattr(_requesting, "source", None)
            if source is None:
                return cast("urllib3.HTTPResponse", super().getresponse(*args, **kwargs))
            source._waiting_on(self)
            try:
                return cast("urllib3.HTTPResponse", super().getresponse(*args, **kwargs))
            finally:
                source._waiting_on(None)

    return cast("type[urllib3.HTTPConnectionPool]", type(base.__name__, (base,), {"ConnectionCls": Connection}))


class Deadline:
    """The moment a whole download must be over, shared by its retries and restarts.

    Args:
        seconds: how long the download may take, from now (``HUBCACHE_DOWNLOAD_DEADLINE``).
    """

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.at = time.monotonic() + self.seconds

    def left(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    def error(self, url: str, attempts: int = 1) -> DownloadError:
        """The error of a download still running at the deadline."""
        return DownloadError(f"the download was still running after {self.seconds:g} s, the limit for one "
                             f"download (GET {url})", url=url, attempts=attempts,
                             hint=f"raise {DEADLINE_SETTING} (seconds) if the origin is just slow")


class Source(io.RawIOBase):
    """A readable stream of an archive's bytes.

    Attributes:
        url: the URL asked for (credentials shown as ``***``).
        final_url: the URL the bytes came from, after redirects, as it may be shown and stored:
            credentials shown as ``***``, and without the query of a redirect target (signed
            URLs carry their signature there).
        total: the byte count announced by the origin, or ``None``.
        position: bytes read so far.
    """

    url: str = ""
    final_url: str = ""
    total: int | None = None
    position: int = 0

    def readable(self) -> bool:
        return True


class FileSource(Source):
    """A local file or any fsspec URL."""

    def __init__(self, url: str, fileobj: Any, total: int | None, deadline: Deadline | None = None):
        self.url = self.final_url = split_credentials(url)[0]
        self._f = fileobj
        self.total = total
        self._deadline = deadline

    def readinto(self, buffer: WriteableBuffer) -> int:
        # A slow filesystem (FUSE, NFS, a FIFO fed slowly) can trickle too; one clock read per
        # chunk is nothing next to the read itself.
        if self._deadline is not None and self._deadline.left() < 0:
            raise self._deadline.error(self.url)
        n = self._f.readinto(buffer) if hasattr(self._f, "readinto") else _readinto(self._f, buffer)
        self.position += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def _readinto(f: Any, buffer: WriteableBuffer) -> int:
    view = cast("bytearray | memoryview", buffer)  # what io hands readinto
    data = f.read(len(view))
    view[: len(data)] = data
    return len(data)


class HttpSource(Source):
    """A streaming HTTP GET that retries, resumes the same file only, and stops at a deadline.

    Args:
        url: the URL. Credentials in it (``https://user:password@host/...``) are sent as HTTP basic
            auth to that host only (not across a redirect to another host), and never shown.
        timeout: seconds for connecting and for each read.
        retries: how many retries after the first attempt, for the whole download.
        backoff: first retry delay in seconds (doubles each time, at most 10 s).
        on_retry: called with ``(attempt, error, offset)`` before each retry.
        deadline: when the whole download must be over; at that moment the connection is shut
            down and reading raises :class:`DownloadError` naming ``HUBCACHE_DOWNLOAD_DEADLINE``.

    Raises:
        SourceChangedError: (from reading) the file changed, or the rest of it cannot be shown to
            come from the same file: start again from byte 0.
    """

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 4, backoff: float = 0.25,
                 on_retry: Callable[[int, str, int], None] | None = None, deadline: Deadline | None = None):
        shown, userinfo = split_credentials(url)
        self.url = self.final_url = shown
        self._target = url  # what is requested: the URL without its credentials
        self._headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if userinfo:  # as urllib and requests do: percent-decoded, UTF-8, base64
            self._target = _without_userinfo(url)
            user, _, password = userinfo.partition(":")
            token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._on_retry = on_retry
        self._attempts = 0
        self._via = ""  # the proxy of the last request, as shown (network.proxy_of)
        self._etag: str | None = None  # the first response's strong ETag
        self._modified: str | None = None  # its Last-Modified
        self._validator: str | None = None  # what If-Range carries: the ETag, else the date
        self._limit = sys.maxsize  # bytes beyond this are more than the origin announced
        #: the first answer was a 200 announcing ``Accept-Ranges: bytes`` (see ``download/parallel.py``)
        self.ranges = False
        self._resolved = ""  # the URL the first answer came from, its query kept: never shown
        self._deadline = deadline
        self._expired = False
        self._fast = False  # the bytes come faster than they are read (see _receive)
        self._failed: Exception | None = None  # a read's error, raised by the next one (see _receive)
        self._guard = threading.Lock()
        self._live: urllib3.BaseHTTPResponse | None = None  # the response being read, for the watchdog
        # the connection waiting for response headers, for the watchdog
        self._pending: HTTPConnection | None = None
        self._watchdog: threading.Timer | None = None
        if deadline is not None:
            self._watchdog = threading.Timer(max(0.0, deadline.left()), self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()
        try:
            self._response = self._request(0)
        except BaseException:
            self._stop_watchdog()
            raise

    # -- errors ---------------------------------------------------------------------------------

    def _where(self) -> str:
        via = f", via the proxy {self._via}" if self._via else ""
        return f"GET {self.url}, {self._attempts} attempt{'s' if self._attempts != 1 else ''}{via}"

    def _fail(self, message: str, status: int | None = None, hint: str | None = None) -> DownloadError:
        return DownloadError(f"{message} ({self._where()})", url=self.url, status=status, attempts=self._attempts,
                             hint=hint)

    def _changed(self, message: str, response: urllib3.BaseHTTPResponse | None = None,
                 hint: str = CHANGED_HINT) -> SourceChangedError:
        if response is not None:
            _discard_response(response)
        return SourceChangedError(f"{message} ({self._where()})", url=self.url, attempts=self._attempts,
                                  hint=hint)

    def _deadline_error(self) -> DownloadError:
        assert self._deadline is not None
        return self._deadline.error(self.url, self._attempts)

    # -- the deadline -------------------------------------------------------------------------

    def _expire(self) -> None:
        """The watchdog: at the deadline, shut the connection down so a blocked read returns."""
        with self._guard:
            self._expired = True
            response, pending = self._live, self._pending
        if response is not None:
            _shutdown(getattr(response, "connection", None))
            _shutdown_socket(_body_socket(response))
        _shutdown(pending)

    def _waiting_on(self, connection: HTTPConnection | None) -> None:
        """Called (by the pool's connections) while the headers of a response are awaited."""
        with self._guard:
            self._pending = connection
            expired = self._expired
        if expired:
            _shutdown(connection)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _check_deadline(self) -> None:
        if self._deadline is not None and (self._expired or self._deadline.left() <= 0):
            raise self._deadline_error()

    # -- connection -------------------------------------------------------------------------

    def _wait_before_retry(self, error: str, offset: int, status: int | None = None) -> None:
        if self._attempts > self._retries:
            raise self._fail(error, status)
        if self._on_retry is not None:
            self._on_retry(self._attempts, error, offset)
        delay = min(10.0, self._backoff * 2 ** (self._attempts - 1))
        if self._deadline is not None:
            delay = min(delay, max(0.0, self._deadline.left()))
        self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        """The wait before a retry (``download/parallel.py`` makes it end early when a download stops)."""
        time.sleep(seconds)

    def _get(self, headers: dict[str, str]) -> tuple[urllib3.BaseHTTPResponse, str, int]:
        """One GET of the URL, following redirects by hand: only to http(s) URLs, without the
        credentials once the host changes, and without urllib3 logging each redirect target
        (signed URLs)."""
        import urllib3

        url, hops = self._target, 0
        timeout = self._timeout
        if self._deadline is not None:
            timeout = max(0.001, min(timeout, self._deadline.left()))
        while True:
            pool = _pool_manager(url)  # each hop: another host may be in NO_PROXY
            self._via = network.proxy_of(pool)
            _requesting.source = self
            try:
                response = pool.request(
                    "GET", url, headers=headers, preload_content=False, decode_content=False,
                    redirect=False, retries=False,
                    timeout=urllib3.Timeout(connect=timeout, read=self._timeout))
            finally:
                _requesting.source = None
            location = response.headers.get("Location") if response.status in REDIRECT_STATUS else None
            if not location:
                return response, url, hops
            _discard_response(response)
            hops += 1
            if hops > MAX_REDIRECTS:
                raise self._fail("too many redirects")
            target = urljoin(url, location)
            scheme = urlsplit(target).scheme.lower()
            if scheme not in ("http", "https"):
                shown = f"{scheme}://" if "://" in target else f"{scheme}:"
                raise self._fail(f"the server redirected to a {shown} URL; only http and https redirects are "
                                 "followed", status=response.status)
            try:
                urllib3.util.parse_url(target)
            except urllib3.exceptions.LocationValueError:
                raise self._fail(f"the server redirected to an invalid URL ({_location_text(location)})",
                                 status=response.status) from None
            if "Authorization" in headers and origin_of(target) != origin_of(url):
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
            url = target

    def _request(self, offset: int) -> urllib3.BaseHTTPResponse:
        import urllib3

        headers = dict(self._headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = self._validator or ""
        while True:
            self._check_deadline()
            self._attempts += 1
            try:
                response, url, hops = self._get(headers)
            except urllib3.exceptions.LocationValueError as error:  # a malformed URL is not transient
                raise self._fail(f"not a valid URL: {error}") from None
            except (urllib3.exceptions.HTTPError, OSError) as error:
                self._check_deadline()
                fatal = network.unrecoverable(error)  # a refused certificate: no retry mends it
                if fatal is not None:
                    raise self._fail(fatal[0], hint=fatal[1]) from None
                reason = network.connection_problem(error)
                self._wait_before_retry(f"cannot connect: {reason}", offset)
                continue
            status = response.status
            if status in RETRY_STATUS:
                _discard_response(response)
                self._wait_before_retry(f"HTTP {status} {response.reason or ''}".rstrip(), offset, status)
                continue
            if offset and status == 416:  # the range starts past the end: the file got shorter
                raise self._changed("the file changed on the server during the download (HTTP 416 to a resume)",
                                    response)
            if status >= 300:
                _discard_response(response)
                raise self._fail(f"HTTP {status} {response.reason or ''}".rstrip(), status)
            self._go_live(response)
            # Shown and stored: no credentials, nor the query of a redirect target (a signature).
            self.final_url = urlunsplit(urlsplit(_without_userinfo(url))._replace(query="", fragment="")) \
                if hops else self.url
            if offset == 0:
                self._resolved = url
                accept = response.headers.get("Accept-Ranges") or ""
                self.ranges = status == 200 and "bytes" in (t.strip().lower() for t in accept.split(","))
                self.total = _length(response)
                self._limit = self.total if self.total is not None else sys.maxsize
                etag = response.headers.get("ETag")
                self._etag = etag if etag and not etag.startswith("W/") else None
                self._modified = response.headers.get("Last-Modified")
                self._validator = self._etag or self._modified
                return response
            self._check_resume(response, offset)
            return response

    def _go_live(self, response: urllib3.BaseHTTPResponse) -> None:
        """Make ``response`` the one whose body this source reads, unless the deadline passed
        meanwhile (its watchdog cuts the live response; one not yet live would escape it)."""
        with self._guard:
            if self._expired:
                _discard_response(response)
                raise self._deadline_error()
            self._live = response

    def _check_resume(self, response: urllib3.BaseHTTPResponse, offset: int) -> None:
        """Accept the answer to a resume only if it continues the same file from ``offset``."""
        headers = response.headers
        etag, modified = headers.get("ETag"), headers.get("Last-Modified")
        # The answer must name the validator of the first one (RFC 9110 requires a 206 to carry
        # what a 200 would): a server that ignored If-Range and sent another version says so here.
        if self._etag is not None and etag != self._etag:
            raise self._changed(f"the file changed on the server during the download (ETag {self._etag} "
                                f"became {etag or 'none'})", response)
        if self._etag is None and modified != self._modified:
            raise self._changed(f"the file changed on the server during the download (Last-Modified "
                                f"{self._modified} became {modified or 'none'})", response)
        if response.status == 206:
            announced = headers.get("Content-Range")
            parsed = _content_range(announced)
            length = _length(response)
            problem = None
            if parsed is None:
                problem = f"its Content-Range is {announced!r}"
            elif parsed[0] != offset:
                problem = f"it starts at byte {parsed[0]}, not {offset}"
            elif self.total is not None and parsed[2] != self.total:
                problem = f"it announces {parsed[2]} bytes in all, the first answer {self.total}"
            elif parsed[2] is not None and parsed[1] != parsed[2] - 1:
                problem = f"it ends at byte {parsed[1]}, not at the end ({parsed[2] - 1})"
            elif length is not None and length != parsed[1] - parsed[0] + 1:
                problem = f"its Content-Length {length} does not match its Content-Range {announced!r}"
            if problem is not None:
                raise self._changed(f"the server's answer to a resume from byte {offset} does not continue "
                                    f"the download: {problem}", response,
                                    hint="the server answers range requests wrongly; try again on a steadier "
                                         "connection, so that no resume is needed")
            if self.total is None and parsed is not None and parsed[2] is not None:
                self.total = parsed[2]
            self._limit = self.total if self.total is not None else sys.maxsize
            return
        if response.status == 200 and self._etag is not None and etag == self._etag and (
                self.total is None or _length(response) in (None, self.total)):
            # The same file (the same strong ETag), sent whole: skip what was already read.
            self._skip(response, offset)
            return
        raise self._changed(f"the server answered a resume from byte {offset} with HTTP {response.status} "
                            "and nothing that shows it is the same file", response,
                            hint="the file may have changed, or the server ignores range requests; try again")

    def _skip(self, response: urllib3.BaseHTTPResponse, count: int) -> None:
        import urllib3

        try:
            while count:
                chunk = response.read(min(count, 1 << 20))
                if not chunk:
                    raise urllib3.exceptions.ProtocolError("the connection closed")
                count -= len(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            self._check_deadline()
            raise self._fail(f"interrupted while skipping the bytes already read: {_error_text(error)}") from None

    # -- reading ------------------------------------------------------------------------------

    def readinto(self, buffer: WriteableBuffer) -> int:
        return readinto_by_read(self, buffer)

    def read(self, size: int = -1) -> bytes:
        # urllib3 hands out bytes (its own readinto is read + copy): returning them as they are
        # skips RawIOBase.read's fresh buffer and two copies of every byte, which made receiving
        # 1 GiB take three times the CPU here (the page faults of the buffers cost most).
        import urllib3

        if size is None or size < 0:
            return self.readall()
        while True:
            try:
                data = self._receive(size)
                n = len(data)
                if n == 0 and size:
                    if self._expired:
                        raise self._deadline_error()
                    if self.total is not None and self.position < self.total:
                        raise urllib3.exceptions.ProtocolError(
                            f"connection closed after {self.position} of {self.total} bytes")
                self.position += n
                if self.position > self._limit:  # only a body without Content-Length can overrun
                    raise self._fail(f"the server sent more bytes than the {self.total} it announced")
                return data
            except (urllib3.exceptions.HTTPError, OSError) as error:
                if self._expired:
                    raise self._deadline_error() from None
                _release(self._response)
                self._wait_before_retry(f"interrupted after {self.position} bytes: {_error_text(error)}",
                                        self.position)
                if self._validator is None:
                    raise self._changed("the download was interrupted, and the server sent no ETag or "
                                        "Last-Modified by which a resume could be shown to continue the same file",
                                        hint="such a download starts over when cut; try again on a steadier "
                                             "connection")
                self._response = self._request(self.position)

    def _receive(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body; empty only at the end of the body.

        While bytes come fast (a first socket read of at least :data:`FAST_PIECE` bytes), each
        read waits for the whole size (the fewest, largest reads: the least CPU per byte) until
        one takes longer than :data:`PARTIAL_AFTER`; otherwise a read returns what arrived within
        :data:`PARTIAL_AFTER` seconds of its first byte.
        """
        import urllib3

        if self._failed is not None:
            error, self._failed = self._failed, None
            raise error
        if self._fast:
            started = time.monotonic()
            data = self._response.read(size)
            self._fast = time.monotonic() - started < PARTIAL_AFTER
            return data
        read1 = getattr(self._response, "read1", None)
        if read1 is None:  # pragma: no cover - every urllib3 2.x response has it
            return self._response.read(size)
        data = cast(bytes, read1(size))
        if len(data) >= size or not data:
            return data
        self._fast = len(data) >= FAST_PIECE
        parts, got = [data], len(data)
        until = time.monotonic() + PARTIAL_AFTER
        while got < size and time.monotonic() < until:
            try:
                more = cast(bytes, read1(size - got))
            except (urllib3.exceptions.HTTPError, OSError) as error:
                self._failed = error  # the bytes got count (a resume starts after them): raised next
                break
            if not more:
                break
            parts.append(more)
            got += len(more)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def cut(self) -> None:
        """Close without reading the rest of the body: its connection is closed, not reused."""
        response = getattr(self, "_response", None)
        if response is not None and not self.closed:
            response.close()
        self.close()

    def close(self) -> None:
        if not self.closed:
            self._stop_watchdog()
            response = getattr(self, "_response", None)
            if response is not None:
                _release(response)
        super().close()


def readinto_by_read(source: Source, buffer: WriteableBuffer) -> int:
    """``readinto`` for a source whose ``read`` is the primitive (it hands out the bytes objects
    it received, without copying them): read, then copy into ``buffer``."""
    view = cast("bytearray | memoryview", buffer)  # what io hands readinto
    data = source.read(len(view))
    view[:len(data)] = data
    return len(data)


def _length(response: urllib3.BaseHTTPResponse) -> int | None:
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes START-END/TOTAL`` as ``(start, end, total)`` (``total`` None for ``*``)."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].strip().partition("/")
    start, _, end = span.partition("-")
    if not (start.isdigit() and end.isdigit()) or not (total.isdigit() or total == "*"):
        return None
    return int(start), int(end), int(total) if total.isdigit() else None


def _shutdown(connection: object) -> None:
    """Shut down a connection's socket so a read blocked on it returns (from another thread)."""
    _shutdown_socket(getattr(connection, "sock", None))


def _shutdown_socket(sock: object) -> None:
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            # socket.socket's own shutdown: SSLSocket's would drop its SSL object under the reader.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _body_socket(response: urllib3.BaseHTTPResponse) -> object:
    """The socket a response's body is read from: its connection lets go of it when the answer
    says ``Connection: close`` (an HTTP/1.0 server, many proxies), http.client's file does not."""
    fp = getattr(getattr(response, "_fp", None), "fp", None)  # http.client's buffered socket file
    return getattr(getattr(fp, "raw", None), "_sock", None)


def _discard_response(response: urllib3.BaseHTTPResponse) -> None:
    """Let go of a response whose body is not wanted: a small one is drained so its connection
    can be reused; a large or unannounced one (perhaps a whole other version) closes it."""
    length = _length(response)
    if length is not None and length <= 64 << 10:
        with contextlib.suppress(Exception):
            response.drain_conn()
    _release(response)


def _release(response: urllib3.BaseHTTPResponse) -> None:
    """Give a response's connection back to its pool: as it is if the body was read to its end,
    else closed. The unread rest of a body can sit in the response's buffer, where the pool's
    check of the socket does not see it; the next request on that connection then failed
    (``ResponseNotReady``): a retry, counted as a second restart of a parallel download."""
    if not response.closed:
        response.close()
    response.release_conn()


def _error_text(error: BaseException) -> str:
    """A short reason: urllib3 wraps the useful text in tuples of nested exceptions."""
    first = error.args[0] if error.args else error
    text = first if isinstance(first, str) else str(error)
    return text.split(": IncompleteRead")[0].split("(\'")[0] or type(error).__name__


def _location_text(location: str) -> str:
    """A redirect target fit for a message: its scheme and host at most (no path or query,
    which may carry a signature)."""
    parts = urlsplit(location)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..." if parts.scheme else "a malformed Location"


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def open_source(url: str, *, timeout: float = 60.0, retries: int = 4,
                on_retry: Callable[[int, str, int], None] | None = None,
                deadline: Deadline | None = None, connections: int = 1,
                chunk_size: int = DEFAULT_CHUNK) -> Source:
    """Open a byte stream of ``url``.

    Args:
        url: what to read; credentials in it are used, never shown.
        timeout: seconds for connecting and for each read (HTTP).
        retries: retries of transient failures (HTTP).
        on_retry: called with ``(attempt, error, offset)`` before each retry (HTTP).
        deadline: when the whole download must be over.
        connections, chunk_size: an fsspec object (``gs://``, ``s3://``, ...) of at least two
            chunks is read with this many ranged reads of ``chunk_size`` bytes at once
            (``objectread``); http(s) goes parallel through ``download/parallel.py`` instead.

    Raises:
        DownloadError: if it cannot be fetched (after retries, for HTTP).
        MissingDependencyError: if the URL's scheme needs a package that is not installed.
    """
    lower = url.lower()
    shown = split_credentials(url)[0]
    if lower.startswith(("http://", "https://")):
        return HttpSource(url, timeout=timeout, retries=retries, on_retry=on_retry, deadline=deadline)
    if "://" not in url or lower.startswith("file://"):
        path = url[7:] if lower.startswith("file://") else url
        try:
            f: io.FileIO | PinnedObject = open(path, "rb", buffering=0)
            size = _fstat_size(f)
        except OSError as error:
            raise DownloadError(f"cannot read {path}: {error.strerror or error}", url=shown) from None
        return FileSource(url, f, size, deadline)
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as error:
        scheme = url.split("://", 1)[0]
        extra = {"gs": "gcs", "gcs": "gcs"}.get(scheme)
        hint = f"pip install 'hubcache[{extra}]'" if extra else f"install the fsspec implementation for {scheme}://"
        raise MissingDependencyError(f"cannot open {scheme}:// URLs: {error}", hint=hint) from None
    except ValueError as error:  # fsspec: "Protocol not known"
        raise HandleError(f"no installed filesystem reads {url.split('://', 1)[0]}:// URLs ({error})",
                          hint="check the handle's scheme, or install the fsspec implementation for it") from None
    try:
        # One version for the whole read (objectread): a replaced object is a restart, never a splice.
        f = open_pinned(fs, path, shown, connections=connections, chunk_size=chunk_size)
        size = f.size
    except SourceChangedError:
        raise
    except FileNotFoundError:
        raise DownloadError(f"no such file: {shown}", url=shown) from None
    except Exception as error:
        raise DownloadError(f"cannot read {shown}: {error}", url=shown) from None
    return FileSource(url, f, size, deadline)


def _fstat_size(f: HasFileno) -> int | None:
    import os

    try:
        return os.fstat(f.fileno()).st_size
    except OSError:
        return None
