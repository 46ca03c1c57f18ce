"""Model handles: parsing, the cache key, and an optional pinned digest.

A handle is the string user code passes to :func:`hubcache.resolve`. The cache key is
``sha1(handle)`` exactly as tensorflow_hub computes it, so cache directories are shared with it.
A handle may end in a pin, ``#sha256=<hex>``; the pin is not part of the key (pinning an existing
handle keeps its cache entry) but the archive bytes must match it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import HandleError

#: Suffixes that mark a URL as an archive, longest first.
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".tgz", ".tzst", ".tbz2", ".txz", ".tar")

_PIN = re.compile(r"#(sha256|sha1|md5)=([0-9a-fA-F]+)$")
_DIGEST_LENGTHS = {"sha256": 64, "sha1": 40, "md5": 32}


@dataclass(frozen=True)
class Handle:
    """A parsed model handle.

    Attributes:
        raw: the string as the user wrote it (pin included).
        url: the handle without its pin; what is fetched and what the key is computed from.
        scheme: ``""`` for a plain local path, else the URL scheme (``https``, ``gs``, ``file``...).
        pin: ``(algorithm, hexdigest)`` when the handle pins its archive's digest.
    """

    raw: str
    url: str
    scheme: str
    pin: tuple[str, str] | None = None

    @property
    def key(self) -> str:
        """The cache key: sha1 of the unpinned handle, as tensorflow_hub computes it."""
        return cache_key(self.url)

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
        HandleError: if ``handle`` is not a non-empty string or carries a malformed pin.
    """
    if not isinstance(handle, str):
        raise HandleError(
            f"a handle must be a string, got {type(handle).__name__}",
            hint="pass a URL such as https://tfhub.dev/google/spice/2 or a path",
        )
    text = handle.strip()
    if not text:
        raise HandleError("the handle is empty", hint="pass a URL or a path")
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
    return Handle(raw=handle, url=text, scheme=scheme, pin=pin)


def _scheme_of(text: str) -> str:
    # "C:\\x" style drive letters are paths, not one-letter schemes.
    if "://" not in text:
        return ""
    scheme = text.split("://", 1)[0].lower()
    return scheme if len(scheme) > 1 else ""
