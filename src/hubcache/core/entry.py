"""The layout of one cache entry, the same in every store (a local directory, a bucket).

Under a store's root, one entry per cache key (``sha1(handle)``, as tensorflow_hub computes it).
Every store (the ``tmp`` and ``home`` backends' directories, the ``gcs`` backend's and the s3
example's buckets) holds exactly what tensorflow_hub would::

    <key>/                  the model (what ``resolve`` returns; a bucket: one object per file)
    <key>.descriptor.txt    tensorflow_hub's three lines, hubcache's WRITER_TAG line, then the
                            MANIFEST_MARK line and the manifest: the commit (a local store
                            replaces it last; an object store creates it last, create-only)
    <key>.lock              only while a download runs: tensorflow_hub's marker and hubcache's
                            download lock (local: OS-locked, content ``<host>.<pid>.<task>``;
                            object store: the lease with its heartbeat)

Caches an older hubcache wrote may still hold ``<key>.manifest.json`` (read as the manifest
when the descriptor has none, then moved into the descriptor) and, in local stores, the
LEGACY_SUFFIXES bookkeeping files.

This module says what those names are, what a descriptor and a lock file say, how an entry
tensorflow_hub wrote is recognised and when its files make a complete model; the stores
(``localstore``, ``objectstore``) say how they are read and written. It does no I/O.
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

#: Where an older hubcache kept the manifest (read, then moved into the descriptor).
MANIFEST_SUFFIX = ".manifest.json"
DESCRIPTOR_SUFFIX = ".descriptor.txt"
#: The download lock: tensorflow_hub's marker (a plain file), a local store's OS-locked lock file
#: (the same name and content, so either waits for the other), an object store's lease.
LOCK_SUFFIX = ".lock"
#: Bookkeeping files of an older hubcache's local stores (download lock, holder note, use file):
#: read where it matters (a lock or use an older process still holds), removed when free.
LEGACY_LOCK_SUFFIX = ".hubcache.lock"
LEGACY_OWNER_SUFFIX = ".hubcache.owner"
LEGACY_USE_SUFFIX = ".hubcache.use"
LEGACY_SUFFIXES = (LEGACY_LOCK_SUFFIX, LEGACY_OWNER_SUFFIX, LEGACY_USE_SUFFIX)

#: The line hubcache adds to the descriptors it writes; a descriptor without it is tensorflow_hub's.
WRITER_MARK = "Writer: hubcache"
WRITER_TAG = f"{WRITER_MARK} {__version__}"
#: The line after which a committed descriptor holds the entry's manifest (JSON, to the end).
MANIFEST_MARK = "Manifest:"
#: What starts the task part of a lock file hubcache wrote (tensorflow_hub's is a uuid4 hex).
LOCK_TASK_PREFIX = "hc"

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
    """Where an older hubcache kept the manifest beside the entry: ``<key>.manifest.json``."""
    return key + MANIFEST_SUFFIX


def descriptor_name(key: str) -> str:
    """The descriptor's name beside the entry: ``<key>.descriptor.txt``."""
    return key + DESCRIPTOR_SUFFIX


def descriptor_text(handle: str) -> str:
    """The descriptor hubcache writes at commit: tensorflow_hub's three lines, then :data:`WRITER_TAG`."""
    return (f"Module: {handle}\nDownload Time: {time.ctime()}\n"
            f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})\n{WRITER_TAG}\n")


def descriptor_with_manifest(head: str, manifest_json: bytes) -> bytes:
    """A committed descriptor (every store's): ``head`` (:func:`descriptor_text`), the
    :data:`MANIFEST_MARK` line, then the manifest's JSON. tensorflow_hub never reads a descriptor
    (it only writes one, before its own commit), so the manifest can live there."""
    head = head if head.endswith("\n") else head + "\n"
    return head.encode() + MANIFEST_MARK.encode() + b"\n" + manifest_json


def descriptor_manifest(descriptor: bytes | None) -> bytes | None:
    """The manifest JSON a descriptor holds, or ``None`` (no descriptor, one
    tensorflow_hub wrote, one hubcache wrote before its commit or an older hubcache wrote).

    Only a descriptor with hubcache's :data:`WRITER_MARK` line before the :data:`MANIFEST_MARK`
    line holds one. The caller bounds what it read and parses the JSON as untrusted input.
    """
    if descriptor is None:
        return None
    at = descriptor.find(b"\n" + MANIFEST_MARK.encode() + b"\n")
    if at < 0:
        return None
    head = descriptor[:at + 1]
    if not any(line.startswith(WRITER_MARK.encode()) for line in head.splitlines()):
        return None
    return descriptor[at + len(MANIFEST_MARK) + 2:]


def descriptor_head(descriptor: bytes) -> str:
    """The text lines of a descriptor, before any manifest (what a commit keeps of an adopted
    tensorflow_hub descriptor: its ``Module``, ``Download Time`` and ``Downloader Hostname``)."""
    at = descriptor.find(b"\n" + MANIFEST_MARK.encode() + b"\n")
    head = descriptor if at < 0 else descriptor[:at + 1]
    return head.decode("utf-8", "replace")


#: Largest head (the lines before the manifest) of a descriptor kept when hubcache rewrites it.
HEAD_BYTES = 4096


def rewritten_head(descriptor: bytes | None, handle: str) -> str:
    """The head a descriptor hubcache rewrites (to record a manifest in it) keeps: the lines of
    an adopted tensorflow_hub entry's or an older hubcache's descriptor, with :data:`WRITER_TAG`
    added, if they are a plain, short text starting with ``Module:``; else fresh ones
    (:func:`descriptor_text`). Whoever wrote the descriptor may have planted anything in it."""
    if descriptor is not None:
        head = descriptor_head(descriptor[:HEAD_BYTES + 1]).rstrip("\n")
        lines = head.split("\n")
        if (len(head) <= HEAD_BYTES and head.startswith("Module: ") and len(lines) <= 8
                and all(line.isprintable() for line in lines)):
            if not any(line.startswith(WRITER_MARK) for line in lines):
                lines.append(WRITER_TAG)
            return "\n".join(lines) + "\n"
    return descriptor_text(handle)


def lock_text(task: str) -> str:
    """What a download lock file says, in tensorflow_hub's format (``<host>.<pid>.<task>``,
    ``resolver._lock_file_contents``): tensorflow_hub waiting for it reads the task and watches
    ``<key>.<task>.tmp`` grow, so ``task`` is the name part of the writer's temp dir."""
    return f"{socket.gethostname()}.{os.getpid()}.{task}"


def parse_lock(text: str) -> tuple[str, int, str] | None:
    """``(host, pid, task)`` of a lock file's text, or ``None`` if it is not in that format."""
    host, _, rest = text.strip().rpartition(".")
    host, _, pid = host.rpartition(".")
    if not host or not pid.isdigit() or not rest or len(pid) > 10:
        return None
    return host, int(pid), rest


def lock_by_hubcache(text: str) -> bool:
    """Whether a lock file's text is hubcache's (its task starts with :data:`LOCK_TASK_PREFIX`,
    which a tensorflow_hub task, a hex uuid, never does)."""
    parsed = parse_lock(text)
    return parsed is not None and parsed[2].startswith(LOCK_TASK_PREFIX)


def lock_holder(text: str | None) -> str:
    """Who a lock file names, made :func:`printable` (``host pid N``), else ``unknown``."""
    if not text:
        return "unknown"
    parsed = parse_lock(text)
    if parsed is None:
        return printable(text) or "unknown"
    return f"{printable(parsed[0], 100)} pid {parsed[1]}"


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
