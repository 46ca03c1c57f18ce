"""Unpack archive bytes with the real extractor into a real ``LocalWriter`` temp dir inside a
sandbox, and check that a refusal leaves nothing behind.

Shared by the unit tests of hostile tars (``test_hostile_tar.py``) and the reliability scenarios
that document them (``reliability/test_complete_tar.py``, ``reliability/test_bounded.py``).
Import the fixtures by name: ``from extract_sandbox import refused, sandbox, unpack``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import pytest

from hubcache import ArchiveError
from hubcache.archive.extract import Contents, Limits, extract
from hubcache.stores.localstore import LocalStore

Unpack = Callable[..., "tuple[Contents, Path]"]


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """The directory that holds the cache and nothing else: anything else in it escaped."""
    path = tmp_path / "sandbox"
    path.mkdir()
    return path


@pytest.fixture
def unpack(sandbox) -> Unpack:
    """Extract from bytes or a reader into a fresh LocalWriter; returns ``(contents, temp dir)``."""
    store = LocalStore(str(sandbox / "cache"))

    def run(data, limits: Limits = Limits()) -> tuple[Contents, Path]:
        writer = store.writer("0" * 40, "test://handle")
        raw = io.BytesIO(data) if isinstance(data, bytes) else data
        try:
            return extract(raw, writer, limits), Path(writer.tmp)
        except BaseException:
            writer.abort()
            raise

    return run


def nothing_left(sandbox: Path) -> None:
    """A refused archive leaves nothing: the cache dir holds no temp dir, nothing else exists."""
    found = [p.relative_to(sandbox).parts for p in sandbox.rglob("*")]
    assert found in ([], [("cache",)]), found


def refused(unpack: Unpack, sandbox: Path, data, error: type = ArchiveError, match: str | None = None,
            limits: Limits = Limits()) -> BaseException:
    """Unpack ``data``, expect ``error`` (its one-line message matching ``match``), nothing left."""
    with pytest.raises(error, match=match) as caught:
        unpack(data, limits)
    assert "\n" not in str(caught.value)
    nothing_left(sandbox)
    return caught.value
