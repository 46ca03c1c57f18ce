"""Quickstart: resolve a model handle, load it, call it — as code written for tensorflow_hub does.

The script builds a tiny TF2 SavedModel (a ``tf.Module`` with two variables and a signature
computing ``x @ W + b``), serves it from a local HTTP server it starts itself as a
tfhub.dev-style handle (127.0.0.1, a free port; nothing leaves the machine), then uses hubcache
through the tensorflow_hub-shaped face, ``import hubcache as hub``. The default ``tmp`` backend
caches under ``$TMPDIR/tfhub_modules``; the script points TMPDIR at a private temp directory
and deletes it at the end, so it leaves nothing behind.

With a real model the code is the same, e.g. ``hub.load("https://tfhub.dev/google/spice/2")``.

Run:  .venv/bin/python examples/quickstart.py      (needs hubcache[tensorflow])
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

# Private caches *before* hubcache reads any setting (the tmp backend lives in TMPDIR).
WORKDIR = tempfile.mkdtemp(prefix="hubcache-quickstart-")
os.environ["TMPDIR"] = os.path.join(WORKDIR, "tmp")
os.makedirs(os.environ["TMPDIR"])
tempfile.tempdir = None

from _model import build_tf2_model, expected_tf2, quiet_tensorflow, serve  # noqa: E402

quiet_tensorflow()

import numpy as np  # noqa: E402

import hubcache as hub  # noqa: E402
from hubcache.testing import OriginServer  # noqa: E402


def main() -> int:
    try:
        return run()
    finally:
        shutil.rmtree(WORKDIR, ignore_errors=True)


def run() -> int:
    model_dir = build_tf2_model(os.path.join(WORKDIR, "model"))
    with OriginServer() as origin:
        handle = serve(origin, model_dir, "tiny", formats=()).handle
        print(f"handle:      {handle}")

        path = hub.resolve(handle)  # downloads, checks and unpacks the archive once
        print(f"resolved to: {path}")
        print(f"files:       {', '.join(sorted(os.listdir(path)))}")
        print(f"origin:      {origin.count()} requests (the handle, then the archive it redirects to)")

        model = hub.load(handle)  # tf.saved_model.load on the resolved path
        x = np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)
        y = model(x)["y"].numpy()
        print(f"model(x):    {y.tolist()}")
        serving = model.signatures["serving_default"]
        print(f"signature:   serving_default{serving.structured_input_signature[1]}")
        ok = bool(np.allclose(y, expected_tf2(x)))
        print(f"check:       {'OK' if ok else 'MISMATCH'}: equals x @ W + b computed in numpy")
        print(f"origin:      {origin.count()} requests in all (load reused the cached copy)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
