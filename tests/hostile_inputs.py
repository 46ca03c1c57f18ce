"""Inputs from outside, for the secrets and boundary tests (``tests/test_secrets.py``,
``tests/test_boundaries.py`` and their scenarios in ``tests/reliability/``): credentials in a
handle's URL, a signed redirect query, and the ``hubcache`` command run as a real process."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile

HUBCACHE_CLI = os.path.join(os.path.dirname(sys.executable), "hubcache")
USER, PASSWORD = "model-reader", "s3cr3t-Pa55w0rd"
SIGNATURE = "X-Goog-Signature=deadbeefcafe0123456789signed"


def basic(user: str, password: str) -> str:
    """The ``Authorization`` header of HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def with_credentials(url: str, user: str = USER, password: str = PASSWORD) -> str:
    """``url`` with ``user:password@`` in it."""
    return url.replace("http://", f"http://{user}:{password}@", 1)


def cache_root() -> str:
    """The default cache of an isolated test (root-owned temp dir: ``<tmp>/tfhub_modules``)."""
    return os.path.join(tempfile.gettempdir(), "tfhub_modules")


def every_byte_under(root: str) -> bytes:
    """The names and contents of everything under ``root`` (what a grep -r would see)."""
    out = []
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            full = os.path.join(dirpath, name)
            out.append(full.encode())
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    out.append(f.read())
    return b"\n".join(out)


def run_cli(*args: str | bytes, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``hubcache *args`` as a real process (bytes out), with ``env`` added to this environment."""
    full = dict(os.environ, **(env or {}))
    return subprocess.run([HUBCACHE_CLI, *args], capture_output=True, timeout=120, env=full)


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: bytes) -> None:
    """Exit status 1, nothing on stdout, one ``hubcache: error:`` line holding ``needles``, no traceback."""
    assert out.returncode == 1 and out.stdout == b"", out.stderr
    assert out.stderr.startswith(b"hubcache: error: ") and out.stderr.count(b"\n") == 1, out.stderr
    assert b"Traceback" not in out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


#: A pin no archive has.
PIN = "#sha256=" + "ab" * 32
