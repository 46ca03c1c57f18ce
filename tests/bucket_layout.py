"""Reading and planting a bucket entry's manifest, which lives at the end of its descriptor
``<key>.descriptor.txt`` (``hubcache.core.entry``), through any fsspec filesystem: what tests
that forge or damage a bucket's manifest need."""

from __future__ import annotations

from typing import Any

from hubcache.core import entry


def descriptor_object(root_path: str, key: str) -> str:
    """The filesystem path of ``key``'s descriptor under the bucket path ``root_path``."""
    return f"{root_path.rstrip('/')}/{entry.descriptor_name(key)}"


def manifest_json(fs: Any, descriptor: str) -> bytes:
    """The manifest's JSON at the end of the descriptor object ``descriptor``."""
    found = entry.descriptor_manifest(fs.cat_file(descriptor))
    assert found is not None, f"{descriptor} holds no manifest"
    return bytes(found)


def plant_manifest(fs: Any, descriptor: str, data: bytes | str, handle: str = "https://example.com/planted") -> None:
    """Put ``data`` as the manifest in the descriptor object, as a bucket writer would: the
    existing descriptor's head is kept (fresh hubcache lines if there is none)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        head = entry.descriptor_head(fs.cat_file(descriptor))
    except FileNotFoundError:
        head = entry.descriptor_text(handle)
    fs.pipe_file(descriptor, entry.descriptor_with_manifest(head, raw))
