"""Object stores: leases and the gcs floor. In a ``gs://`` cache the download lock is a lease
object that its holder rewrites (a heartbeat) and that another host may take over once the
heartbeat has been silent for ``HUBCACHE_LEASE_TTL``. Here holder A, a real process, is stopped
with a real ``SIGSTOP`` at the worst moment (its heartbeat has decided to rewrite its lease and is
about to send the request), stays stopped past the TTL while B takes the lease over, and then gets
``SIGCONT``: A's pending rewrite must be refused (it is conditional on the lease's generation),
so B's lease object is never overwritten and A learns it lost the lease. Played against a real GCS
emulator (fake-gcs-server on 127.0.0.1) by the conformance kit's own scenario
(``hubcache.conformance.stalled_holder_takeover``, which every object-store backend runs). The
``gcs`` extra's floor is the first gcsfs whose ``pipe_file(..., mode="create")`` is a create-only
write (``ifGenerationMatch=0``), which the commit and the lease rest on: it is probed with the
newest gcsfs installed here and with the floor (the venv ``make test-gcs-floor`` builds).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from gcs_emulator import emulator_url, fresh_root
from hubcache.backends.gcs import GcsBackend
from hubcache.conformance import stalled_holder_takeover
from hubcache.core.config import load_config

SCENARIO = "17. Object stores: leases and the gcs floor"
LEASE_TTL = 1.5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLOOR_VENV = os.environ.get("FLOOR_VENV", "/tmp/venv-gcs-floor")


def test_a_stalled_holder_cannot_overwrite_a_new_lease(tmp_path, figures):
    """A (a real process) SIGSTOPped just before its heartbeat rewrites its lease, past the TTL;
    B takes the lease over; A gets SIGCONT: A's rewrite is refused, B's lease object is read
    until two TTLs after SIGCONT and never overwritten, A learns it lost the lease, B keeps it."""
    backend = GcsBackend(load_config().replace(cache_dir=fresh_root()))
    m = stalled_holder_takeover(backend, str(tmp_path), LEASE_TTL)
    assert m["b_waited_for_a"] and m["b_wrote_its_lease"], m["b_waits"]
    assert not m["overwritten"], f"B's lease object was overwritten or removed: {m['overwritten'][:3]}"
    assert m["a_lost"] is True and m["a_noticed_seconds"] is not None, "A never noticed that it lost the lease"
    assert not m["b_lost"] and m["b_lease_after_a_exit"] and m["b_released"]
    assert m["b_beats_in_order"] and m["b_beats"][-1] > m["b_beats"][0], "B's heartbeat went on"
    figures.update(run=f"gcs backend on fake-gcs-server; HUBCACHE_LEASE_TTL={LEASE_TTL:g} s; A stopped with "
                       "SIGSTOP before its rewrite, B waits and takes over, A resumed with SIGCONT",
                   lease_ttl_seconds=LEASE_TTL, takeover_seconds=round(m["takeover_seconds"], 2),
                   old_holder_noticed_seconds=round(m["a_noticed_seconds"], 2),
                   reads_of_new_lease=m["lease_reads"], overwrites=len(m["overwritten"]),
                   new_holder_beats=f"{m['b_beats'][0]}..{m['b_beats'][-1]}",
                   new_lease_kept_after_old_holder_released=m["b_lease_after_a_exit"])


# What the commit and the lease need from gcsfs: a create-only write that refuses an existing
# object and leaves it as it was. Run in a fresh interpreter (of this venv or the floor's).
_CREATE_ONLY_PROBE = r"""
import sys, time, gcsfs
path = sys.argv[1]
fs = gcsfs.GCSFileSystem(token="anon")
fs.pipe_file(path, b"first", mode="create")
began = time.monotonic()
try:
    fs.pipe_file(path, b"second", mode="create")
    outcome = "overwritten"
except FileExistsError:
    outcome = "FileExistsError"
except Exception as error:  # an older gcsfs: TypeError (no `mode`), or anything else
    outcome = type(error).__name__
print(gcsfs.__version__, outcome, fs.cat_file(path).decode(), f"{time.monotonic() - began:.3f}")
"""


def _declared_floor() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        found = re.search(r'^gcs = \["gcsfs>=([^"]+)"\]', f.read(), re.M)
    assert found, "no gcs extra in pyproject.toml"
    return found.group(1)


@pytest.mark.parametrize("gcsfs_release", ["newest installed", "the extra's floor"])
def test_the_gcs_extra_floor_has_create_only_writes(gcsfs_release, figures):
    """``pipe_file(..., mode="create")`` on an object that exists, against the emulator: refused
    with FileExistsError and the object unchanged, with the newest gcsfs and with the floor the
    ``gcs`` extra declares (``pyproject.toml``); the release before the floor, gcsfs 2024.10.0, has no
    ``mode`` argument (a TypeError)."""
    floor = _declared_floor()
    python = sys.executable
    if gcsfs_release == "the extra's floor":
        python = os.path.join(FLOOR_VENV, "bin", "python")
        if not os.path.exists(python):
            pytest.skip(f"no floor venv at {FLOOR_VENV} (built by `make test-gcs-floor`)")
    emulator_url()  # sets STORAGE_EMULATOR_HOST, inherited by the probe
    path = fresh_root()[len("gs://"):] + "/probe"
    began = time.monotonic()
    out = subprocess.run([python, "-c", _CREATE_ONLY_PROBE, path], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, GCE_METADATA_HOST="127.0.0.1:9", NO_GCE_CHECK="True"))
    seconds = time.monotonic() - began
    assert out.returncode == 0, out.stderr[-2000:]
    version, outcome, content, _ = out.stdout.split()
    if gcsfs_release == "the extra's floor":
        assert version == floor, f"the floor venv has gcsfs {version}, the extra declares {floor}"
    assert outcome == "FileExistsError" and content == "first", out.stdout
    figures.update(run=f"gcsfs {version} against fake-gcs-server: create an object, then create it again",
                   declared_floor=f"gcsfs>={floor}", gcsfs=version, second_create=outcome,
                   object_unchanged=content == "first", seconds=round(seconds, 2))
