"""Locate: map a handle to where its bytes are.

:func:`locate` is the built-in answer; :mod:`hubcache.plugins.locator` is the built-in
``hubcache_locate`` implementation that returns it, last, so a plugin can claim any handle shape first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import HandleError
from .handles import Handle
from .mirrors import mirrored_archive

Kind = Literal["archive", "directory", "pointer"]


@dataclass(frozen=True)
class Location:
    """Where a handle's bytes are.

    Attributes:
        url: what to fetch (archive), the directory itself (directory), or the URL that answers
            with a pointer to a directory (pointer: tfhub.dev's ``?tf-hub-format=uncompressed``).
        kind: ``archive``, ``directory`` or ``pointer``.
    """

    url: str
    kind: Kind


def with_query(url: str, **params: str) -> str:
    """Add query parameters to a URL, keeping those it already has byte for byte (re-encoding
    them could break a signed URL: ``%20`` would become ``+``)."""
    parts = urlsplit(url)
    names = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    extra = urlencode([(name, value) for name, value in params.items() if name not in names])
    if not extra:
        return url
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))


def locate(handle: Handle, load_format: str) -> Location:
    """The built-in answer for every handle shape hubcache knows.

    Raises:
        HandleError: for a local path that does not exist.
    """
    if handle.is_local:
        path = os.path.abspath(handle.local_path)
        if os.path.isdir(path):
            return Location(path, "directory")
        if os.path.isfile(path):
            return Location(path, "archive")
        raise HandleError(f"no such file or directory: {path}",
                          hint="check the path, or use a URL")
    if handle.scheme in ("http", "https"):
        mirrored = mirrored_archive(handle.url) if load_format != "UNCOMPRESSED" else None
        if mirrored is not None:  # before the suffix test, as in tensorflow_hub
            return Location(mirrored, "archive")
        if handle.is_archive_url:
            return Location(handle.url, "archive")
        # A tfhub.dev-style model handle: the server picks the representation.
        if load_format == "UNCOMPRESSED":
            return Location(with_query(handle.url, **{"tf-hub-format": "uncompressed"}), "pointer")
        return Location(with_query(handle.url, **{"tf-hub-format": "compressed"}), "archive")
    # Any other fsspec URL: an archive by its suffix, otherwise a directory.
    return Location(handle.url, "archive" if handle.is_archive_url else "directory")

