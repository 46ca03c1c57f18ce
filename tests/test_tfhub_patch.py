"""``hubcache.patch_tensorflow_hub()``: unchanged tensorflow_hub code resolves through hubcache.

tensorflow_hub's own behaviours, run with the patch in force against real models (built with
TensorFlow on the spot, served by a local origin): ``hub.resolve`` and ``hub.load`` of served
``.tgz`` and ``.tar.gz`` archives and of a tfhub.dev-style handle of a TF1 Hub format module, a
``file://`` ``TFHUB_CACHE_DIR``, and ``hub.KerasLayer(handle, trainable=True)`` in a Keras model
that trains a step, is saved and is loaded again. Each checks that the bytes came through
hubcache: one request to the origin, and hubcache's commit (its ``committed`` event and the
manifest it writes beside the entry, which tensorflow_hub never writes).

TensorFlow and tensorflow_hub are imported once per session in this process (see
tests/test_tf.py); the checks that need a fresh interpreter (nothing imported before
tensorflow_hub is) run one. The environment-variable route, through an installed wheel, is in
tests/test_packaging.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import hubcache
from hubcache.core import entry, mirrors, resolver
from hubcache.core.errors import MissingDependencyError
from hubcache.core.handles import cache_key
from hubcache.plugin import Backend
from hubcache.plugins.registry import get_registry, reset_registry
from hubcache.testing import OriginServer, archive_of, routed_hosts
from hubcache.tfhub_patch import HubcacheResolver, is_patched, supports

ROOT = Path(__file__).resolve().parents[1]
#: tensorflow_hub's own resolvers, in the order it registers them (tensorflow_hub/config.py).
TFHUB_DEFAULTS = ["PathResolver", "HttpUncompressedFileResolver", "GcsCompressedFileResolver",
                  "HttpCompressedFileResolver"]



def committed_by_hubcache(path: str) -> bool:
    """Whether the entry at ``path`` was committed by hubcache: its descriptor holds hubcache's
    manifest (tensorflow_hub's descriptor has none)."""
    try:
        with open(path + ".descriptor.txt", "rb") as f:
            return entry.descriptor_manifest(f.read()) is not None
    except FileNotFoundError:
        return False

def _examples_model():
    """examples/_model.py (the model builders tests/test_tf.py uses too)."""
    if "_model" in sys.modules:
        return sys.modules["_model"]
    spec = importlib.util.spec_from_file_location("_model", ROOT / "examples" / "_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_model"] = module
    spec.loader.exec_module(module)
    return module


_model = _examples_model()


@pytest.fixture(scope="session")
def hub():
    _model.quiet_tensorflow()
    import tensorflow_hub

    return tensorflow_hub


def _build_reusable_model(path: Path) -> str:
    """The TF2 model of examples/_model.py (``x @ WEIGHTS + BIAS`` as ``{"y": ...}``) in the
    Reusable SavedModel form ``hub.KerasLayer`` fine-tunes: the object lists its ``variables``,
    ``trainable_variables`` and ``regularization_losses``."""
    import tensorflow as tf

    w = tf.Variable(_model.WEIGHTS, name="w")
    b = tf.Variable(_model.BIAS, name="b")
    obj = tf.train.Checkpoint(w=w, b=b)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def call(x):
        return {"y": tf.matmul(x, w) + b}

    obj.__call__ = call
    obj.variables = [w, b]
    obj.trainable_variables = [w, b]
    obj.regularization_losses = []
    tf.saved_model.save(obj, str(path), signatures={"serving_default": call})
    return str(path)


@pytest.fixture(scope="session")
def tfhub_models(hub, tmp_path_factory):
    root = tmp_path_factory.mktemp("tfhub-models")
    return SimpleNamespace(tf2=_build_reusable_model(root / "tf2"), tf1=_model.build_tf1_hub_module(root / "tf1"))


@pytest.fixture(scope="session")
def tfhub_served(tfhub_models):
    """The TF2 model as ``.tgz`` and ``.tar.gz`` archives, the TF1 module as a tfhub.dev-style
    handle. Each test has fresh caches (conftest's ``isolated``), so each one downloads."""
    with OriginServer() as origin:
        yield SimpleNamespace(
            origin=origin,
            tgz=origin.add("/archives/tf2.tgz", archive_of(tfhub_models.tf2, "gz")),
            tar_gz=origin.add("/archives/tf2.tar.gz", archive_of(tfhub_models.tf2, "gz")),
            tf1=origin.add_tfhub_model("/models/tf1/1", archive_of(tfhub_models.tf1, "gz")))


@pytest.fixture
def registry(hub):
    """tensorflow_hub's registry; after the test the patch is undone and the registry must hold
    exactly the resolvers it held before (the same objects, in the same order)."""
    from tensorflow_hub import registry as tfhub_registry

    before = list(tfhub_registry.resolver._impls)
    assert [type(i).__name__ for i in before] == TFHUB_DEFAULTS
    yield tfhub_registry
    hubcache.unpatch_tensorflow_hub()
    after = tfhub_registry.resolver._impls
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before))


