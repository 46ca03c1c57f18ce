"""CRC-32, the fast digest of every file in a manifest.

One implementation for writing (the extractor) and reading back (checks, adoption, tier copies):
ISA-L's ``crc32`` when ``isal`` is installed (the same values as ``zlib.crc32``, several times
faster), else ``zlib.crc32``.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO, Callable

#: Bytes read at a time by :func:`file_crc32`.
READ_CHUNK = 1 << 20

_crc32: Callable[[bytes, int], int] | None = None


def crc32_function() -> Callable[[bytes, int], int]:
    """``zlib.crc32``, or ISA-L's identical but several times faster one when ``isal`` is installed."""
    global _crc32
    if _crc32 is None:
        try:
            from isal.isal_zlib import crc32 as fast
        except ImportError:
            fast = zlib.crc32
        _crc32 = fast
    return _crc32


def file_crc32(f: BinaryIO) -> tuple[int, int]:
    """Read ``f`` to its end: ``(CRC-32, bytes read)``.

    Args:
        f: a file opened for binary reading (a local file, an fsspec file...).
    """
    crc32 = crc32_function()
    crc = size = 0
    while chunk := f.read(READ_CHUNK):
        crc = crc32(chunk, crc)
        size += len(chunk)
    return crc, size
