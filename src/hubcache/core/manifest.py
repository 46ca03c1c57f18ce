"""The commit manifest: what an entry holds, written last, trusted first.

The manifest (at the end of ``<key>.descriptor.txt`` in every store: ``hubcache.core.entry``) lists every file with its size and a fast digest
(CRC-32, computed while the file is written, so it costs no extra read), the archive's SHA-256
and where the bytes came from. An entry without a valid manifest is not committed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileRecord:
    """One file of an entry: path relative to the entry, size, and CRC-32 as 8 hex digits."""

    path: str
    size: int
    crc32: str


@dataclass
class Manifest:
    """What a committed entry holds.

    Attributes:
        handle: the handle it was made for.
        source: the URL the archive bytes came from (after redirects).
        archive: ``{"sha256": hex, "bytes": n, "format": "gz"}`` (empty for adopted entries).
        files: every regular file.
        dirs: every directory (empty ones included).
        symlinks: relative path -> link target.
        created: Unix time of the commit.
        creator: what wrote it (``hubcache <version>``, or ``adopted``).
    """

    handle: str
    source: str = ""
    archive: dict[str, object] = field(default_factory=dict)
    files: list[FileRecord] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    creator: str = ""

    @property
    def total_bytes(self) -> int:
        """The sum of the files' sizes."""
        return sum(f.size for f in self.files)

    def verified_digest(self, algorithm: str = "sha256") -> str | None:
        """The archive digest hubcache computed from the bytes itself; ``None`` when there is
        none, or when ``archive["verified"]`` is false (an entry adopted from tensorflow_hub, or
        whose manifest was copied from another tier): only such a digest can vouch for a pin."""
        digest = self.archive.get(algorithm)
        if self.archive.get("verified", True) is False or not isinstance(digest, str) or not digest:
            return None
        return digest

    def to_json(self) -> bytes:
        data = asdict(self)
        data["format"] = FORMAT_VERSION
        data["files"] = [[f.path, f.size, f.crc32] for f in self.files]
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        """Parse a manifest.

        Raises:
            ValueError: if it is not a manifest this version can read.
        """
        try:
            data = json.loads(raw)
        except RecursionError:  # a planted manifest of '[' nested deeper than the parser recurses
            raise ValueError("malformed manifest: nested too deeply") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise ValueError("not a hubcache manifest of a known format")
        try:
            return cls(
                handle=str(data["handle"]),
                source=str(data.get("source", "")),
                archive=dict(data.get("archive", {})),
                files=[FileRecord(str(p), int(s), str(c)) for p, s, c in data["files"]],
                dirs=[str(d) for d in data.get("dirs", [])],
                symlinks={str(k): str(v) for k, v in data.get("symlinks", {}).items()},
                created=float(data.get("created", 0.0)),
                creator=str(data.get("creator", "")),
            )
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as error:
            raise ValueError(f"malformed manifest: {error}") from None


def crc_hex(value: int) -> str:
    """Format a CRC-32 as 8 hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"
