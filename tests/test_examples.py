"""The runnable examples: each is run as a user runs it (a subprocess, ``python examples/x.py``),
and its output is checked against what it claims: paths, request counts, model outputs.

Every example starts its own servers on 127.0.0.1 and builds its own model, so these tests need
nothing but the test extra. Each takes a few seconds (importing TensorFlow, mostly).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from hubcache.core.handles import cache_key

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: The input the examples feed their model (their outputs are checked against it here).
X = np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)


def _model_weights() -> tuple[np.ndarray, np.ndarray]:
    """The weights examples/_model.py builds into the model (imported without TensorFlow)."""
    spec = importlib.util.spec_from_file_location("_model", EXAMPLES / "_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_model"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module.WEIGHTS, module.BIAS


W, B = _model_weights()


def run_example(name: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                            cwd=EXAMPLES.parent, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                            timeout=240)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


def field(output: str, label: str) -> list[str]:
    """Every value printed after ``label:`` (first word), in order."""
    return [m.group(1) for m in re.finditer(rf"^\s*{re.escape(label)}:\s+(\S+)", output, re.MULTILINE)]


def test_quickstart():
    out = run_example("quickstart.py")
    (handle,) = field(out, "handle")
    (path,) = field(out, "resolved to")
    assert Path(path).name == cache_key(handle) and Path(path).parent.name == "tfhub_modules"
    assert "saved_model.pb" in out.split("files:", 1)[1].splitlines()[0]
    y = np.array(ast.literal_eval(out.split("model(x):", 1)[1].splitlines()[0].strip()))
    np.testing.assert_allclose(y, X @ W + B, rtol=1e-6)
    assert "check:       OK" in out
    assert re.search(r"origin:\s+2 requests in all", out), "load must reuse what resolve downloaded"
    assert not Path(path).exists(), "the example must delete its private caches"


def test_persistent_cache_second_run_downloads_nothing():
    out = run_example("persistent_cache.py")
    (handle,) = field(out, "handle")
    paths = field(out, "resolved to")
    assert len(paths) == 3 and len(set(paths)) == 1, paths
    assert Path(paths[0]).name == cache_key(handle)
    assert re.search(r"home-cache/tfhub_modules/[0-9a-f]{40}$", paths[0])
    requests = [int(n) for n in field(out, "origin requests")]
    assert requests[0] > 0 and requests[1:] == [0, 0], requests
    assert out.count("model(x):    OK") == 2
    assert out.rstrip().endswith(f"OK: {requests[0]} origin requests in all, for three runs.")


def test_colab_tpu_both_workarounds():
    out = run_example("colab_tpu.py")
    step1, step2 = out.split("\n1. ", 1)[1].split("\n2. ", 1)
    (handle,) = field(out, "handle")

    # 1: a gs:// cache dir on the emulator; the model is unpacked into the bucket.
    assert "SKIPPED" not in step1, step1
    (gs_path,) = field(step1, "resolved to")
    assert gs_path == f"gs://colab-tpu-demo/tfhub_modules/{cache_key(handle)}"
    assert "saved_model.pb" in step1 and "variables/variables.index" in step1
    (again,) = field(step1, "resolved again")
    assert again == gs_path and "(0 origin requests" in step1
    assert "needs a real bucket" in step1

    # 2: a real load from the local cache with experimental_io_device='/job:localhost'.
    (local_path,) = field(step2, "resolved to")
    assert Path(local_path).name == cache_key(handle) and not local_path.startswith("gs://")
    y = np.array(ast.literal_eval(re.search(r"model\(x\):\s+(\[.*\]) \(OK", step2).group(1)))
    np.testing.assert_allclose(y, X @ W + B, rtol=1e-6)
    assert "step 1 (gs:// cache dir): OK" in out and "step 2 (io_device):       OK" in out
