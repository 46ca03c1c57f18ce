"""The conformance kit every cache backend runs against itself (re-exported as
``hubcache.testing.CacheBackendConformance`` and ``hubcache.testing.ObjectStoreConformance``).
Requires pytest.

Modelled on fsspec's ``fsspec/tests/abstract``: :class:`ConformanceFixtures` holds the fixtures,
the helpers and the capability flags; each ``*Cases`` mixin holds the cases of one concern; the two
public suites compose them. A backend's test module subclasses one suite and provides a
``backend`` fixture; a backend that lacks a capability sets its flag to ``False`` and the cases
that need it are skipped, each saying which flag turned it off.

Every backend (:class:`CacheBackendConformance`):

- :class:`ResolveCases`: miss then hit in every archive format, the tensorflow_hub layout,
  redirects and tfhub.dev-style handles, adopting an entry tensorflow_hub wrote, links and the
  executable bit, a cache root that cannot exist.
- :class:`CommitCases`: the manifest is the commit, hostile archives, HTTP errors, a cut
  connection, two writers of one entry without a lease.
- :class:`ManagementCases`: listing and removal, damage that ``verify`` finds.
- :class:`UntrustedCases`: an unsafe manifest someone else wrote is a miss that a download replaces.
- :class:`ConcurrencyCases`: real processes racing for the lease and for one handle.

Object-store backends (:class:`ObjectStoreConformance` adds):

- :class:`ObjectStoreCases`: the conditional primitives, listing, reads capped against what others
  wrote.
- :class:`ObjectLayoutCases`: exactly tensorflow_hub's names in the bucket (after downloads,
  adoptions and the move of an older hubcache's entries), hostile descriptors, a writer killed
  before its commit, a hit that writes nothing.
- :class:`LeaseCases`: the lease against stalled, killed and planted holders, its request rates.
- :class:`TierChainCases`: a local tier in front of the store when others can write the bucket.
"""

from __future__ import annotations

import os
import posixpath
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, TypedDict

import pytest

from .testkit import (
    FORMATS,
    SUFFIX,
    OriginServer,
    archive_of,
    build_model_dir,
    hostile_archives,
    read_tree,
    tree_of,
)

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import pathlib

    from .core.backend import Backend, CacheBackend
    from .core.config import Config
    from .core.manifest import FileRecord, Manifest
    from .core.tiers import TieredBackend
    from .stores.localstore import LocalStore
    from .stores.objectstore import ObjectStore


class ConformanceFixtures:
    """The fixtures, helpers and capability flags every case mixin builds on.

    Provide a ``backend`` fixture returning a fresh instance of your backend (with its own empty
    cache root). The suite starts its own origin server; it calls ``backend.resolve`` directly, so
    no environment variables are needed. Small limits are set through ``Config.replace``: build
    your backend from the ``conformance_config`` fixture to have them.

    The capability flags below are class attributes: set one to ``False`` in your subclass where
    your backend lacks the capability, and the cases that need it are skipped, naming the flag.
    """

    MAX_BYTES = 1 << 20
    MAX_MEMBERS = 500

    #: The store keeps an archive's symbolic and hard links as links. ``False`` (object stores):
    #: a link to a file is stored as a copy of its bytes, any other link is refused.
    SUPPORTS_LINKS = True
    #: The store keeps the executable bit of an archive's files.
    SUPPORTS_EXEC_BIT = True
    #: Processes of one host share the cache: a child process rebuilds the backend from its
    #: class (importable by module and qualified name) and the pickled config, and sees the
    #: same entries and the same download lease.
    MULTI_PROCESS = True
    #: The cache is shared by hosts (an object store): each child process of the concurrency
    #: cases gets a temp dir of its own, as another host would have, and must leave it empty.
    SHARED_ACROSS_HOSTS = False
    #: The cache root holds exactly what tensorflow_hub's does once resolves finish: ``<key>``
    #: and ``<key>.descriptor.txt`` per entry, the manifest inside the descriptor (every
    #: built-in store). ``False``: the store keeps other names beside its entries.
    TFHUB_LAYOUT = True

    @pytest.fixture
    def conformance_config(self) -> Config:
        from .core.config import load_config

        return load_config().replace(max_archive_bytes=self.MAX_BYTES, max_members=self.MAX_MEMBERS,
                                     retries=1, timeout=10.0)

    @pytest.fixture
    def backend(self, conformance_config: Config) -> CacheBackend:  # pragma: no cover - subclasses provide it
        raise NotImplementedError("override the `backend` fixture")

    @pytest.fixture
    def origin(self) -> Iterator[OriginServer]:
        with OriginServer() as server:
            yield server

    @pytest.fixture
    def model(self, tmp_path: pathlib.Path) -> str:
        return build_model_dir(tmp_path / "model", weights_bytes=200_000, shards=2)

    # helpers

    def require(self, flag: str, needed: bool = True) -> None:
        """Skip the running case unless the capability ``flag`` is ``needed`` (the skip reason
        names the flag)."""
        if bool(getattr(self, flag)) != needed:
            pytest.skip(f"{type(self).__name__}.{flag} is {getattr(self, flag)}: this case needs {flag} = {needed}")

    def missing_root(self, backend: CacheBackend, tmp_path: pathlib.Path) -> tuple[str, str] | None:
        """A cache root for ``backend`` in a container that does not exist (a bucket no one
        created), and a word the error of a resolve there must contain (in its message or its
        hint); ``None``: the backend makes whatever root it is given (a local directory), so
        there is no such root and the case is skipped.

        :class:`ObjectStoreFixtures` gives a bucket of the backend's scheme that no one created.
        Override it when your backend's roots live in something else that must exist first (the
        case builds ``type(backend)(backend.config.replace(cache_dir=root))``).
        """
        return None

    def resolve(self, backend: Backend, url: str) -> str:
        from .core.handles import parse_handle
        from .core.locate import locate

        handle = parse_handle(url)
        return backend.resolve(handle, locate(handle, "COMPRESSED"))

    def fresh(self, backend: CacheBackend) -> CacheBackend:
        """A new instance of the same backend on the same root (no in-memory state)."""
        return type(backend)(backend.config)

    def filesystem(self, backend: CacheBackend, path: str) -> tuple[Any, str]:  # Any: an fsspec filesystem
        """``(fs, path)`` to read an entry with: the store's own filesystem when it has one (so a
        backend configured by its own settings, e.g. an endpoint URL, is read the same way)."""
        import fsspec

        fs = getattr(backend.store, "fs", None)
        if fs is None:
            fs, root = fsspec.core.url_to_fs(path)
            return fs, root
        return fs, fs._strip_protocol(path)

    def beside(self, backend: CacheBackend, key: str, suffix: str) -> tuple[Any, str]:
        """``(fs, path)`` of the file ``<key><suffix>`` beside the entry ``key`` (its
        ``.descriptor.txt``, its ``.lock``)."""
        fs, entry = self.filesystem(backend, backend.store.entry_path(key))
        return fs, entry.rstrip("/")[: -len(key)] + key + suffix

    def manifest_bytes(self, backend: CacheBackend, key: str) -> bytes:
        """The committed manifest's JSON as the store keeps it: the end of
        ``<key>.descriptor.txt`` (see :mod:`hubcache.core.entry`)."""
        from .core import entry

        fs, descriptor = self.beside(backend, key, entry.DESCRIPTOR_SUFFIX)
        found = entry.descriptor_manifest(fs.cat_file(descriptor))
        assert found is not None, f"no manifest for {key}"
        return found

    def write_manifest(self, backend: CacheBackend, key: str, data: bytes) -> None:
        """Replace the manifest's JSON where the store keeps it (:meth:`manifest_bytes`)."""
        from .core import entry

        fs, descriptor = self.beside(backend, key, entry.DESCRIPTOR_SUFFIX)
        head = entry.descriptor_head(fs.cat_file(descriptor))
        fs.pipe_file(descriptor, entry.descriptor_with_manifest(head, data))

    def drop_manifest(self, backend: CacheBackend, key: str) -> None:
        """Take the manifest away (the entry is then not committed), leaving everything else."""
        from .core import entry

        fs, descriptor = self.beside(backend, key, entry.DESCRIPTOR_SUFFIX)
        fs.pipe_file(descriptor, entry.descriptor_head(fs.cat_file(descriptor)).encode())

    def read(self, backend: CacheBackend, path: str) -> dict[str, bytes]:
        """Every file of an entry, read through the backend's filesystem."""
        return read_tree(path, self.filesystem(backend, path)[0])

    def committed_keys(self, backend: CacheBackend) -> set[str]:
        return {e.key for e in backend.entries() if e.state == "committed"}

    def race(self, backend: CacheBackend, workdir: pathlib.Path, script: str, *args: str,
             count: int) -> list[dict[str, Any]]:
        """Run ``count`` children of ``script`` (see :data:`_CHILD_PRELUDE`) at once; return each
        one's last JSON line. With ``SHARED_ACROSS_HOSTS`` each child has a temp dir of its own
        (``<workdir>/child-<i>-tmp``), as another host would."""
        import base64
        import json
        import pickle
        import subprocess
        import sys
        import threading

        cls = type(backend)
        config = base64.b64encode(pickle.dumps(backend.config)).decode()
        procs: list[subprocess.Popen[str]] = []
        logs: list[pathlib.Path] = []
        try:
            for i in range(count):
                env = dict(os.environ)
                if self.SHARED_ACROSS_HOSTS:
                    env["TMPDIR"] = str(workdir / f"child-{i}-tmp")
                    os.makedirs(env["TMPDIR"])
                logs.append(workdir / f"child-{i}-stderr.txt")
                with open(logs[-1], "w") as stderr:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-c", _CHILD_PRELUDE + script, cls.__module__, cls.__qualname__, config,
                         *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env))
            for proc, log in zip(procs, logs):  # every child has imported and built its backend...
                line: list[str] = []
                reader = threading.Thread(target=lambda: line.append(_pipe(proc.stdout).readline()), daemon=True)
                reader.start()
                reader.join(60)
                assert line and json.loads(line[0])["event"] == "ready", f"{line}: {log.read_text()[-3000:]}"
            for proc in procs:  # ...and now they all start at once
                _pipe(proc.stdin).write("go\n")
                _pipe(proc.stdin).flush()
            results = []
            for proc, log in zip(procs, logs):
                out, _ = proc.communicate(timeout=90)
                assert proc.returncode == 0, log.read_text()[-3000:]
                results.append(json.loads(out.strip().splitlines()[-1]))
            return results
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


#: A member of :func:`_tar`'s archives: ``(name, content, mode)``.
_Member = tuple[str, bytes | str, int]



def _tar(members: list[_Member]) -> bytes:
    """A tar of ``(name, content, mode)``: ``content`` is the bytes of a file, or ``"sym:<target>"``
    / ``"hard:<existing>"`` for a link."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                kind, target = content.split(":", 1)
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = target
                tar.addfile(info)
    return buf.getvalue()


def _pipe(stream: IO[str] | None) -> IO[str]:
    """A child's ``stdin`` or ``stdout``, opened with ``PIPE`` (so never ``None``)."""
    assert stream is not None, "the child was started without this pipe"
    return stream