@pytest.fixture
def x():
    return np.random.default_rng().normal(size=(4, 2)).astype(np.float32)


def _names(registry) -> list[str]:
    return [type(i).__name__ for i in registry.resolver._impls]


def _entry(url: str, root: str | None = None) -> str:
    return os.path.join(root or os.path.join(os.environ["TMPDIR"], "tfhub_modules"), cache_key(url))


def _committed(events) -> list[str]:
    return [e.data["path"] for e in events if e.kind == "committed"]


# -- the patch itself ------------------------------------------------------------------------


def test_patch_registers_last_is_idempotent_and_unpatch_restores(registry):
    before = list(registry.resolver._impls)
    hubcache.patch_tensorflow_hub()
    hubcache.patch_tensorflow_hub()
    assert _names(registry) == TFHUB_DEFAULTS + ["HubcacheResolver"], "registered once, last: asked first"
    assert all(a is b for a, b in zip(registry.resolver._impls, before))
    assert is_patched()
    hubcache.unpatch_tensorflow_hub()
    hubcache.unpatch_tensorflow_hub()
    assert registry.resolver._impls == before and not is_patched()
    # Patched again after tensorflow_hub's own registry._clear()-style reset: registered anew.
    hubcache.patch_tensorflow_hub()
    registry.resolver._impls = list(before)
    assert not is_patched()
    hubcache.patch_tensorflow_hub()
    assert _names(registry) == TFHUB_DEFAULTS + ["HubcacheResolver"]


def test_concurrent_patches_register_one_resolver(registry):
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def patch() -> None:
        try:
            barrier.wait()
            hubcache.patch_tensorflow_hub()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=patch) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert _names(registry).count("HubcacheResolver") == 1


def test_unpatch_keeps_resolvers_registered_after_the_patch(registry):
    class Theirs:
        def is_supported(self, handle):
            return False

    hubcache.patch_tensorflow_hub()
    theirs = Theirs()
    registry.resolver.add_implementation(theirs)
    hubcache.unpatch_tensorflow_hub()
    assert _names(registry) == TFHUB_DEFAULTS + ["Theirs"]
    registry.resolver._impls = [i for i in registry.resolver._impls if i is not theirs]


def test_same_china_mirror_rule_as_tensorflow_hub(hub):
    from tensorflow_hub import compressed_module_resolver as theirs

    assert theirs._HUB_TF_GOOGLE_CN == mirrors.CHINA_HUB
    for rest in ("google/spice/2", "google/imagenet/mobilenet_v2_100_224/classification/5"):
        assert theirs._GCS_GOOGLE_CN_TEMPLATE % rest == mirrors.mirrored_archive(mirrors.CHINA_HUB + rest)


# -- tensorflow_hub's behaviours, through hubcache ---------------------------------------------


