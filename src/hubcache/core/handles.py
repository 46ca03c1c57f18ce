"""Model handles: parsing, the cache key, and an optional pinned digest.

A handle is the string user code passes to :func:`hubcache.resolve`. The cache key is
``sha1(handle)`` exactly as tensorflow_hub computes it, so cache directories are shared with it.
A handle may end in a pin, ``#sha256=<hex>``; the pin is not part of the key (pinning an existing
handle keeps its cache entry) but the archive bytes must match it.

A URL handle may carry credentials (``https://user:password@host/m.tar.gz``). They are part of the
key, as for tensorflow_hub, and are sent to that host as HTTP basic auth; everything else sees the
handle with ``***`` in their place (:attr:`Handle.raw` and :attr:`Handle.url`), so they never reach
a descriptor, manifest, event, log line or error message.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import HandleError
from .redact import HIDDEN, redact, split_credentials

#: Suffixes that mark a URL as an archive, longest first.
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".tgz", ".tzst", ".tbz2", ".txz", ".tar")

_PIN = re.compile(r"#(sha256|sha1|md5)=([0-9a-fA-F]+)$")
_DIGEST_LENGTHS = {"sha256": 64, "sha1": 40, "md5": 32}


@dataclass(frozen=True)
class Handle:
    """A parsed model handle.

    Attributes:
        raw: the string as the user wrote it (pin included), credentials shown as ``***``.
        url: the handle without its pin, credentials shown as ``***``: what is located, shown
            and stored.
        scheme: ``""`` for a plain local path, else the URL scheme (``https``, ``gs``, ``file``...).
        pin: ``(algorithm, hexdigest)`` when the handle pins its archive's digest.
        userinfo: the URL's credentials (``user:password``, as written), or ``""``. Never shown;
            :meth:`reveal` puts them back into a URL on the handle's own host, for fetching.
    """

    raw: str
    url: str
    scheme: str
    pin: tuple[str, str] | None = None
    userinfo: str = field(default="", repr=False, compare=False)

    @property
    def key(self) -> str:
        """The cache key: sha1 of the unpinned handle (credentials included), as tensorflow_hub
        computes it."""
        return cache_key(self.reveal(self.url) if self.userinfo else self.url)

    def reveal(self, url: str) -> str:
        """``url`` with this handle's credentials in place of ``***`` when ``url`` is on the
        handle's own host (same scheme, host and port); any other URL is returned unchanged, so
        credentials never go to a host they were not given for."""
        if not self.userinfo:
            return url
        shown, hidden = split_credentials(url)
        if hidden != HIDDEN or origin_of(shown) != origin_of(self.url):
            return url
        scheme, rest = shown.split("://", 1)
        return f"{scheme}://{self.userinfo}{rest[len(HIDDEN):]}"

    @property
    def is_local(self) -> bool:
        """True for plain paths and ``file://`` URLs."""
        return self.scheme in ("", "file")

    @property
    def local_path(self) -> str:
        """The filesystem path of a local handle."""
        if self.scheme == "file":
            return urlsplit(self.url).path
        return os.path.expanduser(self.url)

    @property
    def is_archive_url(self) -> bool:
        """True when the path part ends in a known archive suffix."""
        path = urlsplit(self.url).path if self.scheme else self.url
        return path.lower().endswith(ARCHIVE_SUFFIXES)


def has_pin(text: str) -> bool:
    """True if ``text`` (a handle as written) ends in a pin such as ``#sha256=<hex>``."""
    return _PIN.search(text.strip()) is not None


def origin_of(url: str) -> tuple[str, str | None, int | None]:
    """A URL's origin: (scheme, host, port), the port defaulted for http and https. Credentials
    are given to one origin only."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, parts.hostname, port or {"http": 80, "https": 443}.get(scheme)


def cache_key(handle: str) -> str:
    """Return the cache key of a handle: ``sha1(handle.encode("utf-8")).hexdigest()``."""
    return hashlib.sha1(handle.encode("utf-8")).hexdigest()


def parse_handle(handle: object) -> Handle:
    """Parse and validate a handle.

    Args:
        handle: what the user passed.

    Returns:
        The parsed :class:`Handle`.

    Raises:
        HandleError: if ``handle`` is not a non-empty string of valid UTF-8 text, carries a
            malformed pin, or hides its credentials (``***``).
    """
    if not isinstance(handle, str):
        raise HandleError(
            f"a handle must be a string, got {type(handle).__name__}",
            hint="pass a URL such as https://tfhub.dev/google/spice/2 or a path",
        )
    text = handle.strip()
    if not text:
        raise HandleError("the handle is empty", hint="pass a URL or a path")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        # Python hands a command-line argument or file name that is not UTF-8 over with each bad
        # byte as a lone surrogate (U+DC80..U+DCFF): the cache key (sha1 of the UTF-8 text) and
        # every place the handle is written down need real text.
        char = ord(text[error.start])
        what = f"the byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise HandleError(
            f"the handle is not valid UTF-8 text ({what} at position {error.start})",
            handle=handle, hint="rename the file (or link to it) with a UTF-8 name") from None
    pin = None
    match = _PIN.search(text)
    if match:
        algorithm, digest = match.group(1).lower(), match.group(2).lower()
        if len(digest) != _DIGEST_LENGTHS[algorithm]:
            raise HandleError(
                f"the pinned {algorithm} digest has {len(digest)} hex digits, expected {_DIGEST_LENGTHS[algorithm]}",
                handle=handle,
            )
        pin = (algorithm, digest)
        text = text[: match.start()]
    scheme = _scheme_of(text)
    userinfo = ""
    if scheme:
        text, userinfo = split_credentials(text)
        if userinfo == HIDDEN:
            raise HandleError(
                "the handle's credentials are hidden (***), as hubcache shows them",
                handle=handle, hint="give the handle with its real user and password, or the entry's cache key")
    return Handle(raw=redact(handle) if userinfo else handle, url=text, scheme=scheme, pin=pin,
                  userinfo=userinfo)


def _scheme_of(text: str) -> str:
    # "C:\\x" style drive letters are paths, not one-letter schemes.
    if "://" not in text:
        return ""
    scheme = text.split("://", 1)[0].lower()
    return scheme if len(scheme) > 1 else ""
