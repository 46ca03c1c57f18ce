"""Pins given in configuration: ``HUBCACHE_PINS`` names a file of ``HANDLE DIGEST`` lines.

A pin in the handle itself (``...model.tar.gz#sha256=<hex>``) changes user code; a pins file
pins the handles user code already has, e.g. a lock file checked in next to a training script::

    # handle                                        digest (sha256=HEX, or a bare 64-hex SHA-256)
    https://tfhub.dev/google/spice/2                 sha256=6d3f...
    https://example.com/models/encoder.tar.zst       9a1c...

Blank lines and ``#`` comments are ignored. The digest is that of the archive bytes as served
(hashed while streaming, before decompression), as for a pin in the handle. A handle that carries
its own pin must agree with the file. The file is re-read when its size or mtime changes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading

from .config import Config
from .errors import ConfigError
from .handles import Handle

ENV_PINS = "HUBCACHE_PINS"
_LENGTHS = {"sha256": 64, "sha1": 40, "md5": 32}
_DIGEST = re.compile(r"^(?:(sha256|sha1|md5)[=:])?([0-9a-fA-F]+)$")

_cache: dict[str, tuple[tuple[int, int], dict[str, tuple[str, str, int]]]] = {}
_cache_lock = threading.Lock()


def parse_pins(text: str, source: str = ENV_PINS) -> dict[str, tuple[str, str, int]]:
    """Parse a pins file: ``{handle: (algorithm, hexdigest, line number)}``.

    Raises:
        ConfigError: naming the file and line of the first malformed line.
    """
    pins: dict[str, tuple[str, str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        match = _DIGEST.match(fields[-1]) if len(fields) == 2 else None
        if match is None:
            raise ConfigError(f"{source}:{number}: expected `HANDLE sha256=HEX`, got {line!r}")
        algorithm = (match.group(1) or "sha256").lower()
        digest = match.group(2).lower()
        if len(digest) != _LENGTHS[algorithm]:
            raise ConfigError(f"{source}:{number}: the {algorithm} digest has {len(digest)} hex digits, "
                              f"expected {_LENGTHS[algorithm]}")
        handle = fields[0]
        previous = pins.get(handle)
        if previous is not None and previous[:2] != (algorithm, digest):
            raise ConfigError(f"{source}:{number}: {handle} is pinned twice, differently (see line {previous[2]})")
        pins[handle] = (algorithm, digest, number)
    return pins


def load_pins(path: str) -> dict[str, tuple[str, str, int]]:
    """The pins of the file at ``path`` (parsed once per change of the file).

    Raises:
        ConfigError: if the file cannot be read or has a malformed line.
    """
    try:
        st = os.stat(path)
    except OSError as error:
        raise ConfigError(f"{ENV_PINS}={path!r}: {error.strerror or error}",
                          hint="point it at a file of `HANDLE sha256=HEX` lines, or unset it") from None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{ENV_PINS}={path!r}: cannot read it: {error}") from None
    pins = parse_pins(text, path)
    with _cache_lock:
        _cache[path] = (stamp, pins)
    return pins


def apply_pins(handle: Handle, config: Config) -> Handle:
    """``handle`` with the pin the configured pins file gives it (unchanged if none applies).

    Raises:
        ConfigError: if the file is unusable, or the handle's own pin disagrees with it.
    """
    path = config.get("pins")
    if not path:
        return handle
    pins = load_pins(str(path))
    found = pins.get(handle.url) or pins.get(handle.raw)
    if found is None:
        return handle
    algorithm, digest, line = found
    if handle.pin is not None:
        if handle.pin != (algorithm, digest):
            raise ConfigError(f"the handle pins {handle.pin[0]}={handle.pin[1]}, but {path}:{line} pins "
                              f"{algorithm}={digest}", hint="make the two pins agree")
        return handle
    return dataclasses.replace(handle, pin=(algorithm, digest))