@pytest.mark.parametrize("kind", ["tgz", "tar_gz"])
def test_hub_resolve_and_load_of_served_archives(registry, hub, tfhub_served, events, x, kind):
    url = getattr(tfhub_served, kind)
    archive_path = "/archives/" + url.rsplit("/", 1)[1]
    before = tfhub_served.origin.count(archive_path)
    hubcache.patch_tensorflow_hub()

    path = hub.resolve(url)
    model = hub.load(url)
    resolver.clear_memo()  # as a new process would: only the cache on disk is left
    again = hub.load(url)

    assert path == _entry(url)
    assert tfhub_served.origin.count(archive_path) - before == 1
    assert _committed(events) == [path], "hubcache committed the entry"
    assert committed_by_hubcache(path), "hubcache's manifest, in the descriptor (tensorflow_hub writes none)"
    assert model._is_hub_module_v1 is False
    for m in (model, again):
        np.testing.assert_allclose(m(x)["y"].numpy(), _model.expected_tf2(x), rtol=1e-6)


def test_hub_load_of_a_tf1_hub_module_handle(registry, hub, tfhub_served, events, x):
    """tensorflow_hub 0.16 has no ``hub.Module``; ``hub.load`` still reads the TF1 Hub format
    (``tfhub_module.pb``: tags default to the empty set) as TensorFlow 2 can."""
    import tensorflow as tf

    hubcache.patch_tensorflow_hub()
    origin = tfhub_served.origin
    before = origin.count("/storage/models/tf1/1.tar.gz")
    module = hub.load(tfhub_served.tf1)
    assert module._is_hub_module_v1 is True
    out = module.signatures["default"](x=tf.constant(x))["default"].numpy()
    np.testing.assert_allclose(out, _model.expected_tf1(x), rtol=1e-6)
    assert origin.count("/storage/models/tf1/1.tar.gz") - before == 1
    assert _committed(events) == [_entry(tfhub_served.tf1)]


def test_file_url_cache_dir(registry, hub, tfhub_served, monkeypatch, tmp_path, events, x):
    cache = tmp_path / "file-cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", cache.as_uri())
    hubcache.patch_tensorflow_hub()
    path = hub.resolve(tfhub_served.tar_gz)
    assert path == _entry(tfhub_served.tar_gz, str(cache))
    assert committed_by_hubcache(str(cache / cache_key(tfhub_served.tar_gz)))
    assert _committed(events) == [path]
    np.testing.assert_allclose(hub.load(tfhub_served.tar_gz)(x)["y"].numpy(), _model.expected_tf2(x), rtol=1e-6)


