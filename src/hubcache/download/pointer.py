"""Follow tfhub.dev's pointer to an uncompressed model.

``GET <handle>?tf-hub-format=uncompressed`` is answered with ``303 See Other`` whose *body* (not a
``Location`` header) is the ``gs://`` directory holding the model, uncompressed. Ordinary
redirects (301, 302, 307, 308) on the way are followed; transient failures (connection errors,
429, 5xx) are retried with backoff, as downloads are (:mod:`hubcache.download.fetch`).
"""

from __future__ import annotations

import re
import time
from urllib.parse import urljoin

from ..core.errors import DownloadError
from . import network
from .fetch import RETRY_STATUS, USER_AGENT, _pool_manager

#: ``gs://bucket/path``: a bucket name (3-222 chars of [a-z0-9._-]) and an optional path.
_GS_PATH = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^\s]*)?$")
_REDIRECTS = (301, 302, 307, 308)
_MAX_BODY = 4096


def follow_pointer(url: str, *, timeout: float = 60.0, retries: int = 4, backoff: float = 0.25) -> str:
    """Return the ``gs://`` directory that ``url`` (a ``?tf-hub-format=uncompressed`` URL) names.

    Args:
        url: the pointer URL.
        timeout: seconds for connecting and for each read.
        retries: retries of transient failures.
        backoff: first retry delay in seconds (doubles each time, at most 10 s).

    Raises:
        DownloadError: the server could not be reached, answered something other than 303, or
            its 303 body is not a ``gs://`` path.
    """
    import urllib3

    attempts = 0
    redirects = 0
    current = url
    while True:
        attempts += 1
        error: str | None = None
        status: int | None = None
        try:
            response = _pool_manager(current).request(
                "GET", current, headers={"User-Agent": USER_AGENT}, redirect=False, retries=False,
                preload_content=False, timeout=urllib3.Timeout(connect=timeout, read=timeout))
            try:
                status = response.status
                # One byte past the cap tells a body that is too long from one that fits.
                body = response.read(_MAX_BODY + 1) if status == 303 else b""
                location = response.headers.get("Location")
            finally:
                # Closed, not drained: an endless or huge body must not keep us reading.
                response.close()
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            fatal = network.unrecoverable(exc)  # a refused certificate: no retry mends it
            if fatal is not None:
                raise DownloadError(f"{fatal[0]} (GET {current})", url=current, attempts=attempts,
                                    hint=fatal[1]) from None
            error = f"cannot connect: {network.connection_problem(exc)}"
        if error is None and status in RETRY_STATUS:
            error = f"HTTP {status}"
        if error is not None:
            if attempts > retries:
                raise DownloadError(f"{error} (GET {current}, {attempts} attempts)", url=current,
                                    status=status, attempts=attempts)
            time.sleep(min(10.0, backoff * 2 ** (attempts - 1)))
            continue
        if status in _REDIRECTS and location:
            redirects += 1
            if redirects > 10:
                raise DownloadError(f"too many redirects (GET {url})", url=url, status=status)
            target = urljoin(current, location)
            if not target.lower().startswith(("http://", "https://")):
                # Not retried: a redirect to file:// (or any other scheme) is the server's answer.
                raise DownloadError(f"{current} redirects to a {target.split(':', 1)[0]!r} URL; only "
                                    "http(s) redirects are followed", url=current, status=status,
                                    attempts=attempts)
            current = target
            continue
        if status == 303 and len(body) > _MAX_BODY:
            raise DownloadError(f"the server's 303 answer to {current} is longer than {_MAX_BODY} bytes; "
                                "it should be one gs:// path", url=current, status=303, attempts=attempts,
                                hint="the server does not speak tfhub.dev's uncompressed protocol; "
                                     "set TFHUB_MODEL_LOAD_FORMAT=COMPRESSED")
        if status == 303:
            text = body.decode("utf-8", "replace").strip()
            if not _GS_PATH.match(text):
                shown = text[:80] + ("..." if len(text) > 80 else "")
                raise DownloadError(f"the server's 303 answer to {current} should name a gs:// directory, "
                                    f"but says {shown!r}", url=current, status=303, attempts=attempts,
                                    hint="the server does not speak tfhub.dev's uncompressed protocol; "
                                         "set TFHUB_MODEL_LOAD_FORMAT=COMPRESSED")
            return text
        if status == 200:
            raise DownloadError(f"asked {current} for the uncompressed model, the server answered 200 instead "
                                "of 303 with a gs:// path", url=current, status=200, attempts=attempts,
                                hint="it does not serve uncompressed models; set TFHUB_MODEL_LOAD_FORMAT=COMPRESSED")
        raise DownloadError(f"asked {current} for the uncompressed model, the server answered HTTP {status} "
                            "instead of 303 with a gs:// path", url=current, status=status, attempts=attempts)
