"""The layout of one cache entry, the same in every store (a local directory, a bucket).

Under a store's root, one entry per cache key (``sha1(handle)``, as tensorflow_hub computes it)::

    <key>/                  the model (what ``resolve`` returns)
    <key>.descriptor.txt    tensorflow_hub's descriptor; hubcache adds its WRITER_TAG line
    <key>.manifest.json     hubcache's manifest, written last: only entries with one are trusted
    <key>.lock              tensorflow_hub's download marker; an object store's download lease
    <key>.hubcache.lock     a local store's OS file lock (held while downloading)
    <key>.hubcache.use      a local store's use file (shared locks; mtime = last use)
    <key>.hubcache.owner    a local store's note of who holds the lock

This module says what those names are, what a descriptor says, how an entry tensorflow_hub wrote
is recognised and when its files make a complete model; the stores (``localstore``,
``objectstore``) say how they are read and written. It does no I/O.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Collection, Literal, Mapping, get_args

from .._version import __version__

#: A cache key: 40 lowercase hex digits.
KEY = re.compile(r"[0-9a-f]{40}")

MANIFEST_SUFFIX = ".manifest.json"
DESCRIPTOR_SUFFIX = ".descriptor.txt"
#: tensorflow_hub's own download marker (a plain file, no OS lock); an object store's lease.
LOCK_SUFFIX = ".lock"
HUBCACHE_LOCK_SUFFIX = ".hubcache.lock"
USE_SUFFIX = ".hubcache.use"
OWNER_SUFFIX = ".hubcache.owner"

#: The line hubcache adds to the descriptors it writes; a descriptor without it is tensorflow_hub's.
WRITER_MARK = "Writer: hubcache"
WRITER_TAG = f"{WRITER_MARK} {__version__}"

#: Files that make a directory a SavedModel or hub module (at least one must be there).
MARKERS = ("saved_model.pb", "saved_model.pbtxt", "tfhub_module.pb")
_SHARD = re.compile(r"variables\.data-\d+-of-(\d+)$")

#: What a store's listing says an entry is: ``committed`` (a manifest its files match),
#: ``foreign`` (a complete entry tensorflow_hub wrote, not adopted yet), ``in progress`` (a
#: download's temp files or live lease) or ``damaged`` (anything else left of an entry).
EntryState = Literal["committed", "in progress", "foreign", "damaged"]
ENTRY_STATES: tuple[EntryState, ...] = get_args(EntryState)
#: States whose entries are worth keeping (the others are debris).
USABLE_STATES: tuple[EntryState, ...] = ("committed", "foreign")


def is_key(text: str) -> bool:
    """Whether ``text`` is a cache key (40 lowercase hex digits, nothing else: ``$`` would also
    let a trailing newline through, and a name from a shared directory or bucket may have one)."""
    return KEY.fullmatch(text) is not None


def manifest_name(key: str) -> str:
    """The manifest's name beside the entry: ``<key>.manifest.json``."""
    return key + MANIFEST_SUFFIX


def descriptor_name(key: str) -> str:
    """The descriptor's name beside the entry: ``<key>.descriptor.txt``."""
    return key + DESCRIPTOR_SUFFIX


def descriptor_text(handle: str) -> str:
    """The descriptor hubcache writes at commit: tensorflow_hub's three lines, then :data:`WRITER_TAG`."""
    return (f"Module: {handle}\nDownload Time: {time.ctime()}\n"
            f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})\n{WRITER_TAG}\n")


def size_problem(path: str, found: int | None, expected: int) -> str | None:
    """What is wrong with an entry file the manifest lists with ``expected`` bytes, when the store
    found ``found`` (``None``: not there); ``None`` if nothing. One wording for both stores."""
    if found is None:
        return f"{path} is missing"
    if found != expected:
        return f"{path} has {found} bytes, expected {expected}"
    return None


def printable(text: str, limit: int = 200) -> str:
    """Text read from a cache (a descriptor's handle, a lock holder's note) made safe to show: one
    line, every non-printable character escaped (``\\x1b``, ``\\u202e``), at most ``limit``
    characters and ``...``. Whoever wrote the cache may have planted terminal escapes in it."""
    text = text.strip()
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


def descriptor_module(descriptor: bytes | str | None) -> str | None:
    """The handle a descriptor names on its ``Module:`` line (tensorflow_hub's and hubcache's
    descriptors both start with it), made :func:`printable`; ``None`` if there is no such line."""
    if descriptor is None:
        return None
    text = descriptor.decode("utf-8", "replace") if isinstance(descriptor, bytes) else descriptor
    for line in text.splitlines():
        if line.startswith("Module: "):
            return printable(line[len("Module: "):]) or None
    return None


def written_by_tensorflow_hub(descriptor: bytes | str | None) -> bool:
    """Whether a descriptor (``None``: there is none) is tensorflow_hub's: one without the
    :data:`WRITER_MARK` line hubcache adds. Such an entry has no manifest and may be adopted
    after :func:`model_dir_problems` finds it complete."""
    if descriptor is None:
        return False
    if isinstance(descriptor, bytes):
        return WRITER_MARK.encode() not in descriptor
    return WRITER_MARK not in descriptor


def model_dir_problems(files: Mapping[str, int], others: Collection[str] = ()) -> list[str]:
    """Why a listing is not a complete SavedModel or hub module (``[]``: complete).

    Used to adopt entries tensorflow_hub wrote (they have no manifest).

    Args:
        files: the regular files, relative ``/``-separated path -> size. A listing need hold
            only the top level and ``variables/``.
        others: paths there that are not regular files (directories, links...): a marker file
            that is one does not count as a file.
    """
    if not files and not others:
        return ["the entry has no objects"]
    markers = [m for m in MARKERS if m in files or m in others]
    if not markers:
        return ["no saved_model.pb, saved_model.pbtxt or tfhub_module.pb"]
    problems = [f"{m} is not a regular file" if m not in files else f"{m} is empty"
                for m in markers if m not in files or files[m] == 0]
    if "variables/variables.index" in files:
        shards = {p[len("variables/"):] for source in (files, others) for p in source
                  if p.startswith("variables/variables.data-")}
        match = _SHARD.match(min(shards)) if shards else None
        count = int(match.group(1)) if match else 1
        problems += [f"variables shard {i} of {count} is missing" for i in range(count)
                     if f"variables.data-{i:05d}-of-{count:05d}" not in shards]
    return problems
