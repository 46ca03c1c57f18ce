"""``hubcache.plugin``: the one module a backend author imports, and what it promises.

The S3 example is built as an outsider builds a plugin, so it is the check that the facade is
enough: it may import nothing of hubcache but ``hubcache.plugin``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hubcache.plugin as plugin
from hubcache.backends.gcs import GcsBackend
from hubcache.core.config import load_config
from hubcache.core.errors import ConfigError

S3_DIR = Path(__file__).resolve().parents[1] / "examples" / "hubcache-s3"
S3_EXAMPLE = S3_DIR / "hubcache_s3.py"
#: The example's two modules: the plugin, and the store class it imports when a store is built.
S3_MODULES = (S3_EXAMPLE, S3_DIR / "hubcache_s3_store.py")


def _s3_module():
    """The example's module, loaded from its file (whether or not the example is installed)."""
    if str(S3_DIR) not in sys.path:  # its store module, imported lazily, is found beside it
        sys.path.append(str(S3_DIR))
    spec = importlib.util.spec_from_file_location("hubcache_s3_under_test", S3_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hubcache_references(source: str) -> list[str]:
    """Every part of hubcache ``source`` imports or reaches as an attribute of ``hubcache``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "hubcache"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "hubcache":
                # `from hubcache import plugin` names the facade too; `from hubcache import X` not.
                found += [f"hubcache.{alias.name}" for alias in node.names]
            elif node.module.startswith("hubcache."):
                found.append(node.module)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hubcache":
            found.append(f"hubcache.{node.attr}")
    return found


@pytest.mark.parametrize("module", S3_MODULES, ids=lambda p: p.name)
def test_the_s3_example_imports_only_the_facade(module):
    references = _hubcache_references(module.read_text())
    assert references, "the example must use hubcache at all"
    assert {ref for ref in references if ref != "hubcache.plugin"} == set(), references


def test_loading_the_s3_plugin_does_not_load_the_object_store_machinery():
    """Every hubcache command loads every plugin: the S3 one costs nothing until an s3:// cache
    is used (before, it imported the object-store protocol, ~25 modules, on every command)."""
    program = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(S3_DIR)!r})
        import hubcache_s3
        before = "hubcache.stores.objectstore" in sys.modules
        from hubcache.plugin import ObjectStore
        store_class = hubcache_s3.S3Backend.store_class(None)
        print(json.dumps([before, issubclass(store_class, ObjectStore),
                          hubcache_s3.S3ObjectStore is store_class]))
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            env=dict(os.environ), timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [False, True, True]


def test_the_reference_finder_sees_internal_imports():
    """The check above would pass on an empty list of findings: show it finds each spelling."""
    source = textwrap.dedent("""
        import hubcache
        import hubcache.core.backend
        from hubcache import ConfigError
        from hubcache.stores.objectstore import ObjectStore
        from hubcache.plugin import hookimpl
        hubcache.hookimpl
    """)
    assert _hubcache_references(source) == ["hubcache", "hubcache.core.backend", "hubcache.ConfigError",
                                            "hubcache.stores.objectstore", "hubcache.plugin", "hubcache.hookimpl"]


def test_importing_the_facade_imports_nothing_heavy():
    """A fresh interpreter: this test process has imported pytest, gcsfs and more already."""
    heavy = ("pytest", "_pytest", "gcsfs", "s3fs", "botocore", "tensorflow", "hubcache.conformance",
             # the object-store protocol is loaded when a store is built (or a plugin subclasses
             # ObjectStore), not by every plugin that imports the facade: plugins load on every command
             "hubcache.stores.objectstore")
    program = textwrap.dedent(f"""
        import json, sys
        import hubcache.plugin
        from hubcache.plugin import hookimpl, ObjectStoreBackend, ConfigError, Store
        print(json.dumps([name for name in {heavy!r} if name in sys.modules]))
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            env=dict(os.environ), timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_every_exported_name_resolves_to_the_object_core_uses():
    from hubcache.core import backend, errors, events, handles, locate, manifest, store
    from hubcache.stores import objectstore
    from hubcache.plugins.hookspecs import hookimpl

    assert plugin.__doc__ and "stable" in plugin.__doc__.lower()
    assert len(plugin.__all__) == len(set(plugin.__all__))
    for name in plugin.__all__:
        assert getattr(plugin, name) is not None, name
    # The same objects, not copies: core's isinstance checks and `except` clauses must see them.
    internal = {"hookimpl": hookimpl, "Backend": backend.Backend, "CacheBackend": backend.CacheBackend,
                "ObjectStoreBackend": backend.ObjectStoreBackend, "Store": store.Store,
                "EntryWriter": store.EntryWriter, "EntryInfo": store.EntryInfo,
                "ObjectStore": objectstore.ObjectStore, "PreconditionFailed": objectstore.PreconditionFailed,
                "Manifest": manifest.Manifest, "Location": locate.Location, "Event": events.Event,
                "Handle": handles.Handle, "ConfigError": errors.ConfigError,
                "MissingDependencyError": errors.MissingDependencyError, "CacheError": errors.CacheError,
                "HubcacheError": errors.HubcacheError}
    for name, obj in internal.items():
        assert name in plugin.__all__, name
        assert getattr(plugin, name) is obj, name
    with pytest.raises(AttributeError):
        plugin.NoSuchName  # noqa: B018


def test_star_import_gives_exactly_the_stable_names():
    namespace: dict[str, object] = {}
    exec("from hubcache.plugin import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(plugin.__all__)


def test_object_store_backends_share_the_base():
    s3 = _s3_module()
    assert issubclass(GcsBackend, plugin.ObjectStoreBackend)
    assert issubclass(s3.S3Backend, plugin.ObjectStoreBackend)
    assert issubclass(s3.S3ObjectStore, plugin.ObjectStore)


# -- the base's glue, on a backend of our own over fsspec's in-memory filesystem ------------------


class MemoryObjectBackend(plugin.ObjectStoreBackend):
    """What a third party writes for a new object store: a scheme, a filesystem, nothing else."""

    name = "memobj"
    scheme = "memory"
    description = "a cache in fsspec's memory filesystem"

    def filesystem(self):
        import fsspec

        return fsspec.filesystem("memory")


def test_the_base_builds_the_store_from_the_settings():
    config = load_config().replace(cache_dir="memory://facade-bucket/cache", lease_ttl=7.0, lock_timeout=9.0)
    backend = MemoryObjectBackend(config)
    assert MemoryObjectBackend.protocols == ("memory",), "the scheme is the protocol unless told otherwise"
    store = backend.store
    assert type(store) is plugin.ObjectStore  # no store_class override: the generic protocol
    assert (store.root, store.lease_ttl, store.lock_timeout) == ("memory://facade-bucket/cache", 7.0, 9.0)
    facts = backend.describe()
    assert facts["root"] == "memory://facade-bucket/cache" and facts["lease_ttl"] == 7.0


@pytest.mark.parametrize("cache_dir, found", [(None, "TFHUB_CACHE_DIR is not set"),
                                              ("/some/local/dir", "TFHUB_CACHE_DIR is '/some/local/dir', "
                                                                  "not a memory:// URL")])
def test_the_base_refuses_a_cache_dir_that_is_not_its_url(cache_dir, found):
    backend = MemoryObjectBackend(load_config().replace(cache_dir=cache_dir))
    with pytest.raises(ConfigError) as info:
        backend.store
    assert f"the memobj backend keeps its cache in a bucket, but {found}" in str(info.value)
    assert "set TFHUB_CACHE_DIR=memory://bucket/prefix" in str(info.value)


def test_the_base_refuses_a_url_without_a_bucket():
    backend = MemoryObjectBackend(load_config().replace(cache_dir="memory://"))
    with pytest.raises(ConfigError, match="cache dir 'memory://' names no bucket"):
        backend.store


def test_gcs_and_s3_messages_are_unchanged():
    """The base writes the messages each backend wrote itself before; pinned word for word."""
    s3 = _s3_module()
    cases = ((GcsBackend, "gs", "a", " (or --tfhub_cache_dir)"), (s3.S3Backend, "s3", "an", ""))
    for cls, scheme, article, flag in cases:
        with pytest.raises(ConfigError) as info:
            cls(load_config().replace(cache_dir="/local")).default_root()
        assert info.value.message == (f"the {cls.name} backend keeps its cache in a bucket, but "
                                      f"TFHUB_CACHE_DIR is '/local', not {article} {scheme}:// URL")
        assert info.value.hint == f"set TFHUB_CACHE_DIR={scheme}://bucket/prefix{flag}"
        with pytest.raises(ConfigError) as info:
            cls(load_config().replace(cache_dir=None)).default_root()
        assert info.value.message == (f"the {cls.name} backend keeps its cache in a bucket, but "
                                      "TFHUB_CACHE_DIR is not set")
        with pytest.raises(ConfigError) as info:
            cls(load_config()).make_store(f"{scheme}://")
        assert info.value.message == f"cache dir '{scheme}://' names no bucket"
        assert info.value.hint == f"set TFHUB_CACHE_DIR={scheme}://bucket/prefix"