class ResolveCases(ConformanceFixtures):
    """A resolve: every archive format, the layout tensorflow_hub reads, redirects and tfhub.dev
    handles, an entry tensorflow_hub wrote, links and the executable bit, a root that cannot exist."""

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_miss_then_hit_every_format(self, backend: CacheBackend, origin: OriginServer, model: str,
                                        fmt: str) -> None:
        url = origin.add(f"/m{SUFFIX[fmt]}", archive_of(model, fmt))
        path = self.resolve(backend, url)
        assert self.read(backend, path) == tree_of(model)
        assert origin.count(f"/m{SUFFIX[fmt]}") == 1
        assert self.resolve(self.fresh(backend), url) == path
        assert origin.count() == 1, "a hit must not contact the origin"

    def test_layout_matches_tensorflow_hub(self, backend: CacheBackend, origin: OriginServer, model: str) -> None:
        import json

        from .core.handles import cache_key

        url = origin.add("/layout.tar.gz", archive_of(model))
        path = self.resolve(backend, url)
        key = cache_key(url)
        assert path.rstrip("/").endswith(key)
        fs, root = self.filesystem(backend, path)
        parent = root.rstrip("/")[: -len(key)]
        assert fs.exists(parent + key + ".descriptor.txt")
        assert b"Module: " + url.encode() in fs.cat_file(parent + key + ".descriptor.txt")
        assert json.loads(self.manifest_bytes(backend, key))["handle"] == url
        if self.TFHUB_LAYOUT:
            # tensorflow_hub's own expectation: exactly two names per model, nothing else.
            names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(parent.rstrip("/"), detail=False)}
            assert names == {key, key + ".descriptor.txt"}, names

    def test_redirect_and_suffixless_url(self, backend: CacheBackend, origin: OriginServer, model: str) -> None:
        origin.add("/blob/abc", archive_of(model, "zst"))
        url = origin.redirect("/download/model", "/blob/abc")
        path = self.resolve(backend, url + "?token=1")
        assert self.read(backend, path) == tree_of(model)

    def test_tfhub_style_handle(self, backend: CacheBackend, origin: OriginServer, model: str) -> None:
        handle = origin.add_tfhub_model("/google/tiny/1", archive_of(model))
        path = self.resolve(backend, handle)
        assert self.read(backend, path) == tree_of(model)
        assert [r.query for r in origin.requests if r.path == "/google/tiny/1"] == ["tf-hub-format=compressed"]

    def test_adopts_an_entry_tensorflow_hub_wrote(self, backend: CacheBackend, origin: OriginServer,
                                                  model: str) -> None:
        """An entry tensorflow_hub wrote (the files and a descriptor, no manifest) is listed as
        ``foreign`` and adopted by the first resolve: served without contacting the origin."""
        from .core.handles import cache_key

        url = origin.add("/tfhub-written.tar.gz", archive_of(model))
        key = cache_key(url)
        entry = backend.store.entry_path(key)
        fs, root = self.filesystem(backend, entry)
        for rel, data in tree_of(model).items():
            fs.makedirs(posixpath.dirname(f"{root}/{rel}"), exist_ok=True)
            fs.pipe_file(f"{root}/{rel}", data)
        fs.pipe_file(self.beside(backend, key, ".descriptor.txt")[1],
                     f"Module: {url}\nDownload Time: now\n".encode())
        assert {e.key: e.state for e in self.fresh(backend).entries()}[key] == "foreign"
        assert self.resolve(backend, url) == entry
        assert origin.count() == 0, "an adopted entry is not downloaded"
        manifest = backend.store.read_manifest(key)
        assert manifest is not None and manifest.creator == "adopted from tensorflow_hub"
        assert self.read(backend, entry) == tree_of(model)

    LINKS: list[_Member] = [("chain", "sym:variables/alias", 0o777), ("saved_model.pb", b"model bytes", 0o644),
                             ("variables/v.data", b"weights" * 100, 0o644), ("variables/alias", "sym:v.data", 0o777),
                             ("hard.pb", "hard:saved_model.pb", 0o644)]

    def test_links_are_kept(self, backend: CacheBackend, origin: OriginServer) -> None:
        """A symbolic link to a file stays a link with its target; a hard link has the bytes of
        the file it names; a full verify finds nothing."""
        from .core.handles import cache_key

        self.require("SUPPORTS_LINKS")
        url = origin.add("/links.tar", _tar(self.LINKS))
        path = self.resolve(backend, url)
        fs, root = self.filesystem(backend, path)
        assert fs.islink(f"{root}/variables/alias") and fs.islink(f"{root}/chain")
        assert os.readlink(f"{root}/variables/alias") == "v.data", "a link keeps its target"
        assert fs.cat_file(f"{root}/chain") == fs.cat_file(f"{root}/variables/v.data") == b"weights" * 100
        assert fs.cat_file(f"{root}/hard.pb") == b"model bytes"
        assert backend.store.verify(cache_key(url), full=True) == []

    def test_links_are_stored_as_copies(self, backend: CacheBackend, origin: OriginServer) -> None:
        """Without links, a symbolic or hard link to a file is stored as a copy of its bytes
        (``chain`` comes first: a link to a link the extractor has not seen yet, which the writer
        must follow); a full verify finds nothing."""
        from .core.handles import cache_key

        self.require("SUPPORTS_LINKS", False)
        url = origin.add("/links.tar", _tar(self.LINKS))
        tree = self.read(backend, self.resolve(backend, url))
        assert tree["variables/alias"] == tree["chain"] == b"weights" * 100
        assert tree["hard.pb"] == b"model bytes"
        assert backend.store.verify(cache_key(url), full=True) == []

    @pytest.mark.parametrize("target", ["sym:variables", "sym:nothing-here"])
    def test_links_to_directories_or_nothing_are_refused(self, backend: CacheBackend, origin: OriginServer,
                                                         target: str) -> None:
        """Without links, a link to a directory or to nothing in the archive cannot be stored as
        a copy: an ``ArchiveError`` naming the member (and a hint), and nothing under the root."""
        from .core.errors import ArchiveError

        self.require("SUPPORTS_LINKS", False)
        members: list[_Member] = [("saved_model.pb", b"model", 0o644), ("variables/v.data", b"w", 0o644),
                                  ("link", target, 0o777)]
        url = origin.add("/badlink.tar", _tar(members))
        with pytest.raises(ArchiveError) as info:
            self.resolve(backend, url)
        assert "'link'" in str(info.value) and info.value.hint, str(info.value)
        fs, root = self.filesystem(backend, backend.root)
        assert not fs.exists(root) or fs.find(root) == [], "a refused archive leaves nothing under the root"

    def test_the_executable_bit_is_kept(self, backend: CacheBackend, origin: OriginServer) -> None:
        from .core.handles import cache_key

        self.require("SUPPORTS_EXEC_BIT")
        url = origin.add("/exec.tar", _tar([("saved_model.pb", b"model", 0o644), ("assets/run.sh", b"#!/bin/sh\n", 0o755)]))
        path = self.resolve(backend, url)
        fs, root = self.filesystem(backend, path)
        assert fs.info(f"{root}/assets/run.sh")["mode"] & 0o111, "the executable bit was lost"
        assert not fs.info(f"{root}/saved_model.pb")["mode"] & 0o111
        assert backend.store.verify(cache_key(url), full=True) == []

    def test_a_missing_root_is_a_one_line_error(self, backend: CacheBackend, origin: OriginServer, model: str,
                                                tmp_path: pathlib.Path) -> None:
        """A cache root in a container that does not exist (:meth:`missing_root`: a bucket no one
        created) is a ``CacheError`` of one line naming the root, with a hint (``hubcache.resolve``
        adds the handle to any error)."""
        from .core.errors import CacheError

        missing = self.missing_root(backend, tmp_path)
        if missing is None:
            pytest.skip(f"{type(self).__name__}.missing_root() is None: {type(backend).__name__} makes its roots")
        root, word = missing
        broken = type(backend)(backend.config.replace(cache_dir=root))
        url = origin.add("/m.tar.gz", archive_of(model))
        with pytest.raises(CacheError) as info:
            self.resolve(broken, url)
        message, hint = str(info.value), info.value.hint or ""
        assert "\n" not in message and root in message, message
        assert hint and word in message + hint, (message, hint)


