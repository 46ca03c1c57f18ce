"""Shared by the examples and tests/test_tf.py: build tiny, real TensorFlow models and serve them.

Nothing here downloads anything. The models are made on the spot with TensorFlow:

* :func:`build_tf2_model` — a TF2 SavedModel: a ``tf.Module`` with two ``tf.Variable`` s and a
  ``tf.function`` signature computing ``x @ W + b``;
* :func:`build_tf1_hub_module` — a model in the deprecated TF1 Hub format, written with
  ``tf.compat.v1`` (tensorflow_hub >= 0.16 no longer has ``hub.Module`` to export one): a
  SavedModel with two MetaGraphs, tagged ``{}`` (inference, ``x @ W``) and ``{"train"}``
  (``2 * x @ W``, so tests can tell them apart), plus the ``tfhub_module.pb`` marker.

:func:`serve` puts a model directory on a local origin server (127.0.0.1, a free port) as a
tfhub.dev-style handle and as plain archive URLs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from hubcache.testing import SUFFIX, OriginServer, archive_of

#: The weights of both tiny models (their outputs are computed from these, in numpy, to compare).
WEIGHTS = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
BIAS = np.array([0.5, -0.5, 1.5], dtype=np.float32)

#: ``tfhub_module.pb``: tensorflow_hub's ``ModuleDef`` proto with ``format = FORMAT_V3`` (field 1,
#: varint 3), serialized by hand because tensorflow_hub no longer ships the generated module.
TFHUB_MODULE_PB = b"\x08\x03"


def expected_tf2(x: np.ndarray) -> np.ndarray:
    """What the TF2 model returns for ``x``, computed without TensorFlow."""
    return x.astype(np.float32) @ WEIGHTS + BIAS


def expected_tf1(x: np.ndarray, *, train: bool = False) -> np.ndarray:
    """What the TF1 hub module's ``default`` signature returns for ``x`` under either tag set."""
    return (2.0 if train else 1.0) * (x.astype(np.float32) @ WEIGHTS)


def build_tf2_model(path: str | os.PathLike) -> str:
    """Write a TF2 SavedModel to ``path`` and return it.

    Calling the loaded object (``model(x)``) and its ``serving_default`` signature both compute
    ``x @ WEIGHTS + BIAS`` for a float32 ``[batch, 2]`` input.
    """
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="tiny")
            self.w = tf.Variable(WEIGHTS, name="w")
            self.b = tf.Variable(BIAS, name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.matmul(x, self.w) + self.b}

    module = Tiny()
    path = os.fspath(path)
    tf.saved_model.save(module, path, signatures={"serving_default": module.__call__})
    return path


def build_tf1_hub_module(path: str | os.PathLike) -> str:
    """Write a TF1 Hub format module to ``path`` and return it (see the module docstring)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    path = os.fspath(path)
    builder = v1.saved_model.Builder(path)
    # The TF1 signature helpers log a deprecation warning per tensor; writing the deprecated
    # format is the point here, so mute them.
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        _write_tf1_graphs(tf, builder)
    finally:
        logger.setLevel(level)
    with open(os.path.join(path, "tfhub_module.pb"), "wb") as f:
        f.write(TFHUB_MODULE_PB)
    return path


def _write_tf1_graphs(tf, builder) -> None:
    v1 = tf.compat.v1

    def graph(train: bool):
        g = tf.Graph()
        with g.as_default():
            x = v1.placeholder(tf.float32, [None, 2], name="x")
            w = v1.get_variable("w", initializer=tf.constant(WEIGHTS))
            y = tf.matmul(x, w) * (2.0 if train else 1.0)
            signature = v1.saved_model.signature_def_utils.predict_signature_def(
                inputs={"x": x}, outputs={"default": y})
        return g, signature

    g, signature = graph(train=False)
    with g.as_default(), v1.Session(graph=g) as session:
        session.run(v1.global_variables_initializer())
        # TF1 hub modules keep their inference graph under the *empty* tag set; that is why
        # hub.load defaults tags to [] for them.
        builder.add_meta_graph_and_variables(session, [], signature_def_map={"default": signature})
    g, signature = graph(train=True)
    with g.as_default():
        builder.add_meta_graph(["train"], signature_def_map={"default": signature})
    builder.save()


@dataclass
class Served:
    """URLs under which :func:`serve` put one model."""

    handle: str  #: tfhub.dev-style: ``?tf-hub-format=compressed`` redirects to the .tar.gz
    archives: dict[str, str] = field(default_factory=dict)  #: format ("gz", "zst") -> archive URL


def serve(origin: OriginServer, model_dir: str, name: str, *, formats: tuple[str, ...] = ("gz", "zst")) -> Served:
    """Serve ``model_dir`` on ``origin`` as ``/models/<name>/1`` (tfhub.dev style) and as one
    archive URL per format in ``formats``."""
    served = Served(handle=origin.add_tfhub_model(f"/models/{name}/1", archive_of(model_dir, "gz")))
    for fmt in formats:
        served.archives[fmt] = origin.add(f"/archives/{name}{SUFFIX[fmt]}", archive_of(model_dir, fmt))
    return served


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ start-up chatter (set before TensorFlow is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
