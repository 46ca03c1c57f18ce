"""Pins: the one place that decides what a handle is pinned to and whether an entry vouches for it.

- :func:`apply_pins` / :func:`apply_configured_pins`: the pin ``HUBCACHE_PINS`` gives a handle;
- :func:`require_checkable_pin`: a pinned handle must name an archive (bytes to check);
- :func:`check_pin`: a cached entry's verified archive digest against the pin.

``HUBCACHE_PINS`` names a file of ``HANDLE DIGEST`` lines.

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
from typing import TYPE_CHECKING

from .config import Config
from .errors import ConfigError, IntegrityError
from .handles import Handle, has_pin

if TYPE_CHECKING:
    from .locate import Location
    from .manifest import Manifest

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
    path = config.pins
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


def apply_configured_pins(parsed: Handle, config: Config) -> Handle:
    """:func:`apply_pins`, also for a pins file that names a handle with its credentials, as the
    user writes it (``parsed`` shows them as ``***``). What a resolve applies."""
    if parsed.userinfo and config.pins:
        written = dataclasses.replace(parsed, url=parsed.reveal(parsed.url), raw=parsed.reveal(parsed.raw.strip()))
        parsed = dataclasses.replace(parsed, pin=apply_pins(written, config).pin)
    return apply_pins(parsed, config)


def require_checkable_pin(handle: Handle, location: Location, config: Config) -> None:
    """A pin is a promise about archive bytes: refuse a pinned handle that resolves to no archive
    (a directory, or a model read in place), rather than return it unchecked.

    Raises:
        IntegrityError: the handle is pinned and ``location`` is not an archive.
    """
    if handle.pin is None or location.kind == "archive":
        return
    algorithm, digest = handle.pin
    pins = config.pins
    from_file = pins and not has_pin(handle.raw)
    if location.kind == "directory":
        what = "names a directory, not an archive"
        fix = "pin the archive's URL instead"
    else:
        fmt = config.settings["load_format"]
        what = f"is read in place ({fmt.origin or 'load format'}=UNCOMPRESSED), not downloaded as an archive"
        fix = f"set {fmt.origin or 'TFHUB_MODEL_LOAD_FORMAT'}=COMPRESSED to download and check the archive"
    drop = f"remove its line from {pins}" if from_file else "remove the pin"
    raise IntegrityError(f"the handle pins {algorithm}={digest}, but it {what}: there are no archive bytes "
                         "whose digest could be checked", hint=f"{fix}, or {drop}")


def check_pin(handle: Handle, manifest: Manifest, *, unverified_is_miss: bool = False) -> bool:
    """Check a pinned handle's cached entry against the archive digest hubcache verified for it.

    Only a digest hubcache computed itself from the archive bytes counts: an entry adopted from
    tensorflow_hub has none, and a manifest copied from another tier (a bucket others can write)
    carries ``archive["verified"] = False``. Such an entry cannot vouch for a pin, whatever
    digest its manifest shows.

    Args:
        handle: the handle (nothing to check without a pin).
        manifest: the cached entry's manifest.
        unverified_is_miss: return ``False`` for an entry that cannot vouch for the pin, so the
            caller treats it as a miss (downloads and verifies the archive) instead of failing.

    Returns:
        ``True`` if there is no pin or the verified digest matches it; ``False`` (only with
        ``unverified_is_miss``) if the entry cannot vouch for the pin.

    Raises:
        IntegrityError: the verified digest differs from the pin; or, without
            ``unverified_is_miss``, the entry cannot vouch for it.
    """
    if handle.pin is None:
        return True
    problem = pin_problem(handle.pin, manifest)
    if problem is None:
        return True
    if unverified_is_miss and manifest.verified_digest(handle.pin[0]) is None:
        return False
    raise IntegrityError(f"the cached entry {problem}",
                         hint="run `hubcache rm` on the handle to download and verify it again")


def pin_problem(pin: tuple[str, str], manifest: Manifest) -> str | None:
    """Why an entry's manifest does not vouch for ``pin`` (``(algorithm, hex)``), as a phrase
    that follows "the entry"; ``None`` when its verified digest matches. One wording for
    resolve's :class:`IntegrityError` and ``hubcache verify``'s report."""
    algorithm, expected = pin
    actual = manifest.verified_digest(algorithm)
    if actual is None:
        return (f"has no {algorithm} that hubcache verified (it was adopted from tensorflow_hub or "
                f"copied from another tier), so it cannot be checked against the pin {expected}")
    if actual != expected:
        return f"was built from an archive whose {algorithm} is {actual}, but the handle pins {expected}"
    return None