def test_keras_layer_trains_saves_and_reloads(registry, hub, tfhub_served, events, tmp_path):
    """``hub.KerasLayer(handle, trainable=True)`` in a Keras model: one training step moves its
    weights; the model saved (the layer's config keeps the handle) and loaded again rebuilds the
    layer from the handle, through hubcache's cache, with the trained weights."""
    import tf_keras  # tensorflow_hub's Keras (Keras 2), as hub.KerasLayer uses it

    url = tfhub_served.tgz
    before = tfhub_served.origin.count("/archives/tf2.tgz")
    hubcache.patch_tensorflow_hub()
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 2)).astype(np.float32)
    y = rng.normal(size=(8, 3)).astype(np.float32)

    layer = hub.KerasLayer(url, trainable=True, output_key="y")
    model = tf_keras.Sequential([tf_keras.Input(shape=(2,)), layer])
    model.compile(optimizer=tf_keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    start = [w.numpy().copy() for w in layer.trainable_weights]
    assert len(start) == 2 and np.array_equal(start[0], _model.WEIGHTS)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # one step
    trained = [w.numpy() for w in layer.trainable_weights]
    assert all(not np.array_equal(a, b) for a, b in zip(start, trained)), "one step must move every weight"
    predicted = model.predict(x, verbose=0)

    saved = tmp_path / "model.h5"
    model.save(saved)
    resolver.clear_memo()  # the reload finds the model in the cache on disk, as a new process would
    reloaded = tf_keras.models.load_model(saved, custom_objects={"KerasLayer": hub.KerasLayer})

    np.testing.assert_allclose(reloaded.predict(x, verbose=0), predicted, rtol=1e-6)
    assert reloaded.layers[0].get_config()["handle"] == url
    assert tfhub_served.origin.count("/archives/tf2.tgz") - before == 1, "one download for build, train, reload"
    assert _committed(events) == [_entry(url)]


def _on_origin(url: str) -> str:
    """Where :func:`routed_hosts` (as set up below) serves a real URL: ``/<host>/<path>``."""
    return "/" + url.split("://", 1)[1].split("?", 1)[0]


@pytest.mark.parametrize("where", ["kaggle", "tfhub.dev", "china"])
def test_hub_load_of_kaggle_tfhub_and_china_mirror_handles(registry, hub, tfhub_models, events, x, where):
    """The handles tensorflow_hub users have today, on their real host names (routed to a local
    origin; tests/test_mirrors.py has the protocol details): a Kaggle model page's handle, a
    tfhub.dev handle that redirects there, and a China mirror handle."""
    kaggle = "https://www.kaggle.com/models/hubcache/tiny/tensorFlow2/tiny/1"
    signed = "https://storage.googleapis.com/kaggle-models-data/1/2/bundle/archive.tar.gz?X-Goog-Signature=5e"
    handle, archive_url = {
        "kaggle": (kaggle, signed),
        "tfhub.dev": ("https://tfhub.dev/hubcache/tiny/1", signed),
        "china": ("https://hub.tensorflow.google.cn/hubcache/tiny/1",
                  "https://gcs.tensorflow.google.cn/tfhub-modules/hubcache/tiny/1.tar.gz"),
    }[where]
    hosts = ("tfhub.dev", "www.kaggle.com", "storage.googleapis.com", "hub.tensorflow.google.cn",
             "gcs.tensorflow.google.cn")
    with OriginServer() as origin, routed_hosts({f"https://{h}/": origin.url(f"/{h}/") for h in hosts}):
        origin.add(_on_origin(archive_url), archive_of(tfhub_models.tf2, "gz"))
        origin.add_tfhub_model(_on_origin(kaggle), b"")
        origin.routes[_on_origin(kaggle)].tfhub["compressed"] = signed
        origin.redirect(_on_origin("https://tfhub.dev/hubcache/tiny/1"), kaggle + "?tf-hub-format=compressed", 301)
        hubcache.patch_tensorflow_hub()
        model = hub.load(handle)
        assert origin.count(_on_origin(archive_url)) == 1
    np.testing.assert_allclose(model(x)["y"].numpy(), _model.expected_tf2(x), rtol=1e-6)
    assert _committed(events) == [_entry(handle)]


# -- what hubcache leaves to tensorflow_hub ------------------------------------------------------


def test_unsupported_handles_fall_through_to_tensorflow_hub(registry, hub, tmp_path):
    import tensorflow as tf

    hubcache.patch_tensorflow_hub()
    assert importlib.util.find_spec("adlfs") is None, "abfs:// stands for a scheme whose fsspec package is missing"
    for handle in (42, None, b"https://tfhub.dev/google/spice/2", "", "ram://models/x", "abfs://container/models/x"):
        assert supports(handle) is False, handle
    for handle in ("https://tfhub.dev/google/spice/2", str(tmp_path), tmp_path.as_uri(), "memory://m.tar.gz"):
        assert supports(handle) is True, handle
    # A local path that is not there: tensorflow_hub's own error, the IOError its users may catch.
    for handle in (str(tmp_path / "absent"), (tmp_path / "absent").as_uri()):
        assert supports(handle) is False
    with pytest.raises(OSError, match="absent does not exist"):
        hub.resolve(str(tmp_path / "absent"))
    # TensorFlow's in-memory filesystem: only tensorflow_hub's PathResolver (through tf.io.gfile)
    # can answer these.
    tf.io.gfile.makedirs("ram://hubcache-patch/model")
    assert hub.resolve("ram://hubcache-patch/model") == "ram://hubcache-patch/model"
    with pytest.raises(OSError, match="ram://hubcache-patch/absent does not exist"):
        hub.resolve("ram://hubcache-patch/absent")


class _NeedsAClient(Backend):
    """A backend whose client library is not installed (as the gcs backend without gcsfs)."""

    name = "needs-a-client"

    def resolve(self, handle, location):
        raise MissingDependencyError("the needs-a-client backend needs `client`, which is not installed",
                                     hint="pip install client")


class _NeedsAClientPlugin:
    @hubcache.hookimpl
    def hubcache_register_backends(self, register):
        register(_NeedsAClient)


def test_missing_dependency_falls_back_to_tensorflow_hub(registry, hub, tfhub_served, monkeypatch, caplog):
    """Where hubcache lacks a dependency it needs for a handle, tensorflow_hub's own resolver
    answers, as it would without hubcache (here: its HttpCompressedFileResolver downloads into
    the temp dir, leaving no hubcache manifest), with one warning."""
    plugins = get_registry()
    plugins.register(_NeedsAClientPlugin(), "needs-a-client-plugin")
    try:
        monkeypatch.setenv("HUBCACHE_BACKEND", "needs-a-client")
        hubcache.patch_tensorflow_hub()
        url = tfhub_served.tar_gz
        with caplog.at_level("WARNING", logger="hubcache"):
            path = hub.resolve(url)
            resolver.clear_memo()
            assert hub.resolve(url) == path
        assert path == _entry(url)
        assert os.path.isfile(os.path.join(path, "saved_model.pb"))
        assert not committed_by_hubcache(path), "tensorflow_hub, not hubcache, wrote this entry"
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "HttpCompressedFileResolver" in warnings[0] and "pip install client" in warnings[0]
        with pytest.raises(MissingDependencyError, match="needs `client`"):
            HubcacheResolver()(url)  # not in tensorflow_hub's registry: nothing to fall back to
    finally:
        reset_registry()  # the next test loads the installed plugins afresh, without this one
        resolver.clear_memo()


# -- in a fresh interpreter ----------------------------------------------------------------------


def _run(script: str, timeout: float = 240) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HUBCACHE_PATCH_TFHUB"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_patch_before_tensorflow_hub_is_imported_imports_nothing_heavy():
    seen = _run("""
        import json, sys
        import hubcache
        from hubcache import tfhub_patch
        finders = list(sys.meta_path)  # absl's flags add one of their own, when hubcache imports them
        hubcache.patch_tensorflow_hub()
        hubcache.patch_tensorflow_hub()
        heavy = [m for m in ("tensorflow", "tensorflow_hub", "tf_keras", "keras") if m in sys.modules]
        waiting = tfhub_patch.is_patched()
        added = [type(f).__name__ for f in sys.meta_path if f not in finders]
        hubcache.unpatch_tensorflow_hub()
        print(json.dumps({"heavy": heavy, "waiting": waiting, "added": added,
                          "restored": sys.meta_path == finders, "after": tfhub_patch.is_patched()}))
    """)
    assert seen == {"heavy": [], "waiting": True, "added": ["PostImportFinder"], "restored": True, "after": False}


@pytest.mark.slow  # a fresh interpreter imports TensorFlow: 10-25 s here
def test_patch_before_tensorflow_hub_is_imported_applies_on_import(tfhub_served, tmp_path):
    """The patch waits for ``import tensorflow_hub`` and is in force once it returns, however
    threads race: some import tensorflow_hub, others patch while it is being imported (they wait
    for it). One resolver is registered, and resolving goes through hubcache (one request,
    hubcache's manifest)."""
    url = tfhub_served.tar_gz
    before = tfhub_served.origin.count("/archives/tf2.tar.gz")
    seen = _run(f"""
        import json, os, sys, threading, time
        import hubcache
        from hubcache.core import entry
        hubcache.patch_tensorflow_hub()
        go = threading.Barrier(8)

        def importer():
            go.wait()
            import tensorflow_hub
            hubcache.patch_tensorflow_hub()

        def patcher():
            go.wait()
            while "tensorflow_hub" not in sys.modules:  # then patch while it is being imported
                time.sleep(0.0005)
            hubcache.patch_tensorflow_hub()

        threads = [threading.Thread(target=f) for f in [importer] * 4 + [patcher] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        import tensorflow_hub as hub
        from tensorflow_hub import registry
        path = hub.resolve({url!r})
        print(json.dumps({{"impls": [type(i).__name__ for i in registry.resolver._impls], "path": path,
                          "manifest": entry.descriptor_manifest(
                              open(path + ".descriptor.txt", "rb").read()) is not None}}))
    """)
    assert seen["impls"] == TFHUB_DEFAULTS + ["HubcacheResolver"]
    assert seen["path"] == _entry(url) and seen["manifest"] is True
    assert tfhub_served.origin.count("/archives/tf2.tar.gz") - before == 1