class CommitCases(ConformanceFixtures):
    """The commit: the manifest is the commit; a hostile archive, an HTTP error or a cut
    connection commits nothing; two writers of one entry leave one manifest."""

    def test_manifest_is_the_commit(self, backend: CacheBackend, origin: OriginServer, model: str) -> None:
        from .core.handles import cache_key

        url = origin.add("/c.tar.gz", archive_of(model))
        path = self.resolve(backend, url)
        self.drop_manifest(backend, cache_key(url))
        assert cache_key(url) not in self.committed_keys(self.fresh(backend))
        assert self.resolve(self.fresh(backend), url) == path
        assert origin.count("/c.tar.gz") == 2, "an entry without a manifest must be rebuilt"
        assert self.read(backend, path) == tree_of(model)

    @pytest.mark.parametrize("name", sorted(hostile_archives(max_bytes=1024, max_members=10)))
    def test_refuses_bad_archive_and_commits_nothing(self, backend: CacheBackend, origin: OriginServer,
                                                     name: str) -> None:
        from .core.errors import ArchiveError, DownloadError

        body = hostile_archives(max_bytes=self.MAX_BYTES, max_members=self.MAX_MEMBERS)[name]
        url = origin.add(f"/bad/{name}.tar.gz", body)
        with pytest.raises((ArchiveError, DownloadError)):
            self.resolve(backend, url)
        assert not self.committed_keys(self.fresh(backend))
        assert not os.path.exists("/tmp/hubcache-escape.txt")

    @pytest.mark.parametrize("status", [404, 500])
    def test_http_errors_name_the_status(self, backend: CacheBackend, origin: OriginServer, status: int) -> None:
        from .core.errors import DownloadError

        url = origin.add("/gone.tar.gz", b"", status=status)
        with pytest.raises(DownloadError) as info:
            self.resolve(backend, url)
        assert info.value.status == status and str(status) in str(info.value)
        assert not self.committed_keys(self.fresh(backend))

    def test_cut_connection_commits_nothing_then_recovers(self, backend: CacheBackend, origin: OriginServer,
                                                          model: str) -> None:
        from .core.errors import DownloadError

        data = archive_of(model, "gz")
        url = origin.add("/cut.tar.gz", data, ranges=False)
        # One cut per attempt the backend's config allows (retries + 1), so the first resolve fails.
        attempts = backend.config.retries + 1
        origin.fail("/cut.tar.gz", *[("cut", len(data) // 2)] * attempts)
        with pytest.raises(DownloadError):
            self.resolve(backend, url)
        assert not self.committed_keys(self.fresh(backend))
        path = self.resolve(self.fresh(backend), url)
        assert self.read(backend, path) == tree_of(model)

    def test_racing_writers_one_manifest_same_objects(self, backend: CacheBackend, origin: OriginServer,
                                                      model: str) -> None:
        """No lease at all: two writers write the same entry; the first commit wins, the second
        returns the same path without replacing its manifest, and the second's abort (as after
        any failure) deletes nothing of the committed entry."""
        from .core.cache import download_into
        from .core.handles import parse_handle
        from .core.locate import locate

        url = origin.add("/race.tar.gz", archive_of(model))
        handle = parse_handle(url)
        location = locate(handle, "COMPRESSED")
        store = backend.store
        first, second = store.writer(handle.key, url), store.writer(handle.key, url)
        manifests = [download_into(w, handle, location, backend.config) for w in (first, second)]
        assert first.commit(manifests[0]) == store.entry_path(handle.key)
        committed = self.manifest_bytes(backend, handle.key)
        assert second.commit(manifests[1]) == store.entry_path(handle.key)
        second.abort()
        assert self.manifest_bytes(backend, handle.key) == committed
        assert self.read(backend, store.entry_path(handle.key)) == tree_of(model)
        assert self.fresh(backend).store.verify(handle.key, full=True) == []


class ManagementCases(ConformanceFixtures):
    """What ``hubcache ls``, ``rm`` and ``verify`` rest on: listing, removal, damage found."""

    def test_entries_and_remove(self, backend: CacheBackend, origin: OriginServer, model: str) -> None:
        from .core.handles import cache_key

        url = origin.add("/e.tar.gz", archive_of(model))
        self.resolve(backend, url)
        entries = {e.key: e for e in backend.entries()}
        assert entries[cache_key(url)].state == "committed"
        assert entries[cache_key(url)].size == sum(len(v) for v in tree_of(model).values())
        assert backend.store.remove(cache_key(url))
        assert cache_key(url) not in self.committed_keys(self.fresh(backend))

    def test_damage_is_reported_by_entries_and_verify(self, backend: CacheBackend, origin: OriginServer,
                                                      model: str) -> None:
        """A file rewritten with other bytes of its size is found by a full verify only (by its
        CRC-32); a file gone is found by a quick one, and the entry is listed as damaged."""
        from .core.handles import cache_key

        url = origin.add("/d.tar.gz", archive_of(model))
        path = self.resolve(backend, url)
        key = cache_key(url)
        fs, root = self.filesystem(backend, path)
        pb = f"{root.rstrip('/')}/saved_model.pb"
        original = fs.cat_file(pb)
        fs.pipe_file(pb, bytes(len(original)))  # same size, other bytes
        store = self.fresh(backend).store
        assert store.verify(key) == []
        problems = store.verify(key, full=True)
        assert len(problems) == 1 and problems[0].startswith("saved_model.pb has CRC-32"), problems
        fs.rm_file(pb)
        assert store.verify(key) == ["saved_model.pb is missing"]
        assert {e.key: e.state for e in self.fresh(backend).entries()}[key] == "damaged"


class UntrustedCases(ConformanceFixtures):
    """What another writer of the cache left is untrusted: an unsafe manifest is a miss."""

    POISONS: dict[str, Callable[[dict[str, Any]], object]] = {  # a manifest's JSON -> edited in place
        # a file "of the entry" outside it: verify --full would read it, a tier copy would copy it
        "dotdot_file": lambda m: m["files"].append(["../../outside", 1, "00000000"]),
        "absolute_file": lambda m: m["files"].append(["/etc/hostname", 1, "00000000"]),
        # a link leaving the entry: a tier copy or a repair would recreate it
        "escaping_symlink": lambda m: m["symlinks"].update({"leak": "../../../etc/passwd"}),
        # a name that is not in normal form
        "unnormal_dir": lambda m: m["dirs"].append("variables//x"),
    }

    @pytest.mark.parametrize("poison", sorted(POISONS))
    def test_an_unsafe_manifest_is_a_miss_and_is_replaced(self, backend: CacheBackend, origin: OriginServer, model: str,
                                                          poison: str) -> None:
        """A manifest someone else wrote into the cache is checked as an archive's members are: an
        unsafe one makes the entry damaged (a miss, downloaded again, its manifest replaced), and
        every other entry still lists, verifies and resolves; the damaged one can be removed."""
        import json

        from .core.handles import cache_key

        url = origin.add(f"/poisoned-{poison}.tar.gz", archive_of(model))
        other = origin.add(f"/other-{poison}.tar.zst", archive_of(model, "zst"))
        path = self.resolve(backend, url)
        other_path = self.resolve(backend, other)
        key = cache_key(url)
        data = json.loads(self.manifest_bytes(backend, key))
        self.POISONS[poison](data)
        self.write_manifest(backend, key, json.dumps(data).encode())

        fresh = self.fresh(backend)
        assert fresh.store.lookup(key, url) is None, "an unsafe manifest must not be trusted"
        listed = {e.key: e for e in fresh.entries()}
        assert listed[key].state != "committed" and listed[cache_key(other)].state == "committed"
        assert fresh.store.verify(key), "verify reports the damaged entry"
        assert fresh.store.verify(cache_key(other)) == []
        assert self.resolve(self.fresh(backend), other) == other_path
        assert origin.count(f"/other-{poison}.tar.zst") == 1

        assert self.resolve(self.fresh(backend), url) == path
        assert origin.count(f"/poisoned-{poison}.tar.gz") == 2, "the damaged entry is downloaded again"
        assert self.read(backend, path) == tree_of(model)
        replaced = json.loads(self.manifest_bytes(backend, key))
        assert replaced != data and key in self.committed_keys(self.fresh(backend))

        self.write_manifest(backend, key, json.dumps(data).encode())  # damaged again: rm still removes it
        assert self.fresh(backend).store.remove(key)
        assert key not in {e.key for e in self.fresh(backend).entries()}
        assert cache_key(other) in self.committed_keys(self.fresh(backend))


class ConcurrencyCases(ConformanceFixtures):
    """Real processes on one cache (``MULTI_PROCESS``): the lease admits one holder at a time, and
    processes resolving one handle download it once.

    Each child rebuilds the backend from its class (importable by module and qualified name) and
    the pickled config, inherits this process's environment, says it is ready, and starts when
    told to, so that the children race.
    """

    #: How many processes resolve the same handle at once.
    RACERS = 3

    def test_two_processes_race_for_the_lease_exactly_one_wins(self, backend: CacheBackend,
                                                               tmp_path: pathlib.Path) -> None:
        """Two processes take the download lease of one key at the same moment: one wins, the
        other waits (told who holds it) and gets the lease only after the winner released it;
        a released lease leaves the key free."""
        import uuid

        self.require("MULTI_PROCESS")
        key = uuid.uuid4().hex + "0" * 8
        arrived = tmp_path / "arrived"
        arrived.mkdir()
        results = self.race(backend, tmp_path, _LEASE_RACER, key, str(arrived), count=2)
        winners = [r for r in results if not r["waited_for"]]
        assert len(winners) == 1, results
        winner, loser = winners[0], next(r for r in results if r["waited_for"])
        assert len(loser["waited_for"]) == 1 and f"pid {winner['pid']}" in loser["waited_for"][0], (
            "the waiter is told who holds the lease", results)
        assert loser["acquired"] >= winner["released"], "mutual exclusion"
        assert self.fresh(backend).store.busy(key) is None, "a released lease leaves the key free"

    def test_processes_resolving_one_handle_download_it_once(self, backend: CacheBackend, origin: OriginServer,
                                                             model: str, tmp_path: pathlib.Path) -> None:
        """:attr:`RACERS` processes resolve one handle at the same moment (a download lasts about
        a second): one downloads and commits, the others wait for it; all get the same path, the
        origin serves the archive once."""
        from .core.handles import cache_key

        self.require("MULTI_PROCESS")
        data = archive_of(model)
        url = origin.add("/shared.tar.gz", data)
        origin.throttle("/shared.tar.gz", len(data) / 1.0)
        results = self.race(backend, tmp_path, _RESOLVER, url, count=self.RACERS)
        entry = backend.store.entry_path(cache_key(url))
        assert {r["path"] for r in results} == {entry}
        assert origin.count("/shared.tar.gz") == 1, "exactly one origin download"
        downloads = sum("download_started" in r["events"] for r in results)
        commits = sum("committed" in r["events"] for r in results)
        waits = sum("waiting" in r["events"] for r in results)
        assert downloads == commits == 1 and waits == self.RACERS - 1, results
        assert self.read(backend, entry) == tree_of(model)
        if self.SHARED_ACROSS_HOSTS:
            left = [os.path.join(d, f) for i in range(self.RACERS)
                    for d, _, files in os.walk(tmp_path / f"child-{i}-tmp") for f in files]
            assert left == [], "a shared cache leaves no local files"


#: What every child process of the kit starts with: the backend class rebuilt from its module and
#: name (``sys.argv[1:3]``) with the pickled config (``sys.argv[3]``) as ``backend``; ``args``, the
#: rest of its arguments; ``say(event, **data)``, one JSON line on stdout (from any thread, never
#: interleaved).
_CHILD_PRELUDE = r"""
import base64, importlib, json, os, pickle, signal, sys, threading, time

module, qualname, config = sys.argv[1:4]
args = sys.argv[4:]
cls = importlib.import_module(module)
for part in qualname.split("."):
    cls = getattr(cls, part)
backend = cls(pickle.loads(base64.b64decode(config)))
said = threading.Lock()

def say(event, **data):
    line = json.dumps({"event": event, "time": time.time(), **data}) + "\n"
    with said:
        sys.stdout.write(line)
        sys.stdout.flush()
"""

# Takes the lease of a key; holds it until both racers have arrived at lock() (however late one
# started), and a little longer, so the other one's attempt meets a held lease.
_LEASE_RACER = r"""
key, arrived = args
store = backend.store
store.busy(key)  # the first request (a client's connection) before the go line
say("ready")
sys.stdin.readline()
open(os.path.join(arrived, str(os.getpid())), "w").close()
waited = []
with store.lock(key, waited.append):
    acquired = time.time()
    while len(os.listdir(arrived)) < 2 and time.time() < acquired + 20:
        time.sleep(0.05)
    time.sleep(0.3)
    released = time.time()
say("done", pid=os.getpid(), waited_for=waited, acquired=acquired, released=released)
"""

# Resolves a handle, recording the events it sees.
_RESOLVER = r"""
import hubcache
from hubcache.core.handles import parse_handle
from hubcache.core.locate import locate
from hubcache.plugins.registry import get_registry

kinds = []

class Spy:
    @hubcache.hookimpl
    def hubcache_event(self, event):
        kinds.append(event.kind)

get_registry().register(Spy(), "spy")
handle = parse_handle(args[0])
location = locate(handle, "COMPRESSED")
backend.store.busy(handle.key)  # the first request (a client's connection) before the go line
say("ready")
sys.stdin.readline()
path = backend.resolve(handle, location)
say("resolved", path=path, events=kinds)
"""


# A host with a local (home) tier of its own in front of the backend's store resolves a handle
# through the chain, recording the events it sees (kind, tier, time).
_CHAIN_RESOLVER = r"""
import hubcache
from hubcache.backends.home import HomeBackend
from hubcache.core.handles import parse_handle
from hubcache.core.locate import locate
from hubcache.core.tiers import TieredBackend
from hubcache.plugins.registry import get_registry

url, hosts = args
root = os.path.join(hosts, str(os.getpid()))
config = backend.config
chain = TieredBackend(config, [HomeBackend(config.replace(cache_dir=root)), backend])
events = []

class Spy:
    @hubcache.hookimpl
    def hubcache_event(self, event):
        events.append({"kind": event.kind, "backend": event.backend, "time": time.time()})

get_registry().register(Spy(), "spy")
handle = parse_handle(url)
location = locate(handle, "COMPRESSED")
backend.store.busy(handle.key)  # the first request (a client's connection) before the go line
say("ready")
sys.stdin.readline()
path = chain.resolve(handle, location)
say("resolved", path=path, root=root, events=events)
"""


class CacheBackendConformance(ResolveCases, CommitCases, ManagementCases, UntrustedCases, ConcurrencyCases):
    """What every cache backend must do. Subclass it in a test module and provide a ``backend``
    fixture returning a fresh instance of your backend (with its own empty cache root); set a
    capability flag (:class:`ConformanceFixtures`) to ``False`` where your backend lacks it.

    The suite starts its own origin server; it calls ``backend.resolve`` directly, so no
    environment variables are needed. Small limits are set through ``Config.replace``: build your
    backend from the ``conformance_config`` fixture to have them.
    """


def _object_store(backend: CacheBackend) -> ObjectStore:
    """``backend``'s store, which the object-store cases and measurements need to be an
    :class:`~hubcache.stores.objectstore.ObjectStore`."""
    from .stores.objectstore import ObjectStore

    store = backend.store
    assert isinstance(store, ObjectStore), (
        f"{type(backend).__name__}'s store is a {type(store).__name__}, not an ObjectStore: "
        "use CacheBackendConformance for it")
    return store


def _existing(store: ObjectStore, path: str) -> bytes:
    """The bytes of the object ``path``, which must exist."""
    data = store.read_object(path)
    assert data is not None, f"{path} is gone"
    return data


def _manifest_of(store: LocalStore | ObjectStore, key: str) -> Manifest:
    """The manifest of the entry ``key``, which must have one."""
    manifest = store.read_manifest(key)
    assert manifest is not None, f"no manifest for {key}"
    return manifest


class ObjectStoreFixtures(ConformanceFixtures):
    """The fixtures of the object-store cases: the store, its lease TTL, a bucket no one created."""

    LEASE_TTL = 1.5
    SUPPORTS_LINKS = False
    SUPPORTS_EXEC_BIT = False
    SHARED_ACROSS_HOSTS = True

    def object_store(self, backend: CacheBackend) -> ObjectStore:
        """The backend's store (the suite is for object stores only)."""
        return _object_store(backend)

    def missing_root(self, backend: CacheBackend, tmp_path: pathlib.Path) -> tuple[str, str]:
        """A root in a bucket no one created, of the backend's scheme (override it if creating
        that bucket's name is not enough, e.g. a service that names buckets otherwise)."""
        import uuid

        scheme = str(backend.config.cache_dir).split("://", 1)[0]
        return f"{scheme}://hubcache-no-such-bucket-{uuid.uuid4().hex[:12]}/cache", "bucket"


class ObjectStoreCases(ObjectStoreFixtures):
    """The object-store primitives the commit and the lease rest on, listing, and capped reads of
    what others wrote."""

    def test_conditional_replace_refuses_a_stale_version(self, backend: CacheBackend) -> None:
        """The primitive the lease rests on: a rewrite against a version that is no longer the
        object's (or of an object that is gone) is refused, and changes nothing."""
        import uuid

        from .stores.objectstore import PreconditionFailed

        store = self.object_store(backend)
        path = store.object_path(f"probe-{uuid.uuid4().hex}.lock")
        assert store.read_versioned(path) is None
        store.create_object(path, b"holder A, beat 1")
        versioned = store.read_versioned(path)
        assert versioned is not None
        data, first = versioned
        second = store.replace_object(path, b"holder A, beat 2", first)
        assert data == b"holder A, beat 1" and second != first
        with pytest.raises(PreconditionFailed):
            store.replace_object(path, b"holder A, stale", first)
        assert store.read_versioned(path) == (b"holder A, beat 2", second)
        with pytest.raises(PreconditionFailed):
            store.delete_versioned(path, first)
        store.delete_versioned(path, second)
        assert store.read_versioned(path) is None
        with pytest.raises(PreconditionFailed):
            store.replace_object(path, b"gone", second)
        assert store.read_versioned(path) is None

    def test_create_object_refuses_an_existing_key(self, backend: CacheBackend) -> None:
        """The commit's and the lease's conditional create: an existing object, empty or not, is
        never replaced (a client may close an empty "create only" upload with a plain write)."""
        import uuid

        store = self.object_store(backend)
        path = store.object_path(f"probe-{uuid.uuid4().hex}")
        store.create_object(path, b"first")
        with pytest.raises(FileExistsError):
            store.create_object(path, b"second")
        assert store.read_object(path) == b"first"
        empty = store.object_path(f"empty-{uuid.uuid4().hex}")
        store.create_object(empty, b"")
        with pytest.raises(FileExistsError):
            store.create_object(empty, b"")
        assert store.read_object(empty) == b""

    def test_listing_an_entry_never_includes_its_siblings(self, backend: CacheBackend) -> None:
        """An entry's listing is what is under "<key>/", even when nothing is: a listing of the
        prefix "<root>/<key>" would also find "<key>.lock", "<key>.manifest.json"..., which a
        commit would delete as debris of an earlier archive (gcsfs 2024.12 answers so)."""
        store = self.object_store(backend)
        key = "ab" * 20
        for name in (".lock", ".manifest.json", ".descriptor.txt"):
            store.write_object(store.object_path(key + name), b"{}")
        assert store.list_objects(store.object_path(key)) == {}
        store.write_object(store.object_path(f"{key}/saved_model.pb"), b"pb")
        assert store.list_objects(store.object_path(key)) == {store.object_path(f"{key}/saved_model.pb"): 2}

    def test_what_others_wrote_is_read_with_a_cap_and_unlisted_objects_are_reported(
            self, backend: CacheBackend, origin: OriginServer, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Objects others wrote into the bucket are read with a cap: a descriptor whose manifest
        is a valid one followed by a megabyte of padding (so that, read whole, it would parse) is larger
        than the cap, hence a damaged entry, downloaded again and replaced, after reading no more
        than the cap plus one byte of it; a lease object padded the same way is read capped too.
        An object planted in an entry that its manifest does not list is named by
        ``verify --full``."""
        import json

        from .core.handles import cache_key
        from .maintenance.verify import verify
        from .stores import objectstore

        store = self.object_store(backend)
        monkeypatch.setattr(objectstore, "MAX_MANIFEST_BYTES", 16 << 10)
        url = origin.add("/capped.tar.gz", archive_of(model))
        path = self.resolve(backend, url)
        key = cache_key(url)
        descriptor_path = store.object_path(f"{key}.descriptor.txt")
        padded = _existing(store, descriptor_path) + b" " * (1 << 20)
        store.write_object(descriptor_path, padded)
        lease_path = store._lease_path(key)
        store.write_object(lease_path, json.dumps({"owner": "planted", "lease": "x", "time": 0}).encode()
                           + b" " * (1 << 20))
        fresh = self.fresh(backend).store
        sizes: list[int] = []
        for name in ("read_object", "read_versioned"):
            original = getattr(fresh, name)

            def counted(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                out = _original(*args, **kwargs)
                if out is not None:
                    sizes.append(len(out if isinstance(out, bytes) else out[0]))
                return out

            setattr(fresh, name, counted)
        assert fresh.lookup(key, url) is None, "a manifest over the cap is not trusted"
        assert fresh.verify(key), "verify reports it"
        assert fresh.busy(key) is None, "the planted lease is long dead"
        assert sizes and max(sizes) <= max(objectstore.MAX_MANIFEST_BYTES, objectstore.MAX_SMALL_OBJECT) + 1, sizes
        assert self.resolve(self.fresh(backend), url) == path
        assert origin.count("/capped.tar.gz") == 2, "downloaded again"
        assert len(_existing(store, descriptor_path)) < len(padded), ("the descriptor was replaced", len(_existing(store, descriptor_path)), len(padded))

        store.write_object(f"{store.object_path(key)}/planted.bin", b"not in the manifest")
        [result] = verify([self.fresh(backend)], [url], full=True)
        assert any("planted.bin" in problem for problem in result.problems), result.problems


class LeaseCases(ObjectStoreFixtures):
    """The lease: a stalled holder never overwrites its successor's lease or entry, a waiter
    judges a lease by its holder's TTL, a planted lease cannot claim forever, and the requests a
    holder, a waiter and a fleet send stay few."""

    def test_stalled_holder_cannot_overwrite_a_new_lease(self, backend: CacheBackend, tmp_path: pathlib.Path) -> None:
        """Holder A (a real process) is stopped with SIGSTOP just before it rewrites its lease, stays
        stopped past the TTL, and B takes the lease over; when A resumes, its rewrite must be refused:
        B's lease object is never overwritten, B keeps it, and A notices it lost it.

        The backend class must be importable by a child process (it is rebuilt there from its
        module, its name and the pickled config); the child inherits this process's environment.
        """
        self.object_store(backend)
        m = stalled_holder_takeover(backend, str(tmp_path), self.LEASE_TTL)
        assert m["b_waited_for_a"], m["b_waits"]
        assert m["b_wrote_its_lease"], "B's lease object holds B's lease after the takeover"
        assert not m["overwritten"], f"B's lease object was overwritten or removed: {m['overwritten'][:3]}"
        assert m["a_noticed_seconds"] is not None, "A never noticed that it lost the lease"
        assert m["b_beats_in_order"] and m["b_beats"][-1] > m["b_beats"][0], "B's heartbeat went on"
        assert not m["b_lost"], "B still holds the lease"
        assert m["a_lost"] is True, "A noticed that it lost the lease"
        assert m["a_exit_status"] == 0, "A exited cleanly"
        assert m["b_lease_after_a_exit"], "A's release left B's lease alone"
        assert m["distinct_leases"] and m["a_beat_pending"] >= 1
        assert m["b_released"], "B's release deleted its own lease"
        print(f"\n{type(backend).name}: lease TTL {self.LEASE_TTL:g} s; B took over {m['takeover_seconds']:.2f} s "
              f"after A stopped; A noticed the loss {m['a_noticed_seconds']:.2f} s after SIGCONT; "
              f"{m['lease_reads']} reads of B's lease, beats {m['b_beats'][0]}..{m['b_beats'][-1]}, none overwritten")

    def test_a_waiter_judges_a_lease_by_its_holders_ttl(self, backend: CacheBackend, tmp_path: pathlib.Path) -> None:
        """A holder (a real process) with a 30 s TTL heartbeats every 10 s; a waiter whose own TTL
        is 1 s must judge the lease by the holder's 30 s and wait (here: time out), not take the
        live lease over after 1 s of silence."""
        import json
        import time

        from .core.errors import CacheError

        self.object_store(backend)
        with LeaseHolder(backend, str(tmp_path), lease_ttl=30.0) as holder:
            waiter = self.object_store(type(backend)(backend.config.replace(lease_ttl=1.0, lock_timeout=4.0)))
            started = time.monotonic()
            with pytest.raises(CacheError) as info:
                with waiter.lock(holder.key, lambda owner: None):
                    pass
            waited = time.monotonic() - started
            lease = json.loads(_existing(waiter, waiter._lease_path(holder.key)))
        assert "held the download lease" in str(info.value) and f"pid {holder.pid}" in str(info.value)
        assert lease["lease"] == holder.lease, "the live lease was taken over"
        assert waited >= 4.0

    def test_a_planted_lease_cannot_claim_an_endless_ttl(self, backend: CacheBackend) -> None:
        """A lease claiming ``"ttl": 1e9`` is judged by at most max(own TTL, 10 min): one whose
        heartbeat time is 700 s old is a leftover, taken over at once."""
        import json
        import time
        import uuid

        store = self.object_store(backend)
        key = uuid.uuid4().hex + "0" * 8
        store.create_object(store._lease_path(key), json.dumps(
            {"owner": "planted", "lease": "x", "beat": 1, "time": time.time() - 700, "ttl": 1e9}).encode())
        waiter = self.object_store(type(backend)(backend.config.replace(lease_ttl=5.0, lock_timeout=20.0)))
        started = time.monotonic()
        with waiter.lock(key, lambda owner: None):
            took = time.monotonic() - started
            ours = json.loads(_existing(waiter, waiter._lease_path(key)))
        assert ours["owner"] != "planted" and took < 5.0, took

    def test_heartbeat_at_most_once_a_second(self, backend: CacheBackend) -> None:
        """Whatever the TTL, a holder rewrites its lease at most once a second (GCS allows about
        one update per second to one object name)."""
        import time
        import uuid

        store = self.object_store(type(backend)(backend.config.replace(lease_ttl=0.3)))
        self.object_store(backend)
        key = uuid.uuid4().hex + "0" * 8
        lease_path = store._lease_path(key)
        rewrites: list[float] = []
        for name in ("replace_object", "write_object"):
            original = getattr(store, name)

            def counted(path: str, *args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                if path == lease_path:
                    rewrites.append(time.monotonic())
                return _original(path, *args, **kwargs)

            setattr(store, name, counted)
        with store.lock(key, lambda owner: None):
            time.sleep(3.5)
        gaps = [b - a for a, b in zip(rewrites, rewrites[1:])]
        print(f"\n{type(backend).name}: TTL 0.3 s: {len(rewrites)} lease rewrites in 3.5 s")
        assert 2 <= len(rewrites) <= 4 and all(g >= 0.9 for g in gaps), rewrites

    def test_waiter_request_rate_and_commit_latency(self, backend: CacheBackend, tmp_path: pathlib.Path) -> None:
        """A waiter (even with a tiny TTL of its own) polls a live lease's entry at about five
        descriptor reads a second (backoff with jitter, capped at 0.25 s from the start of one read
        to the next) and reads the lease a few times per TTL of the holder; it notices the commit
        within a second (a quarter of a second and one read, unloaded)."""
        self.object_store(backend)
        m = waiter_request_rate(backend, str(tmp_path))
        print(f"\n{type(backend).name}: a waiter made {m['manifest_rate']:.2f} manifest reads/s over "
              f"{m['window']:g} s ({m['steady_rate']:.2f}/s after the first 2 s) and {m['lease_reads']} lease "
              f"reads; it noticed the commit after {m['latency']:.2f} s")
        # Steps are drawn from [0.125, 0.25] s (mean 0.1875 s: 5.3 reads/s); 8/s is the most
        # possible. The first 2 s of backoff (steps from 0.1 s) add about one read.
        assert m["manifest_rate"] <= 6.2 and m["steady_rate"] <= 6.0, m
        assert m["lease_reads"] <= 3, m
        assert m["latency"] < 1.0

    def test_a_waiter_reads_the_commit_once(self, backend: CacheBackend) -> None:
        """A host waiting for the lease learns of the commit from its poll of the descriptor,
        and the lookup right after takes that read: the committed descriptor is read once from
        the commit to the entry in hand (it was three times: the poll's head, the whole
        descriptor, the lookup's), so the copy of a waiting host starts sooner."""
        import threading
        import time
        import uuid

        holder = self.object_store(backend)
        waiter = self.object_store(type(backend)(backend.config))
        key = uuid.uuid4().hex + "0" * 8
        descriptor = waiter.descriptor_path(key)
        reads: list[float] = []
        original = waiter.read_versioned

        def counted(path: str, *args: Any, **kwargs: Any) -> Any:
            found = original(path, *args, **kwargs)
            if path == descriptor and found is not None:
                reads.append(time.monotonic())
            return found

        waiter.read_versioned = counted  # type: ignore[method-assign]  # this instance's reads are counted
        held = threading.Event()

        def hold() -> None:
            with holder.lock(key, lambda owner: None):
                held.set()
                time.sleep(1.0)
                holder.create_object(descriptor, _committed_descriptor(key))

        thread = threading.Thread(target=hold, daemon=True)
        thread.start()
        assert held.wait(30)
        with waiter.lock(key, lambda owner: None):
            assert key not in waiter._leases, "it waited, and found the commit"
        found = waiter.lookup(key, f"https://example.invalid/{key}")
        thread.join(30)
        assert found is not None and found[0] == waiter.entry_path(key)
        assert len(reads) == 1, f"the committed descriptor was read {len(reads)} times"
        # The next lookup reads it again: what a wait read serves one lookup, it is no cache.
        assert waiter.lookup(key, f"https://example.invalid/{key}") is not None and len(reads) == 2

    def test_a_slow_poll_is_not_followed_by_a_full_step(self, backend: CacheBackend) -> None:
        """A waiter's steps run from the start of one descriptor read to the start of the next:
        when the bucket answers slowly (each read here is made to take 0.4 s, longer than a
        step: an emulator cannot be made slow on demand, so the store's read is wrapped), the
        next read follows at once instead of a step after the slow one's end, so the commit is
        noticed within about one read."""
        import threading
        import time
        import uuid

        holder = self.object_store(backend)
        waiter = self.object_store(type(backend)(backend.config))
        key = uuid.uuid4().hex + "0" * 8
        descriptor = waiter.descriptor_path(key)
        reads: list[tuple[float, float]] = []
        original = waiter.read_versioned

        def slow(path: str, *args: Any, **kwargs: Any) -> Any:
            if path != descriptor:
                return original(path, *args, **kwargs)
            started = time.monotonic()
            time.sleep(0.4)
            found = original(path, *args, **kwargs)
            reads.append((started, time.monotonic()))
            return found

        waiter.read_versioned = slow  # type: ignore[method-assign]  # this instance's reads are slowed
        held = threading.Event()
        committed: list[float] = []

        def hold() -> None:
            with holder.lock(key, lambda owner: None):
                held.set()
                time.sleep(3.0)
                holder.create_object(descriptor, _committed_descriptor(key))
                committed.append(time.monotonic())

        thread = threading.Thread(target=hold, daemon=True)
        thread.start()
        assert held.wait(30)
        with waiter.lock(key, lambda owner: None):
            noticed = time.monotonic()
            assert key not in waiter._leases, "it waited, and found the commit"
        thread.join(30)
        # Between one read's end and the next one's start, only the lease reads (a few per TTL)
        # and the loop itself: not a sleep of 0.125-0.25 s.
        gaps = sorted(b[0] - a[1] for a, b in zip(reads, reads[1:]))
        print(f"\n{type(backend).name}: {len(reads)} reads of 0.4 s; gaps between them {[round(g, 3) for g in gaps]}; "
              f"noticed the commit {noticed - committed[0]:.2f} s after it")
        assert len(gaps) >= 5 and gaps[len(gaps) // 2] < 0.06, gaps
        assert noticed - committed[0] < 2 * 0.4 + 0.3

    def test_a_fleet_takes_a_dead_lease_over_with_few_rewrites(self, backend: CacheBackend) -> None:
        """Sixteen waiters (threads standing for hosts: only the requests they send matter here,
        and each has a store of its own) find the same dead lease at the same moment: one takes
        it over, and the lease object gets a few takeover rewrites, not one per waiter."""
        self.object_store(backend)
        m = fleet_takeover(backend, 16)
        print(f"\n{type(backend).name}: {m['waiters']} waiters on a dead lease: {m['rewrites']} takeover rewrites")
        assert m["winners"] == 1, m
        assert 1 <= m["rewrites"] <= 4, m

    def test_rm_and_prune_keep_an_entry_whose_lease_is_alive(self, backend: CacheBackend,
                                                             tmp_path: pathlib.Path) -> None:
        """While another process holds the lease of an entry it is downloading (objects uploaded,
        no manifest yet), ``rm`` and ``prune`` on this one keep the entry and say who downloads it;
        once the lease is past its TTL, the leftover goes, lease and all."""
        import json
        import time

        from .maintenance.manage import remove
        from .maintenance.prune import prune_store

        self.object_store(backend)
        with LeaseHolder(backend, str(tmp_path), lease_ttl=30.0, upload=True) as holder:
            store = self.object_store(self.fresh(backend))
            assert {e.key: e.state for e in store.entries()}.get(holder.key) == "in progress"
            busy = store.busy(holder.key)
            assert busy and f"pid {holder.pid}" in busy and "being downloaded by" in busy
            records = remove([holder.key], [self.fresh(backend)])
            report = prune_store(self.fresh(backend).store)
            objects = store.list_objects(store.object_path(holder.key))
            lease = json.loads(_existing(store, store._lease_path(holder.key)))
        assert [(r["outcome"], r["reason"]) for r in records] == [("kept", busy)], records
        assert [(a.entry.key, a.outcome, a.kept_because) for a in report.actions] == [(holder.key, "kept", busy)]
        assert objects and lease["lease"] == holder.lease, "the download's objects and lease are intact"

        # A leftover: the objects of a download whose lease died long ago.
        store.create_object(store._lease_path(holder.key), json.dumps(
            {"owner": "gone", "lease": "y", "beat": 9, "time": time.time() - 1000, "ttl": 30}).encode())
        store.put_objects({f"{store.object_path(holder.key)}/saved_model.pb": b"partial"})
        assert store.busy(holder.key) is None
        report = prune_store(self.fresh(backend).store)
        assert [(a.entry.key, a.outcome) for a in report.actions] == [(holder.key, "removed")]
        assert not store.list_objects(store.object_path(holder.key))
        assert store.read_object(store._lease_path(holder.key)) is None

    @pytest.mark.parametrize("stall_at", ["upload", "commit"])
    def test_a_stalled_writer_never_overwrites_a_committed_entry(self, backend: CacheBackend, tmp_path: pathlib.Path,
                                                                 stall_at: str) -> None:
        """Writer A (a real process) downloads version 1 of a model and is stopped with SIGSTOP in
        the middle of its upload (``upload``: before its second object; ``commit``: after its
        last lease check, just before it creates the descriptor holding the manifest). The origin republishes the model
        (version 2, other bytes and sizes); B (this process) takes the silent lease over,
        downloads version 2 and commits it. A then gets SIGCONT: none of its pending writes may
        land on B's entry; A withdraws what it wrote, waits for B's commit and returns B's entry."""
        import hashlib

        from .core.handles import cache_key

        self.object_store(backend)
        old = build_model_dir(tmp_path / "v1", weights_bytes=200_000, shards=2, seed=1)
        new = build_model_dir(tmp_path / "v2", weights_bytes=300_000, shards=3, seed=2)
        with OriginServer() as origin:
            url = origin.add("/republished.tar.gz", archive_of(old))
            new_archive = archive_of(new)
            m = stalled_writer_republished(backend, str(tmp_path), url, self.LEASE_TTL, stall_at,
                                           republish=lambda: origin.add("/republished.tar.gz", new_archive))
            downloads = origin.count("/republished.tar.gz")
        key = cache_key(url)
        store = self.object_store(self.fresh(backend))
        manifest = store.read_manifest(key)
        assert m["a"]["event"] == "resolved", m["a"]
        assert m["a"]["path"] == m["b_path"] == store.entry_path(key)
        assert manifest is not None and manifest.archive["sha256"] == hashlib.sha256(new_archive).hexdigest()
        assert m["a"]["sha256"] == manifest.archive["sha256"], "A returned B's entry"
        problems = store.verify(key, full=True)
        assert problems == [], f"every object is B's, as its manifest says: {problems}"
        assert self.read(backend, store.entry_path(key)) == tree_of(new)
        listed = set(store._relative(key, store.list_objects(store.object_path(key))))
        assert listed == {f.path for f in manifest.files}, "no object of A's is left in the entry"
        assert downloads == 2, "A and B downloaded once each; A's second try found B's commit"
        assert m["a_lost"], "A learned that it lost the lease"
        print(f"\n{type(backend).name}: A stopped at {stall_at}; B took over and committed "
              f"{m['b_seconds']:.2f} s after A stopped; A returned B's entry {m['a_seconds']:.2f} s after "
              f"SIGCONT; 0 of A's writes landed on the committed entry")


class TierChainCases(ObjectStoreFixtures):
    """What a host with a local tier in front of this store (``HUBCACHE_BACKEND=home,<backend>``)
    must do when others can write the bucket: an entry planted or damaged there is a miss (the
    origin serves, nothing is written outside the local tier), a digest read from the bucket
    never satisfies a pin, and hosts that miss together download once: a host whose tiers all
    miss waits for the host holding the bucket's lease (at most the lock timeout), then copies the
    committed entry down."""

    #: A resolve that does not wait: a 20 KB model downloaded locally, a few bucket requests.
    TIER_AT_ONCE = 2.0

    #: case -> how a bucket writer edits the entry's manifest (``abs_``: an absolute path).
    TIER_LEAVING: dict[str, Callable[[Manifest, str], object]] = {
        "file ../../x": lambda m, abs_: m.files.append(_record("../../x", b"evil")),
        "absolute file name": lambda m, abs_: m.files.append(_record(abs_, b"evil")),
        "file a//b": lambda m, abs_: m.files.append(_record("variables//evil", b"evil")),
        "link l -> ../../x": lambda m, abs_: m.symlinks.update(l="../../x"),
    }

    #: case -> how a bucket writer damages an object (``path``) behind its well-formed manifest.
    TIER_DAMAGE: dict[str, Callable[[ObjectStore, str, bytes], object]] = {
        "missing": lambda store, path, data: store.delete_objects([path]),
        "one byte longer": lambda store, path, data: store.write_object(path, data + b"!"),
        "same size, other bytes": lambda store, path, data: store.write_object(
            path, bytes(b ^ 0xFF for b in data[:64]) + data[64:]),
    }

    @pytest.fixture
    def tier_model(self, tmp_path: pathlib.Path) -> str:
        return build_model_dir(tmp_path / "tier-model", weights_bytes=20_000)

    def tier_chain(self, backend: CacheBackend, local_root: pathlib.Path, **settings: object) -> TieredBackend:
        """A fresh two-tier chain: a local (``home``) cache on ``local_root``, then ``backend``'s
        store (a new instance on the same root), built directly from ``backend.config``."""
        from .backends.home import HomeBackend
        from .core.tiers import TieredBackend

        config = backend.config.replace(**settings)
        local = HomeBackend(config.replace(cache_dir=str(local_root)))
        return TieredBackend(config, [local, type(backend)(config)])

    def filled_bucket(self, backend: CacheBackend, origin: OriginServer, model: str) -> tuple[str, str]:
        """Resolve a handle of ``model`` with ``backend`` alone (a host filled the bucket), then
        forget the origin's request count. Returns the handle and its cache key."""
        from .core.handles import cache_key

        url = origin.add("/tiers/m.tar.gz", archive_of(model))
        self.resolve(backend, url)
        origin.reset_counts()
        return url, cache_key(url)

    def resolve_through_chain(self, backend: CacheBackend, origin: OriginServer, model: str, tmp_path: pathlib.Path,
                              url: str) -> str:
        """A second host (an empty local tier) resolves ``url`` through the chain. Asserts that
        the bucket's entry was a miss: nothing under ``tmp_path`` outside the local tier changed
        (victims wait where ``../../x`` of the local writer and an absolute name point), only the
        entry is in the local tier, the origin served once, the served files are the model's and
        their digest is one this process verified."""
        from .core.handles import parse_handle
        from .stores.localstore import LocalStore

        local_root = tmp_path / "host2" / "cache"
        chain = self.tier_chain(backend, local_root)
        local = chain.tiers[0].store
        assert isinstance(local, LocalStore), local  # the home tier's store
        os.makedirs(local.root)
        for victim, data in ((local_root.parent / "x", b"victim"), (tmp_path / "abs-victim", b"v")):
            victim.write_bytes(data)
        before = _state_outside(str(tmp_path), local.root)
        path = self.resolve(chain, url)
        after = _state_outside(str(tmp_path), local.root)
        key = parse_handle(url).key
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        assert not changed, f"written or removed outside the local tier: {changed[:5]}"
        assert not [n for n in os.listdir(local.root) if not n.startswith(key) or n.endswith(".tmp")]
        assert path == local.entry_path(key), path
        assert tree_of(path) == tree_of(model), "the served files are not the model's"
        assert origin.count() == 1, "the bucket's entry must not serve; the origin does"
        assert _manifest_of(local, key).archive.get("verified", True) is not False
        return path

    @pytest.mark.parametrize("case", sorted(TIER_LEAVING))
    def test_tier_chain_a_planted_manifest_leaving_the_entry_is_a_miss(
            self, backend: CacheBackend, origin: OriginServer, tier_model: str, tmp_path: pathlib.Path,
            case: str) -> None:
        """A bucket writer adds a name that leaves the entry (``..``, absolute, not in normal
        form, a link out) to a committed entry's manifest, and plants the announced bytes where
        the name points: a host copying the entry down misses it, the origin serves, nothing is
        written outside its local tier. Two checks stop it, each enough alone: the store's own
        reading of a manifest (:meth:`ObjectStore.read_manifest`) and the chain's check of the
        source entry before a copy (:mod:`hubcache.core.tiers`)."""
        store = self.object_store(backend)
        url, key = self.filled_bucket(backend, origin, tier_model)
        edited = _edit_manifest(store, key, lambda m: self.TIER_LEAVING[case](m, str(tmp_path / "abs-victim")))
        entry = store.object_path(key)
        for name in {r.path for r in edited.files} - set(tree_of(tier_model)):
            store.write_object(posixpath.normpath(f"{entry}/{name}"), b"evil")
        self.resolve_through_chain(backend, origin, tier_model, tmp_path, url)

    @pytest.mark.parametrize("damage", sorted(TIER_DAMAGE))
    def test_tier_chain_an_object_damaged_behind_its_manifest_is_a_miss(
            self, backend: CacheBackend, origin: OriginServer, tier_model: str, tmp_path: pathlib.Path,
            damage: str) -> None:
        """A weights object of a committed entry is removed, lengthened, or rewritten with other
        bytes of the same size, its manifest left as it was: the copy down stops at the
        mismatch, nothing of it is served, the origin serves the handle."""
        store = self.object_store(backend)
        url, key = self.filled_bucket(backend, origin, tier_model)
        weights = max(_manifest_of(store, key).files, key=lambda r: r.size).path
        path = store.object_path(f"{key}/{weights}")
        self.TIER_DAMAGE[damage](store, path, _existing(store, path))
        self.resolve_through_chain(backend, origin, tier_model, tmp_path, url)

    def test_tier_chain_a_forged_entry_never_satisfies_a_pin(self, backend: CacheBackend, origin: OriginServer,
                                                             tier_model: str, tmp_path: pathlib.Path) -> None:
        """A bucket writer replaces an entry's objects with other bytes and its manifest with a
        consistent one (sizes, CRC-32s) that still claims the real archive's sha256: a host
        resolving the pinned handle through the chain downloads from the origin, checks the
        archive against the pin and serves the real model."""
        store = self.object_store(backend)
        url, key = self.filled_bucket(backend, origin, tier_model)
        digest = _manifest_of(store, key).archive["sha256"]
        forged = tree_of(build_model_dir(tmp_path / "forged", weights_bytes=20_000, seed=7))
        assert forged != tree_of(tier_model)
        for rel, data in forged.items():
            store.write_object(store.object_path(f"{key}/{rel}"), data)

        def claim(m: Manifest) -> None:
            m.files = [_record(rel, data) for rel, data in sorted(forged.items())]

        assert _edit_manifest(store, key, claim).archive["sha256"] == digest
        assert self.fresh(backend).store.lookup(key, url) is not None, "a consistent entry: a hit in the bucket"
        self.resolve_through_chain(backend, origin, tier_model, tmp_path, f"{url}#sha256={digest}")

    def test_tier_chain_waits_for_a_live_lease_at_most_the_lock_timeout(
            self, backend: CacheBackend, origin: OriginServer, tier_model: str, tmp_path: pathlib.Path) -> None:
        """Another process (a :class:`LeaseHolder`, heartbeat going) holds the bucket's lease of the
        handle's key while this host misses in every tier: the host waits for that holder (hosts
        that miss together download once), and once ``lock_timeout`` has passed without a commit it
        downloads into its local tier itself, writing nothing under the key in the bucket."""
        import json
        import time

        from .core.handles import cache_key

        self.object_store(backend)
        url = origin.add("/tiers/leased.tar.gz", archive_of(tier_model))
        lock_timeout = 1.5
        chain = self.tier_chain(backend, tmp_path / "local", lock_timeout=lock_timeout)
        local, bucket = chain.tiers[0].store, self.object_store(chain.tiers[1])
        holder = LeaseHolder(backend, str(tmp_path), lease_ttl=30.0)
        holder.key = cache_key(url)
        with holder:
            started = time.monotonic()
            path = self.resolve(chain, url)
            took = time.monotonic() - started
            left = (bucket.list_objects(bucket.object_path(holder.key)),
                    [bucket.read_object(bucket.object_path(holder.key + s)) for s in (".manifest.json", ".descriptor.txt")],
                    json.loads(_existing(bucket, bucket._lease_path(holder.key)))["lease"])
        assert lock_timeout <= took < lock_timeout + self.TIER_AT_ONCE, f"took {took:.1f} s"
        assert path == local.entry_path(holder.key) and tree_of(path) == tree_of(tier_model)
        assert origin.count() == 1
        assert left == ({}, [None, None], holder.lease), "the bucket holds nothing but the holder's lease"

    #: Hosts in :meth:`test_tier_chain_hosts_that_miss_together_download_once`.
    FLEET_HOSTS = 6

    def test_tier_chain_hosts_that_miss_together_download_once(
            self, backend: CacheBackend, origin: OriginServer, tmp_path: pathlib.Path) -> None:
        """:attr:`FLEET_HOSTS` processes, each a host with a local tier of its own in front of
        this store (``home,<backend>``), resolve one cold handle at the same moment (a download
        lasts about a second): the origin serves it once, one host commits it to the bucket, and
        every other host waits for that commit and copies the entry down from the bucket, within
        a second or two of the commit."""
        from .core.handles import cache_key

        self.require("MULTI_PROCESS")
        model = build_model_dir(tmp_path / "fleet-model", weights_bytes=200_000)
        data = archive_of(model)
        url = origin.add("/tiers/fleet.tar.gz", data)
        origin.throttle("/tiers/fleet.tar.gz", len(data) / 1.0)
        self.object_store(backend)
        results = self.race(backend, tmp_path, _CHAIN_RESOLVER, url, str(tmp_path / "hosts"),
                            count=self.FLEET_HOSTS)
        key = cache_key(url)
        assert origin.count("/tiers/fleet.tar.gz") == 1, "one origin download for the fleet"
        name = type(backend).name
        committers = [r for r in results if [e for e in r["events"] if e["kind"] == "copied" and e["backend"] == name]]
        assert len(committers) == 1, [r["events"] for r in results]
        committed_at = next(e["time"] for e in committers[0]["events"] if e["kind"] == "copied")
        for r in results:
            assert r["path"] == os.path.join(r["root"], key) and tree_of(r["path"]) == tree_of(model)
            if r is committers[0]:
                continue
            kinds = [(e["kind"], e["backend"]) for e in r["events"]]
            assert ("download_started", "home") not in kinds, kinds
            assert ("waiting", name) in kinds and ("copied", "home") in kinds, kinds
            copied_at = next(e["time"] for e in r["events"] if e["kind"] == "copied" and e["backend"] == "home")
            assert copied_at - committed_at < 2.5, "the waiting hosts copy soon after the commit"


class ObjectLayoutCases(ObjectStoreFixtures):
    """The bucket holds exactly what tensorflow_hub's cache does (``<key>/...`` and
    ``<key>.descriptor.txt`` per model, the manifest at the descriptor's end), whatever wrote it
    (a download, an adoption of tensorflow_hub's entry, the move of an older hubcache's entry);
    what is read from the descriptor is untrusted; a hit writes nothing."""

    #: The store methods that write (a hit must call none of them).
    WRITES = ("create_object", "write_object", "put_objects", "put_stream", "copy_object", "delete_objects",
              "replace_object", "delete_versioned", "put_versioned", "put_batch_versioned", "copy_versioned")

    def names(self, store: ObjectStore) -> set[str]:
        """Every object name under the store's root, relative to it."""
        prefix = store.base + "/"
        return {p[len(prefix):] for p in store.list_objects(store.base)}

    def assert_tfhub_layout(self, store: ObjectStore, trees: dict[str, dict[str, bytes]]) -> None:
        """The root holds ``<key>/<file>`` for each file of each ``{key: tree}`` and
        ``<key>.descriptor.txt`` holding a manifest, nothing else."""
        from .core import entry

        expected = {f"{key}/{rel}" for key, tree in trees.items() for rel in tree}
        expected |= {entry.descriptor_name(key) for key in trees}
        assert self.names(store) == expected
        for key in trees:
            assert entry.descriptor_manifest(_existing(store, store.descriptor_path(key))) is not None, key

    def committed_entry(self, backend: CacheBackend, url: str) -> tuple[str, str, ObjectStore, bytes, bytes]:
        """Resolve ``url`` (a miss) and return ``(path, key, store, descriptor, manifest)``: the
        committed descriptor's bytes and the manifest at its end."""
        from .core import entry
        from .core.handles import cache_key

        path = self.resolve(backend, url)
        key = cache_key(url)
        store = self.object_store(backend)
        descriptor = _existing(store, store.descriptor_path(key))
        manifest = entry.descriptor_manifest(descriptor)
        assert manifest is not None, "a committed descriptor holds the manifest"
        return path, key, store, descriptor, manifest

    def spy_writes(self, store: ObjectStore) -> list[str]:
        """Record every write ``store`` (this instance) makes: ``["<method> <path>", ...]``."""
        calls: list[str] = []
        for name in self.WRITES:
            original = getattr(store, name)

            def call(first: Any, *args: Any, _original: Callable[..., Any] = original, _name: str = name,
                     **kwargs: Any) -> Any:
                calls.append(f"{_name} {first if isinstance(first, str) else sorted(first)}")
                return _original(first, *args, **kwargs)

            setattr(store, name, call)
        return calls

    def test_cold_resolves_leave_exactly_tensorflow_hubs_names(
            self, backend: CacheBackend, origin: OriginServer, model: str, tmp_path: pathlib.Path) -> None:
        """After cold resolves of two handles, listing the root shows exactly the two names per
        model tensorflow_hub's cache holds: no lease, no manifest object, nothing else."""
        from .core.handles import cache_key

        other = build_model_dir(tmp_path / "other", weights_bytes=30_000, seed=7)
        urls = {origin.add("/layout-a.tar.gz", archive_of(model)): model,
                origin.add("/layout-b.tar.gz", archive_of(other)): other}
        for url in urls:
            self.resolve(backend, url)
        self.assert_tfhub_layout(self.object_store(backend),
                                 {cache_key(url): tree_of(tree) for url, tree in urls.items()})

    def test_a_hit_writes_nothing(self, backend: CacheBackend, origin: OriginServer, model: str) -> None:
        """A hit by a new process (a fresh backend) calls no store method that writes, and
        every object keeps its version."""
        url = origin.add("/hit.tar.gz", archive_of(model))
        path = self.resolve(backend, url)
        store = self.object_store(backend)
        before = store.list_versioned(store.base)
        fresh = self.fresh(backend)
        writes = self.spy_writes(self.object_store(fresh))
        assert self.resolve(fresh, url) == path
        assert writes == [] and store.list_versioned(store.base) == before
        assert origin.count() == 1

    def test_an_older_hubcaches_entry_is_read_then_moved_into_the_descriptor(
            self, backend: CacheBackend, origin: OriginServer, model: str) -> None:
        """An entry an older hubcache committed (its descriptor without a manifest, the manifest
        in ``<key>.manifest.json``) is listed as committed and resolves without the origin; that
        resolve moves the manifest into the descriptor and deletes the old object (and its
        lease): the next hit writes nothing."""
        from .core import entry

        url = origin.add("/older.tar.gz", archive_of(model))
        path, key, store, committed, manifest = self.committed_entry(backend, url)
        # As an older hubcache left it.
        store.write_object(store.legacy_manifest_path(key), manifest)
        store.write_object(store.descriptor_path(key), entry.descriptor_head(committed).encode())
        assert {e.key: e.state for e in self.fresh(backend).entries()}[key] == "committed"
        fresh = self.fresh(backend)
        assert self.resolve(fresh, url) == path
        assert origin.count() == 1, "the older entry is a hit"
        assert entry.descriptor_manifest(_existing(store, store.descriptor_path(key))) == manifest
        self.assert_tfhub_layout(store, {key: tree_of(model)})
        again = self.fresh(backend)
        writes = self.spy_writes(self.object_store(again))
        assert self.resolve(again, url) == path and writes == []

    def test_a_tensorflow_hub_descriptor_is_adopted_and_then_carries_the_manifest(
            self, backend: CacheBackend, origin: OriginServer, model: str) -> None:
        """An entry tensorflow_hub wrote (its objects, its descriptor) is adopted: its manifest
        is recorded in its descriptor (tensorflow_hub's lines kept), nothing is added beside it,
        and the next hit reads it from there. The record is a conditional replace: a descriptor
        rewritten between the read and the replace (tensorflow_hub writing again) is left as it
        is, and the resolve is still a hit."""
        from .core import entry
        from .core.handles import cache_key

        store = self.object_store(backend)
        trees: dict[str, dict[str, bytes]] = {}
        for name in ("adopted", "raced"):
            url = origin.add(f"/{name}.tar.gz", archive_of(model))
            key = cache_key(url)
            trees[key] = tree_of(model)
            store.put_objects({f"{store.object_path(key)}/{rel}": data for rel, data in trees[key].items()})
            tfhub = f"Module: {url}\nDownload Time: now\nDownloader Hostname: elsewhere (PID:1)".encode()
            store.write_object(store.descriptor_path(key), tfhub)
            fresh = self.fresh(backend)
            if name == "raced":
                fresh_store = self.object_store(fresh)
                original = fresh_store.replace_object

                def racing(path: str, data: bytes, version: str, _original: Callable[..., str] = original,
                           _key: str = key) -> str:
                    if path == fresh_store.descriptor_path(_key):
                        store.write_object(path, tfhub + b"\n")  # tensorflow_hub rewrites it meanwhile
                    return _original(path, data, version)

                fresh_store.replace_object = racing  # type: ignore[method-assign]
            assert self.resolve(fresh, url) == store.entry_path(key)
            assert origin.count() == 0, "an adopted entry is not downloaded"
            descriptor = _existing(store, store.descriptor_path(key))
            if name == "raced":
                assert descriptor == tfhub + b"\n", "a descriptor changed since it was read is not overwritten"
                continue
            assert descriptor.startswith(tfhub + b"\n" + entry.WRITER_MARK.encode()), descriptor[:300]
            assert entry.descriptor_manifest(descriptor) is not None
            again = self.fresh(backend)
            writes = self.spy_writes(self.object_store(again))
            listed: list[str] = []
            original_list = self.object_store(again).list_versioned

            def listing(path: str, _original: Callable[[str], dict[str, tuple[int, str]]] = original_list
                        ) -> dict[str, tuple[int, str]]:
                listed.append(path)
                return _original(path)

            self.object_store(again).list_versioned = listing  # type: ignore[method-assign]
            assert self.resolve(again, url) == store.entry_path(key)
            assert writes == [] and listed == [], "the next hit reads the manifest from the descriptor"
            assert _manifest_of(store, key).creator == "adopted from tensorflow_hub"
        names = self.names(store)
        assert names == {f"{key}/{rel}" for key, tree in trees.items() for rel in tree} | {
            entry.descriptor_name(key) for key in trees}, names

    #: case -> a hostile descriptor, from a committed one's head (``h``) and manifest (``m``).
    HOSTILE_DESCRIPTORS: dict[str, Callable[[str, dict[str, Any]], bytes]] = {
        "a name leaving the entry": lambda h, m: _descriptor(h, {**m, "files": m["files"] + [["../x", 1, ""]]}),
        "an absolute name": lambda h, m: _descriptor(h, {**m, "files": m["files"] + [["/etc/x", 1, ""]]}),
        "garbage after the Manifest line": lambda h, m: h.encode() + b"Manifest:\n\x00\xff{[garbage",
        "larger than the cap (a valid manifest)": lambda h, m: _descriptor(h, {**m, "creator": "x" * (40 << 10)}),
    }

    @pytest.mark.parametrize("case", sorted(HOSTILE_DESCRIPTORS))
    def test_a_hostile_descriptor_is_a_damaged_entry(self, backend: CacheBackend, origin: OriginServer, model: str,
                                                     monkeypatch: pytest.MonkeyPatch, case: str) -> None:
        """A descriptor a bucket writer replaced (a manifest naming files outside the entry,
        garbage, one over the cap) is never trusted: a miss, listed ``damaged``, reported by
        ``verify``; a resolve downloads again and replaces it with a valid one."""
        import json

        from .core import entry
        from .stores import objectstore

        monkeypatch.setattr(objectstore, "MAX_MANIFEST_BYTES", 32 << 10)
        url = origin.add("/hostile.tar.gz", archive_of(model))
        path, key, store, committed, manifest = self.committed_entry(backend, url)
        hostile = self.HOSTILE_DESCRIPTORS[case](entry.descriptor_head(committed), json.loads(manifest))
        store.write_object(store.descriptor_path(key), hostile)
        fresh = self.fresh(backend)
        assert fresh.store.lookup(key, url) is None
        assert {e.key: e.state for e in fresh.entries()}[key] == "damaged"
        assert fresh.store.verify(key)
        assert self.resolve(fresh, url) == path
        assert origin.count() == 2, "downloaded again"
        assert _manifest_of(store, key).handle == url, "replaced by a valid descriptor"
        self.assert_tfhub_layout(store, {key: tree_of(model)})

    def test_a_writer_killed_before_the_descriptor_leaves_nothing_trusted(
            self, backend: CacheBackend, origin: OriginServer, model: str, tmp_path: pathlib.Path) -> None:
        """A writer (a real child process) uploads every file, then is killed (``SIGKILL``) just
        before it creates the descriptor: the entry's objects are all there, but no descriptor,
        so nothing is trusted (a miss, not ``committed``). Once the dead lease's TTL has passed,
        a resolve downloads again, commits, and leaves exactly tensorflow_hub's names."""
        from .core.handles import cache_key

        self.require("MULTI_PROCESS")
        url = origin.add("/killed.tar.gz", archive_of(model))
        key = cache_key(url)
        store = self.object_store(backend)
        config = backend.config.replace(lease_ttl=0.1)  # judged by the shortest TTL (3 s)
        child = _Child(_KILLED_AT_COMMIT, backend, config, [url], str(tmp_path / "killed-stderr.txt"), str(tmp_path))
        try:
            child.wait_for("killing", timeout=60)
            assert child.process.wait(30) == -9
        finally:
            child.close()
        uploaded = {p[len(store.object_path(key)) + 1:] for p in store.list_objects(store.object_path(key))}
        assert uploaded == set(tree_of(model)), "every file was uploaded"
        assert store.read_object(store.descriptor_path(key)) is None
        fresh = self.fresh(backend)
        assert fresh.store.lookup(key, url) is None
        assert {e.key: e.state for e in fresh.entries()}[key] in ("in progress", "damaged")
        assert self.resolve(fresh, url) == store.entry_path(key)
        assert origin.count() == 2, "downloaded again"
        self.assert_tfhub_layout(store, {key: tree_of(model)})


class ObjectStoreConformance(ObjectStoreCases, ObjectLayoutCases, LeaseCases, TierChainCases,
                             CacheBackendConformance):
    """Everything :class:`CacheBackendConformance` checks, plus what a backend whose store is an
    :class:`~hubcache.stores.objectstore.ObjectStore` must do (:class:`ObjectStoreCases`,
    :class:`ObjectLayoutCases`, :class:`LeaseCases`, :class:`TierChainCases`). Subclass it (instead of the base suite) for an
    object-store backend, with the same ``backend`` fixture. Its flags: no links
    (``SUPPORTS_LINKS = False``: copies), no executable bit, shared across hosts.
    """


class LeaseHolder:
    """A real child process holding the download lease of a fresh key of ``backend``'s store
    (with its own ``lease_ttl``, heartbeat going) until the ``with`` block ends.

    With ``upload``, it first uploads a partial entry (one object, no manifest), as a download
    in progress would have. Attributes once entered: ``key``, ``pid``, ``lease`` (its lease id).
    The backend class must be importable by the child (see :func:`stalled_holder_takeover`).
    """

    def __init__(self, backend: CacheBackend, workdir: str, *, lease_ttl: float, upload: bool = False) -> None:
        import uuid

        self.backend, self.workdir, self.lease_ttl, self.upload = backend, workdir, lease_ttl, upload
        self.key = uuid.uuid4().hex + "0" * 8

    def __enter__(self) -> "LeaseHolder":
        import base64
        import json
        import pickle
        import subprocess
        import sys

        cls = type(self.backend)
        config = self.backend.config.replace(lease_ttl=self.lease_ttl)
        self._stderr = open(os.path.join(self.workdir, f"lease-holder-{self.key[:8]}.txt"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, cls.__module__, cls.__qualname__,
             base64.b64encode(pickle.dumps(config)).decode(), self.key, "1" if self.upload else ""],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env={**os.environ, "TMPDIR": self.workdir})
        self.pid = self.proc.pid
        line = _pipe(self.proc.stdout).readline()
        if not line:
            self.__exit__(None, None, None)
            self._stderr.seek(0)
            raise AssertionError(f"the lease holder never took the lease: {self._stderr.read()[-2000:]}")
        self.lease = json.loads(line)["lease"]
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc.poll() is None:
                _pipe(self.proc.stdin).close()
                self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._stderr.close()


_HOLDER = _CHILD_PRELUDE + r"""
key, upload = args[:2]
store = backend.store
with store.lock(key, lambda holder: None):
    if upload:
        store.put_objects({f"{store.object_path(key)}/variables/variables.index": b"half a model"})
    print(json.dumps({"lease": store._leases[key].id}), flush=True)
    sys.stdin.read()
"""


def waiter_request_rate(backend: CacheBackend, workdir: str, window: float = 8.0) -> dict[str, float]:
    """Measure what one waiting host sends while another process (a :class:`LeaseHolder` with a
    30 s TTL) holds an entry's lease: its manifest reads per second over ``window`` seconds
    (``manifest_rate``; ``steady_rate`` after the first 2 s of backoff), its lease reads
    (``lease_reads``), and how long after the commit it noticed it (``latency``, seconds). The
    waiter's own TTL is a tiny 0.4 s: it must judge the lease by the holder's."""
    import threading
    import time

    with LeaseHolder(backend, workdir, lease_ttl=30.0) as holder:
        waiter = _object_store(type(backend)(backend.config.replace(lease_ttl=0.4, lock_timeout=120.0)))
        manifest_path = waiter.object_path(f"{holder.key}.descriptor.txt")
        lease_path = waiter._lease_path(holder.key)
        reads: dict[str, list[float]] = {"manifest": [], "lease": []}
        for name in ("read_object", "read_versioned"):
            original = getattr(waiter, name)

            def counted(path: str, *args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                kind = {manifest_path: "manifest", lease_path: "lease"}.get(path)
                if kind:
                    reads[kind].append(time.monotonic())
                return _original(path, *args, **kwargs)

            setattr(waiter, name, counted)
        result: list[str | float] = []

        def wait() -> None:
            with waiter.lock(holder.key, lambda owner: None):
                # Entered without a lease of its own: the entry got committed meanwhile.
                result.append("lease" if holder.key in waiter._leases else time.monotonic())

        started = time.monotonic()
        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        time.sleep(window)
        manifest_rate = sum(t - started < window for t in reads["manifest"]) / window
        # After the backoff reached its cap (0.1 + 0.2 + 0.4 + 0.8 s of steps at most).
        steady_rate = sum(2 <= t - started < window for t in reads["manifest"]) / (window - 2)
        lease_reads = sum(t - started < window for t in reads["lease"])
        waiter.create_object(manifest_path, _committed_descriptor(holder.key))  # "the commit"
        committed = time.monotonic()
        thread.join(10)
    assert result and not isinstance(result[0], str), f"the waiter took the live lease: {result}"
    return {"window": window, "manifest_rate": manifest_rate, "steady_rate": steady_rate,
            "lease_reads": lease_reads, "latency": result[0] - committed}


def fleet_takeover(backend: CacheBackend, waiters: int = 16) -> dict[str, int]:
    """``waiters`` threads (standing for hosts: each has a store of its own) find the same dead
    lease at the same moment; returns ``winners`` (how many got the lease) and ``rewrites`` (the
    takeover rewrites the lease object received)."""
    import json
    import threading
    import time
    import uuid

    key = uuid.uuid4().hex + "0" * 8
    config = backend.config.replace(lease_ttl=5.0, lock_timeout=60.0)
    stores = [_object_store(type(backend)(config)) for _ in range(waiters)]
    lease_path = stores[0]._lease_path(key)
    stores[0].create_object(lease_path, json.dumps(
        {"owner": "dead", "lease": "x", "beat": 1, "time": time.time() - 1000, "ttl": 3}).encode())
    attempts: list[float] = []
    for store in stores:
        original = store.replace_object

        def counted(path: str, *args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            if path == lease_path:
                attempts.append(time.monotonic())
            return _original(path, *args, **kwargs)

        store.replace_object = counted  # type: ignore[method-assign]  # this instance's calls are counted
    start = threading.Barrier(len(stores))
    winners: list[int] = []

    def wait(i: int) -> None:
        store = stores[i]
        start.wait()
        with store.lock(key, lambda owner: None):
            # As the resolver does (commit.py): once holding the lease, look the entry up again.
            # A waiter can read "no lease" just after the winner committed and released, and
            # then take a fresh lease of its own; it finds the commit and writes nothing.
            if key in store._leases and store.lookup(key, f"https://example.invalid/{key}") is None:
                winners.append(i)
                time.sleep(0.3)  # less than a heartbeat (5 / 3 s): no rewrite of its own
                store.create_object(store.object_path(f"{key}.descriptor.txt"), _committed_descriptor(key))

    threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return {"waiters": waiters, "winners": len(winners), "rewrites": len(attempts)}


class StalledHolderReport(TypedDict):
    """What :func:`stalled_holder_takeover` measured (its keys are described there)."""

    takeover_seconds: float
    a_noticed_seconds: float | None
    lease_reads: int
    overwritten: list[dict[str, Any] | None]
    b_beats: list[int]
    b_beats_in_order: bool
    b_waits: list[str]
    b_waited_for_a: bool
    b_wrote_its_lease: bool
    a_lost: bool
    a_exit_status: int
    b_lost: bool
    b_lease_after_a_exit: bool
    b_released: bool
    distinct_leases: bool
    a_beat_pending: int


def stalled_holder_takeover(backend: CacheBackend, workdir: str, lease_ttl: float) -> StalledHolderReport:
    """Run the stalled-holder scenario against ``backend``'s object store; return what happened.

    Holder A, a real child process, takes the lease of a fresh key and stops itself with
    ``SIGSTOP`` just before its heartbeat rewrites the lease; once A is stopped, B (this process,
    a store instance of its own) waits for the lease and takes it over after ``lease_ttl``; then A
    gets ``SIGCONT``. B's lease object is read for two TTLs after that, A is told to release and
    exit, and B releases. Nothing is asserted about the outcome (the caller does); an
    ``AssertionError`` means the scenario itself could not be played (A never took the lease).

    Args:
        backend: an object-store backend; its class must be importable by a child process (it
            is rebuilt there from its module, its name and the pickled config), which inherits
            this process's environment.
        workdir: a directory for the child's temp files and stderr.
        lease_ttl: the lease TTL for both holders, in seconds.

    Returns:
        ``takeover_seconds`` (A stopped to B holding the lease), ``a_noticed_seconds`` (SIGCONT to
        A knowing it lost the lease; None if it never did), ``lease_reads`` and ``overwritten``
        (B's lease object as read after SIGCONT: the reads that were not B's lease), ``b_beats``
        (B's heartbeat counts as read) and ``b_beats_in_order``, ``b_waited_for_a`` and
        ``b_waits`` (what B's wait reported), ``b_wrote_its_lease``, ``a_lost`` and ``b_lost``
        (each holder's own view), ``b_lease_after_a_exit`` (B's lease intact after A released),
        ``b_released`` (the object gone after B released), ``distinct_leases``, ``a_beat_pending``.
    """
    import json
    import signal
    import time
    import uuid

    config = backend.config.replace(lease_ttl=lease_ttl)
    cls = type(backend)
    key = uuid.uuid4().hex + "0" * 8
    holder = _Child(_STALLING_HOLDER, backend, config, [key], os.path.join(workdir, "holder-stderr.txt"),
                    workdir, stdin=True)
    wait_for = holder.wait_for

    entered = None
    try:
        a_lease = wait_for("acquired", timeout=60)["lease"]
        stall = wait_for("stalling", timeout=10 * lease_ttl)
        _wait_stopped(holder.pid)
        stopped_at = time.time()
        # B: another host (this process), with its own store instance.
        store_b = _object_store(cls(config))
        waits: list[str] = []
        entered = store_b.lock(key, waits.append)
        entered.__enter__()
        took_over = time.time() - stopped_at
        b_lease = store_b._leases[key].id
        lease_path = store_b.object_path(f"{key}.lock")
        raw = store_b.read_object(lease_path)
        b_wrote = raw is not None and json.loads(raw)["lease"] == b_lease
        os.kill(holder.pid, signal.SIGCONT)
        resumed_at = time.time()
        # Read B's lease object for two TTLs after A resumed: A's pending rewrite must never land.
        seen: list[dict[str, Any] | None] = []
        while time.time() < resumed_at + 2 * lease_ttl:
            raw = store_b.read_object(lease_path)
            seen.append(json.loads(raw) if raw is not None else None)
            time.sleep(0.02)
        try:
            noticed = wait_for("lost", timeout=5 * lease_ttl)["time"] - resumed_at
        except AssertionError:
            noticed = None
        holder.tell("done")
        done = wait_for("done", timeout=30)
        exit_status = holder.process.wait(30)
        after_a_exit = store_b.read_object(lease_path)
        b_lost = store_b.lease_lost(key)
    finally:
        if entered is not None:
            entered.__exit__(None, None, None)
        holder.close()
    beats = [s["beat"] for s in seen if s is not None and s["lease"] == b_lease]
    return {
        "takeover_seconds": took_over,
        "a_noticed_seconds": noticed,
        "lease_reads": len(seen),
        "overwritten": [s for s in seen if s is None or s["lease"] != b_lease],
        "b_beats": beats or [0],
        "b_beats_in_order": beats == sorted(beats),
        "b_waits": waits,
        "b_waited_for_a": bool(waits) and f"pid {holder.pid}" in waits[0],
        "b_wrote_its_lease": b_wrote,
        "a_lost": done["lost"],
        "a_exit_status": exit_status,
        "b_lost": b_lost,
        "b_lease_after_a_exit": after_a_exit is not None and json.loads(after_a_exit)["lease"] == b_lease,
        "b_released": store_b.read_object(lease_path) is None,
        "distinct_leases": a_lease != b_lease,
        "a_beat_pending": stall["beat_pending"],
    }


class StalledWriterReport(TypedDict):
    """What :func:`stalled_writer_republished` measured (its keys are described there)."""

    a: dict[str, Any]
    a_lost: bool
    b_path: str
    b_seconds: float
    a_seconds: float


def stalled_writer_republished(backend: CacheBackend, workdir: str, url: str, lease_ttl: float, stall_at: str,
                               republish: Callable[[], object]) -> StalledWriterReport:
    """Run the stalled-writer scenario against ``backend``'s object store; return what happened.

    Writer A, a real child process, resolves ``url`` through ``backend`` (each file its own
    upload) and stops itself with ``SIGSTOP`` at ``stall_at`` (``"upload"``: just before its
    second upload of an entry object; ``"commit"``: just before it creates the descriptor). Once A
    is stopped, ``republish()`` is called (the caller changes the origin's archive) and B (this
    process, a backend instance of its own) resolves ``url``: it waits out A's silent lease,
    takes it over, downloads and commits. Then A gets ``SIGCONT`` and finishes its resolve.

    Returns:
        ``a`` (A's last report: ``{"event": "resolved", "path", "sha256"}`` or ``{"event":
        "failed", "error"}``), ``a_lost`` (A saw its lease taken over), ``b_path``,
        ``b_seconds`` (A stopped to B's commit), ``a_seconds`` (SIGCONT to A's answer).
    """
    import signal
    import time

    from .core.handles import parse_handle
    from .core.locate import locate

    config = backend.config.replace(lease_ttl=lease_ttl)
    cls = type(backend)
    writer = _Child(_STALLING_WRITER, backend, config, [url, stall_at],
                    os.path.join(workdir, f"writer-{stall_at}-stderr.txt"), workdir)
    wait_for = writer.wait_for
    lines = writer.lines

    try:
        wait_for("stalling", timeout=60)
        _wait_stopped(writer.pid)
        stopped_at = time.time()
        republish()
        handle = parse_handle(url)
        b_path = cls(config).resolve(handle, locate(handle, "COMPRESSED"))
        b_seconds = time.time() - stopped_at
        os.kill(writer.pid, signal.SIGCONT)
        resumed_at = time.time()
        a = wait_for("resolved", "failed", timeout=30 + 10 * lease_ttl)
        a_seconds = time.time() - resumed_at
        writer.process.wait(30)
    finally:
        writer.close()
    return {"a": a, "a_lost": any(line["event"] == "lost" for line in lines), "b_path": b_path,
            "b_seconds": b_seconds, "a_seconds": a_seconds}


class _Child:
    """A kit child process: ``script`` (a :data:`_CHILD_PRELUDE` script) run with the backend's
    class and pickled ``config`` and ``args``; each JSON line it says is collected by a thread.

    Args:
        script: the child's program.
        backend: whose class the child rebuilds (it must be importable there).
        config: the config the child's backend gets.
        args: more arguments for the script.
        stderr_path: where the child's stderr goes (quoted when it never says an event).
        workdir: the child's ``TMPDIR``.
        stdin: give the child a pipe to read (``tell``).
    """

    def __init__(self, script: str, backend: CacheBackend, config: Config, args: list[str],
                 stderr_path: str, workdir: str, *, stdin: bool = False) -> None:
        import base64
        import json
        import pickle
        import subprocess
        import sys
        import threading

        cls = type(backend)
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", script, cls.__module__, cls.__qualname__,
                 base64.b64encode(pickle.dumps(config)).decode(), *args],
                stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE, stderr=stderr,
                text=True, env={**os.environ, "TMPDIR": workdir})
        self.pid = self.process.pid
        self.lines: list[dict[str, Any]] = []

        def read_lines() -> None:
            for line in _pipe(self.process.stdout):
                self.lines.append(json.loads(line))

        self._reader = threading.Thread(target=read_lines, daemon=True)
        self._reader.start()

    def wait_for(self, *events: str, timeout: float) -> dict[str, Any]:
        """The first line the child said with one of ``events``, waiting up to ``timeout``.

        Raises:
            AssertionError: it did not say one in time (or exited), with its lines and stderr.
        """
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if line["event"] in events]
            if found:
                return found[0]
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.01)
        with open(self.stderr_path) as f:
            raise AssertionError(f"the child never said {events}: {self.lines}, {f.read()[-3000:]}")

    def tell(self, line: str) -> None:
        """Write one line to the child's stdin."""
        _pipe(self.process.stdin).write(line + "\n")
        _pipe(self.process.stdin).flush()

    def close(self) -> None:
        """Kill the child if it still runs (resumed first, in case it is stopped)."""
        import signal

        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait()


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until the process is in the stopped state (``T`` in /proc/PID/stat)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop")


# A lease holder that stops itself with a real SIGSTOP at the worst moment: its heartbeat has
# decided to rewrite the lease and is about to send the request. Only the moment is chosen by
# wrapping the store's write calls; the stop, the wait past the TTL and the resume are real.
_STALLING_HOLDER = _CHILD_PRELUDE + r"""
key = args[0]
store = backend.store
lease_path = store.object_path(f"{key}.lock")
stalled = []

def stalling(name):
    original = getattr(store, name)

    def call(path, *args, **kwargs):
        if path == lease_path and not stalled:
            stalled.append(True)
            say("stalling", beat_pending=len(stalled))
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(path, *args, **kwargs)

    setattr(store, name, call)

for name in ("write_object", "replace_object"):  # the heartbeat's rewrite, whichever it uses
    if hasattr(store, name):
        stalling(name)

with store.lock(key, lambda holder: None):
    say("acquired", lease=store._leases[key].id)

    def watch():
        while not store.lease_lost(key):
            time.sleep(0.01)
        say("lost")

    threading.Thread(target=watch, daemon=True).start()
    sys.stdin.readline()
    say("done", lost=store.lease_lost(key))
"""


# A writer that stops itself with a real SIGSTOP in the middle of its upload or its commit. Only
# the moment is chosen by wrapping the store's calls; the stop and the resume are real.
_STALLING_WRITER = _CHILD_PRELUDE + r"""
from hubcache.core.handles import parse_handle
from hubcache.core.locate import locate

url, stall_at = args[:2]
store = backend.store
store.batch_files = 1  # each file its own upload
handle = parse_handle(url)
prefix = store.object_path(handle.key) + "/"
manifest_path = store.object_path(handle.key + ".descriptor.txt")
uploads = []

def stall():
    say("stalling")
    os.kill(os.getpid(), signal.SIGSTOP)

def wrap(name, paths_of):
    original = getattr(store, name)

    def call(first, *args, **kwargs):
        if stall_at == "upload" and any(p.startswith(prefix) for p in paths_of(first)):
            uploads.append(name)
            if len(uploads) == 2:
                stall()
        if stall_at == "commit" and name == "create_object" and first == manifest_path:
            stall()
        return original(first, *args, **kwargs)

    setattr(store, name, call)

for name, paths_of in (("put_batch_versioned", list), ("put_versioned", lambda path: [path]),
                       ("put_objects", list), ("put_stream", lambda path: [path]),
                       ("create_object", lambda path: [])):
    if hasattr(store, name):
        wrap(name, paths_of)

def watch():
    while not store.lease_lost(handle.key):
        time.sleep(0.01)
    say("lost")

threading.Thread(target=watch, daemon=True).start()
confirm = getattr(store, "confirm_lease", None)

def confirm_lease(key):
    try:
        confirm(key)
    except Exception as error:
        if type(error).__name__ == "LeaseLostError":
            say("lost")
        raise

if confirm is not None:
    store.confirm_lease = confirm_lease
try:
    path = backend.resolve(handle, locate(handle, "COMPRESSED"))
    say("resolved", path=path, sha256=store.read_manifest(handle.key).archive.get("sha256"))
except Exception as error:
    say("failed", error=f"{type(error).__name__}: {error}")
"""


# A writer that uploads every file of an entry and is killed (SIGKILL) just before it creates
# the descriptor (the commit). Only the moment is chosen by wrapping the store's call; the kill is real.
_KILLED_AT_COMMIT = _CHILD_PRELUDE + r"""
from hubcache.core.handles import parse_handle
from hubcache.core.locate import locate

url = args[0]
store = backend.store
handle = parse_handle(url)
descriptor = store.object_path(handle.key + ".descriptor.txt")
original = store.create_object

def create_object(path, data):
    if path == descriptor:
        say("killing")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, data)

store.create_object = create_object
backend.resolve(handle, locate(handle, "COMPRESSED"))
say("resolved")
"""


def _descriptor(head: str, manifest: dict[str, Any]) -> bytes:
    """A descriptor with ``head``'s lines and ``manifest`` (any JSON) as its manifest."""
    import json

    from .core import entry

    return entry.descriptor_with_manifest(head, json.dumps(manifest).encode())


# -- helpers of the tier-chain cases ------------------------------------------------------------


def _record(path: str, data: bytes) -> FileRecord:
    """A manifest's record of a file ``path`` holding ``data``."""
    import zlib

    from .core.manifest import FileRecord, crc_hex

    return FileRecord(path, len(data), crc_hex(zlib.crc32(data)))


def _edit_manifest(store: ObjectStore, key: str, edit: Callable[[Manifest], object]) -> Manifest:
    """Rewrite ``key``'s manifest (at the end of its descriptor) in an object ``store`` with
    ``edit(manifest)``, as a bucket writer would; return the manifest written."""
    from .core import entry
    from .core.manifest import Manifest

    path = store.object_path(f"{key}.descriptor.txt")
    descriptor = _existing(store, path)
    found = entry.descriptor_manifest(descriptor)
    assert found is not None, f"no manifest in {path}"
    manifest = Manifest.from_json(found)
    edit(manifest)
    store.write_object(path, entry.descriptor_with_manifest(entry.descriptor_head(descriptor), manifest.to_json()))
    return manifest


def _committed_descriptor(key: str) -> bytes:
    """A descriptor committing an empty entry for ``key`` (what a waiter for a commit sees)."""
    from .core import entry
    from .core.manifest import Manifest

    return entry.descriptor_with_manifest(entry.descriptor_text(f"https://example.invalid/{key}"),
                                          Manifest(handle=f"https://example.invalid/{key}").to_json())


def _state_outside(base: str, skip: str) -> dict[str, str]:
    """Every directory, file and link under ``base`` except the tree ``skip``: path -> what it is
    (``dir``, a link's target, a file's sha256)."""
    import hashlib

    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != skip]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                state[full] = "link to " + os.readlink(full)
            elif os.path.isdir(full):
                state[full] = "dir"
            else:
                with open(full, "rb") as f:
                    state[full] = hashlib.sha256(f.read()).hexdigest()
    return state
