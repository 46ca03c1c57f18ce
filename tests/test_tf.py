"""hubcache.load: real SavedModels built with TensorFlow, served by a local origin, loaded through
the local cache backends, called, and compared with outputs computed in numpy.

TensorFlow is imported once per session (a few seconds) and the models are built once per session
(session fixtures); each test still gets its own empty caches (conftest's ``isolated``). Loading
straight from a ``gs://`` path is not tested here: TensorFlow reads gs:// with its own GCS client,
whose endpoints are fixed (www.googleapis.com; it ignores STORAGE_EMULATOR_HOST), so it cannot
reach the local GCS emulator. gs:// is covered by resolve tests (tests/test_gcs.py, and
examples/colab_tpu.py through tests/test_examples.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import hubcache
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.testing import OriginServer, archive_of

ROOT = Path(__file__).resolve().parents[1]


def _examples_model():
    """examples/_model.py (the examples' model builders), imported under its own name."""
    spec = importlib.util.spec_from_file_location("_model", ROOT / "examples" / "_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_model"] = module
    spec.loader.exec_module(module)
    return module


_model = _examples_model()
BACKEND_ROOTS = {"tmp": ("TMPDIR", "tfhub_modules"), "home": ("XDG_CACHE_HOME", "tfhub_modules")}


@pytest.fixture(scope="session")
def tf():
    _model.quiet_tensorflow()
    import tensorflow

    return tensorflow


@pytest.fixture(scope="session")
def models(tf, tmp_path_factory):
    root = tmp_path_factory.mktemp("tf-models")
    return SimpleNamespace(tf2=_model.build_tf2_model(root / "tf2"),
                           tf1=_model.build_tf1_hub_module(root / "tf1"))


@pytest.fixture(scope="session")
def served(models):
    """One origin for the session, serving both models as a tfhub.dev-style handle, .tar.gz and
    .tar.zst. Every test has fresh caches, so each one still downloads."""
    with OriginServer() as origin:
        yield SimpleNamespace(origin=origin, tf2=_model.serve(origin, models.tf2, "tf2"),
                              tf1=_model.serve(origin, models.tf1, "tf1"))


@pytest.fixture
def x():
    """A fresh random batch per test; expected outputs are computed from it in numpy."""
    return np.random.default_rng().normal(size=(4, 2)).astype(np.float32)


def _url(served_model, kind: str) -> str:
    return served_model.handle if kind == "handle" else served_model.archives[kind]


def _assert_in_backend(path: str, backend: str, url: str) -> None:
    env, leaf = BACKEND_ROOTS[backend]
    assert Path(path) == Path(os.environ[env]) / leaf / cache_key(url)


# -- TF2 SavedModels ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tmp", "home"])
@pytest.mark.parametrize("kind", ["handle", "gz", "zst"])
def test_load_tf2_model_through_each_backend(tf, served, monkeypatch, x, backend, kind):
    monkeypatch.setenv("HUBCACHE_BACKEND", backend)
    url = _url(served.tf2, kind)
    model = hubcache.load(url)
    np.testing.assert_allclose(model(x)["y"].numpy(), _model.expected_tf2(x), rtol=1e-6)
    signature = model.signatures["serving_default"]
    np.testing.assert_allclose(signature(x=tf.constant(x))["y"].numpy(), _model.expected_tf2(x), rtol=1e-6)
    assert model._is_hub_module_v1 is False
    _assert_in_backend(hubcache.resolve(url), backend, url)


def test_second_load_uses_the_cache(tf, served, x):
    archive_path = "/archives/tf2.tar.gz"
    before = served.origin.count(archive_path)
    first = hubcache.load(served.tf2.archives["gz"])
    resolver.clear_memo()  # as a new process would: only the disk cache is left
    second = hubcache.load(served.tf2.archives["gz"])
    assert served.origin.count(archive_path) - before == 1
    np.testing.assert_array_equal(first(x)["y"].numpy(), second(x)["y"].numpy())


def test_local_directory_handle_loads_in_place(tf, models, x):
    assert hubcache.resolve(models.tf2) == models.tf2
    np.testing.assert_allclose(hubcache.load(models.tf2)(x)["y"].numpy(), _model.expected_tf2(x), rtol=1e-6)


def test_saved_model_pbtxt_is_a_saved_model(tf, models, tmp_path, x):
    """tensorflow_hub accepts a directory with saved_model.pbtxt instead of .pb; so does load."""
    import shutil

    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    text_dir = tmp_path / "pbtxt-model"
    shutil.copytree(models.tf2, text_dir)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((text_dir / "saved_model.pb").read_bytes())
    (text_dir / "saved_model.pb").unlink()
    (text_dir / "saved_model.pbtxt").write_text(text_format.MessageToString(proto))
    np.testing.assert_allclose(hubcache.load(str(text_dir))(x)["y"].numpy(), _model.expected_tf2(x), rtol=1e-6)


# -- TF1 Hub format --------------------------------------------------------------------------


def test_tf1_fixture_really_needs_the_empty_tag_set(tf, models):
    """Guards the next test: with two MetaGraphs, TensorFlow refuses to guess the tags."""
    with pytest.raises(ValueError, match="tags"):
        tf.saved_model.load(models.tf1)


@pytest.mark.parametrize("backend", ["tmp", "home"])
@pytest.mark.parametrize("kind", ["handle", "gz", "zst"])
def test_tf1_hub_module_loads_with_empty_tags(tf, served, monkeypatch, x, backend, kind):
    monkeypatch.setenv("HUBCACHE_BACKEND", backend)
    url = _url(served.tf1, kind)
    module = hubcache.load(url)
    out = module.signatures["default"](x=tf.constant(x))["default"].numpy()
    np.testing.assert_allclose(out, _model.expected_tf1(x), rtol=1e-6)
    assert module._is_hub_module_v1 is True
    _assert_in_backend(hubcache.resolve(url), backend, url)


def test_tf1_hub_module_explicit_tags_win(tf, served, x):
    module = hubcache.load(served.tf1.archives["gz"], tags=["train"])
    out = module.signatures["default"](x=tf.constant(x))["default"].numpy()
    np.testing.assert_allclose(out, _model.expected_tf1(x, train=True), rtol=1e-6)


# -- LoadOptions -----------------------------------------------------------------------------------


def test_load_options_io_device_localhost(tf, served, x):
    """The Colab-TPU workaround: read the files through the host's I/O device."""
    options = tf.saved_model.LoadOptions(experimental_io_device="/job:localhost")
    model = hubcache.load(served.tf2.handle, options=options)
    np.testing.assert_allclose(model(x)["y"].numpy(), _model.expected_tf2(x), rtol=1e-6)


def test_load_options_reach_tensorflow_unchanged(tf, served):
    """Two options with effects TensorFlow alone produces, so they must have reached it."""
    url = served.tf2.archives["zst"]
    bogus = tf.saved_model.LoadOptions(experimental_io_device="/job:nowhere/device:CPU:0")
    with pytest.raises(tf.errors.InvalidArgumentError, match="/job:nowhere"):
        hubcache.load(url, options=bogus)
    skipped = hubcache.load(url, options=tf.saved_model.LoadOptions(experimental_skip_checkpoint=True))
    assert skipped.w.numpy().size == 0, "the checkpoint was restored although skip_checkpoint was set"
    assert hubcache.load(url).w.numpy().tolist() == _model.WEIGHTS.tolist()


# -- tensorflow_hub compatibility --------------------------------------------------------------


@pytest.mark.parametrize("name", ["tf2", "tf1"])
def test_same_result_as_tensorflow_hub_load(tf, served, x, name):
    import tensorflow_hub

    handle = getattr(served, name).handle
    theirs = tensorflow_hub.load(handle)
    ours = hubcache.load(handle)
    assert ours._is_hub_module_v1 == theirs._is_hub_module_v1
    signature = "serving_default" if name == "tf2" else "default"
    a = theirs.signatures[signature](x=tf.constant(x))
    b = ours.signatures[signature](x=tf.constant(x))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_keras_layer_takes_what_hubcache_returns(tf, served, x):
    """hubcache has no KerasLayer; tensorflow_hub's takes hubcache's path (any model) or, for a
    TF2 model, the object hubcache.load returns — without downloading anything itself."""
    import tensorflow_hub

    before = served.origin.count()
    from_path = tensorflow_hub.KerasLayer(hubcache.resolve(served.tf2.handle), output_key="y")
    from_object = tensorflow_hub.KerasLayer(hubcache.load(served.tf2.handle), output_key="y")
    tf1 = tensorflow_hub.KerasLayer(hubcache.resolve(served.tf1.handle), signature="default",
                                    output_key="default")
    np.testing.assert_allclose(from_path(x).numpy(), _model.expected_tf2(x), rtol=1e-6)
    np.testing.assert_allclose(from_object(x).numpy(), _model.expected_tf2(x), rtol=1e-6)
    np.testing.assert_allclose(tf1(x).numpy(), _model.expected_tf1(x), rtol=1e-6)
    assert served.origin.count() - before == 4, "one download per model (2 requests each), by hubcache"


def test_imports_alongside_tensorflow_hub_and_shares_its_flags(tmp_path):
    """tensorflow_hub defines --tfhub_cache_dir unconditionally: importing it after hubcache must
    not raise DuplicateFlagError, and hubcache must read the flag the user set."""
    script = textwrap.dedent(f"""
        import hubcache, tensorflow_hub
        from absl import flags
        flags.FLAGS(["prog", "--tfhub_cache_dir={tmp_path}/flag-cache"])
        from hubcache.core.config import load_config
        setting = load_config().settings["cache_dir"]
        print(setting.value, setting.source)
    """)
    result = _python(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"{tmp_path}/flag-cache", "flag"]


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("handle", [42, None, b"https://tfhub.dev/google/spice/2", Path("/models/x")],
                         ids=["int", "None", "bytes", "Path"])
def test_non_string_handle_is_a_value_error(tf, served, handle):
    before = served.origin.count()
    with pytest.raises(ValueError) as info:
        hubcache.load(handle)
    assert isinstance(info.value, hubcache.HandleError)
    assert "must be a string" in str(info.value) and type(handle).__name__ in str(info.value)
    assert served.origin.count() == before


def test_directory_without_saved_model_names_handle_and_path(tf, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    (not_a_model / "variables").mkdir(parents=True)
    (not_a_model / "model.tflite").write_bytes(b"TFL3")
    handle = str(not_a_model)
    with pytest.raises(hubcache.HandleError) as info:
        hubcache.load(handle)
    message = str(info.value)
    assert message.startswith(repr(handle)) and "neither saved_model.pb nor saved_model.pbtxt" in message
    assert "SavedModel file does not exist" not in message


def test_archive_without_saved_model_names_handle_and_cache_path(tf, served, tmp_path):
    not_a_model = tmp_path / "tfjs"
    not_a_model.mkdir()
    (not_a_model / "model.json").write_text("{}")
    url = served.origin.add("/archives/tfjs.tar.gz", archive_of(not_a_model))
    with pytest.raises(hubcache.HandleError) as info:
        hubcache.load(url)
    path = hubcache.resolve(url)
    assert str(info.value).startswith(repr(url)) and path in str(info.value)


def test_missing_handle_is_a_handle_error(tf, tmp_path):
    with pytest.raises(hubcache.HandleError, match="no such file"):
        hubcache.load(str(tmp_path / "nowhere"))


def test_without_tensorflow_says_which_extra_and_downloads_nothing(served):
    """``sys.modules['tensorflow'] = None`` makes ``import tensorflow`` raise exactly the
    ModuleNotFoundError (name 'tensorflow') a missing package raises, without uninstalling
    TensorFlow from the shared virtualenv."""
    url = served.tf2.archives["gz"]
    before = served.origin.count()
    result = _python(f"""
        import sys
        sys.modules["tensorflow"] = None
        import hubcache
        try:
            hubcache.load({url!r})
        except hubcache.MissingDependencyError as error:
            assert isinstance(error, ImportError)
            print(error)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"{url!r}: loading a model needs TensorFlow, which is not installed "
                                      "(pip install 'hubcache[tensorflow]')")
    assert served.origin.count() == before, "nothing should be downloaded without TensorFlow"


def test_broken_tensorflow_is_not_reported_as_missing(tmp_path):
    """A TensorFlow that is installed but fails to import (here: a package whose import raises,
    as a missing shared library would) must not be reported as not installed."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise ImportError("libtensorflow_framework.so.2: cannot open shared object file")\n')
    result = _python(f"""
        import hubcache
        try:
            hubcache.load({str(tmp_path / "model")!r})
        except hubcache.MissingDependencyError as error:
            print(error)
    """, pythonpath=tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert "installed but cannot be imported" in result.stdout
    assert "libtensorflow_framework.so.2" in result.stdout


def _python(script: str, *, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, env=env, timeout=120)
