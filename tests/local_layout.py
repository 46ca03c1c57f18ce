"""Reading and editing a local entry's manifest, which lives at the end of its descriptor
(``hubcache.core.entry``): what tests that forge or damage a manifest need."""

from __future__ import annotations

import json
import os
from typing import Any

from hubcache.core import entry


def descriptor_path(root: str, key: str) -> str:
    return os.path.join(root, entry.descriptor_name(key))


def manifest_json(root: str, key: str) -> bytes:
    """The manifest's JSON in ``<key>.descriptor.txt``."""
    with open(descriptor_path(root, key), "rb") as f:
        found = entry.descriptor_manifest(f.read())
    assert found is not None, f"{key} has no manifest in its descriptor"
    return found


def manifest_data(root: str, key: str) -> dict[str, Any]:
    return json.loads(manifest_json(root, key))


def write_manifest_json(root: str, key: str, data: bytes | str | dict[str, Any]) -> None:
    """Put ``data`` (bytes, text or a dict) as the manifest in the descriptor, keeping its head
    (hubcache's descriptor lines, or fresh ones if there is no descriptor)."""
    if isinstance(data, dict):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    path = descriptor_path(root, key)
    try:
        with open(path, "rb") as f:
            head = entry.descriptor_head(f.read())
    except FileNotFoundError:
        head = entry.descriptor_text("test://planted")
    if entry.WRITER_MARK not in head:
        head = head.rstrip("\n") + "\n" + entry.WRITER_TAG + "\n"
    with open(path, "wb") as f:
        f.write(entry.descriptor_with_manifest(head, data))


def drop_manifest(root: str, key: str) -> None:
    """Leave the descriptor without its manifest (the entry is then not committed)."""
    path = descriptor_path(root, key)
    with open(path, "rb") as f:
        head = entry.descriptor_head(f.read())
    with open(path, "w") as f:
        f.write(head)


def cache_listing(root: str) -> set[str]:
    return set(os.listdir(root))


def tfhub_names(keys: list[str] | set[str]) -> set[str]:
    """What tensorflow_hub leaves for these keys: ``<key>`` and ``<key>.descriptor.txt`` each."""
    return {name for key in keys for name in (key, entry.descriptor_name(key))}


def committed_names(root: str) -> list[str]:
    """What in ``root`` says an entry is (or may be taken for) committed: entry directories and
    descriptors that hold a manifest (an older hubcache's ``.manifest.json`` too)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        full = os.path.join(root, name)
        if os.path.isdir(full) or name.endswith(entry.MANIFEST_SUFFIX):
            found.append(name)
        elif name.endswith(entry.DESCRIPTOR_SUFFIX):
            with open(full, "rb") as f:
                if entry.descriptor_manifest(f.read()) is not None:
                    found.append(name)
    return sorted(found)
