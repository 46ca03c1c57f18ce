"""Fetch: open a stream of an archive's bytes, wherever it lives.

http(s) goes through urllib3 directly (fsspec's HTTP filesystem is asynchronous and heavier than
a plain streaming GET needs): redirects are followed, transient failures (connection errors,
429/5xx, a stall, a reset mid-body) are retried with backoff, and a body cut short resumes with a
``Range`` request where the server supports it, so the decompressor downstream just sees one
continuous stream. Local paths use ``open``; any other URL goes through ``fsspec``.
"""

from __future__ import annotations

import io
import threading
import time
from typing import Any, Callable
from urllib.parse import urljoin

from .errors import DownloadError, HandleError, MissingDependencyError

USER_AGENT = "hubcache"
RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)

_pool = None
_pool_lock = threading.Lock()


def _pool_manager():
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                import urllib3

                _pool = urllib3.PoolManager(num_pools=8, maxsize=16, retries=False)
    return _pool


class Source(io.RawIOBase):
    """A readable stream of an archive's bytes.

    Attributes:
        url: the URL asked for.
        final_url: the URL the bytes came from, after redirects.
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

    def __init__(self, url: str, fileobj: Any, total: int | None):
        self.url = self.final_url = url
        self._f = fileobj
        self.total = total

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer) if hasattr(self._f, "readinto") else _readinto(self._f, buffer)
        self.position += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def _readinto(f, buffer) -> int:
    data = f.read(len(buffer))
    buffer[: len(data)] = data
    return len(data)


class HttpSource(Source):
    """A streaming HTTP GET that retries and resumes.

    Args:
        url: the URL.
        timeout: seconds for connecting and for each read.
        retries: how many retries after the first attempt, for the whole download.
        backoff: first retry delay in seconds (doubles each time, at most 10 s).
        on_retry: called with ``(attempt, error, offset)`` before each retry.
    """

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 4, backoff: float = 0.25,
                 on_retry: Callable[[int, str, int], None] | None = None):
        self.url = self.final_url = url
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._on_retry = on_retry
        self._attempts = 0
        self._validator: str | None = None
        self._response = self._request(0)

    # -- connection -------------------------------------------------------------------------

    def _fail(self, message: str, status: int | None = None) -> DownloadError:
        return DownloadError(f"{message} (GET {self.url}, {self._attempts} attempt"
                             f"{'s' if self._attempts != 1 else ''})",
                             url=self.url, status=status, attempts=self._attempts)

    def _wait_before_retry(self, error: str, offset: int, status: int | None = None) -> None:
        if self._attempts > self._retries:
            raise self._fail(error, status)
        if self._on_retry is not None:
            self._on_retry(self._attempts, error, offset)
        time.sleep(min(10.0, self._backoff * 2 ** (self._attempts - 1)))

    def _request(self, offset: int):
        import urllib3

        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self._validator:
                headers["If-Range"] = self._validator
        while True:
            self._attempts += 1
            try:
                response = _pool_manager().request(
                    "GET", self.url, headers=headers, preload_content=False, decode_content=False,
                    redirect=True, retries=urllib3.Retry(total=None, connect=0, read=0, redirect=10, status=0,
                                                         raise_on_redirect=True),
                    timeout=urllib3.Timeout(connect=self._timeout, read=self._timeout))
            except urllib3.exceptions.MaxRetryError as error:
                reason = error.reason
                if isinstance(reason, urllib3.exceptions.ResponseError) and "redirect" in str(reason):
                    raise self._fail("too many redirects") from None
                self._wait_before_retry(f"cannot connect: {reason}", offset)
                continue
            except (urllib3.exceptions.HTTPError, OSError) as error:
                self._wait_before_retry(f"cannot connect: {error}", offset)
                continue
            status = response.status
            if status in RETRY_STATUS:
                response.drain_conn()
                response.release_conn()
                self._wait_before_retry(f"HTTP {status} {response.reason or ''}".rstrip(), offset, status)
                continue
            if status >= 400:
                response.drain_conn()
                response.release_conn()
                raise self._fail(f"HTTP {status} {response.reason or ''}".rstrip(), status)
            # urllib3 gives only the path when there was no redirect: make it absolute.
            self.final_url = urljoin(self.url, response.geturl() or self.url)
            if offset == 0:
                length = response.headers.get("Content-Length")
                self.total = int(length) if length and length.isdigit() else None
                etag = response.headers.get("ETag")
                self._validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
                return response
            if status == 206:
                return response
            # The server ignored the range (or the resource changed): skip what we already have.
            length = response.headers.get("Content-Length")
            if self.total is not None and length and length.isdigit() and int(length) != self.total:
                response.release_conn()
                raise self._fail("the file changed on the server during the download")
            _discard(response, offset)
            return response

    # -- reading ------------------------------------------------------------------------------

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        # urllib3 hands out bytes (its own readinto is read + copy): returning them as they are
        # skips RawIOBase.read's fresh buffer and two copies of every byte, which made receiving
        # 1 GiB take three times the CPU here (the page faults of the buffers cost most).
        import urllib3

        if size is None or size < 0:
            return self.readall()
        while True:
            try:
                data = self._response.read(size)
                n = len(data)
                if n == 0 and size and self.total is not None and self.position < self.total:
                    raise urllib3.exceptions.ProtocolError(
                        f"connection closed after {self.position} of {self.total} bytes")
                self.position += n
                return data
            except (urllib3.exceptions.HTTPError, OSError) as error:
                if isinstance(error, DownloadError):
                    raise
                self._response.release_conn()
                self._wait_before_retry(f"interrupted after {self.position} bytes: {_describe(error)}",
                                        self.position)
                self._response = self._request(self.position)

    def close(self) -> None:
        if not self.closed:
            response = getattr(self, "_response", None)
            if response is not None:
                response.release_conn()
        super().close()


def _describe(error: BaseException) -> str:
    """A short reason: urllib3 wraps the useful text in tuples of nested exceptions."""
    first = error.args[0] if error.args else error
    text = first if isinstance(first, str) else str(error)
    return text.split(": IncompleteRead")[0].split("(\'")[0] or type(error).__name__


def _discard(response, count: int) -> None:
    while count:
        chunk = response.read(min(count, 1 << 20))
        if not chunk:
            raise DownloadError("connection closed while skipping already-read bytes", url=response.geturl() or "")
        count -= len(chunk)


def open_source(url: str, *, timeout: float = 60.0, retries: int = 4,
                on_retry: Callable[[int, str, int], None] | None = None) -> Source:
    """Open a byte stream of ``url``.

    Raises:
        DownloadError: if it cannot be fetched (after retries, for HTTP).
        MissingDependencyError: if the URL's scheme needs a package that is not installed.
    """
    lower = url.lower()
    if lower.startswith(("http://", "https://")):
        return HttpSource(url, timeout=timeout, retries=retries, on_retry=on_retry)
    if "://" not in url or lower.startswith("file://"):
        path = url[7:] if lower.startswith("file://") else url
        try:
            f = open(path, "rb", buffering=0)
            size = _fstat_size(f)
        except OSError as error:
            raise DownloadError(f"cannot read {path}: {error.strerror or error}", url=url) from None
        return FileSource(url, f, size)
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
        f = fs.open(path, "rb", block_size=1 << 22)
        size = getattr(f, "size", None)
    except FileNotFoundError:
        raise DownloadError(f"no such file: {url}", url=url) from None
    except Exception as error:
        raise DownloadError(f"cannot read {url}: {error}", url=url) from None
    return FileSource(url, f, size)


def _fstat_size(f) -> int | None:
    import os

    try:
        return os.fstat(f.fileno()).st_size
    except OSError:
        return None
