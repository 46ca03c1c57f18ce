"""Fixtures for hubcache-s3's tests: a real S3 server (moto's), an isolated environment per test.

moto's standalone server (PyPI ``moto[server]``) runs in a child process on 127.0.0.1, on a free
port, for the whole session; it speaks the S3 REST protocol over HTTP, so s3fs, botocore and
the child processes the tests start talk to it exactly as they would to S3 — including the
``412 Precondition Failed`` answer to a conditional create of an existing key, which the lease
and the commit rest on. The child exits when this process closes its stdin, so a crashed test
run leaves no server behind.

These fixtures are the package's own (a third party cannot use hubcache's ``tests/conftest.py``).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from typing import Iterator

import pytest

from hubcache.core import resolver
from hubcache.testing import OriginServer, build_model_dir, isolate

BUCKET = "hubcache-s3-test"

# hubcache's own settings are cleared by hubcache.testing.isolate; these are the plugin's and AWS's.
_LEAKY = ("HUBCACHE_S3_ENDPOINT_URL", "HUBCACHE_S3_PROFILE", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
          "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
          "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")

_MOTO = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the test session closes our stdin (or dies)
"""


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory) -> Iterator[str]:
    """The URL of a moto S3 server on 127.0.0.1 (started once per session)."""
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    if not (line and line[0].strip().isdigit()):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"moto's server did not start: {log.read_text()[-2000:]}")
    try:
        yield f"http://127.0.0.1:{int(line[0])}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, moto_endpoint) -> Iterator[None]:
    """Every test gets its own TMPDIR and user cache dir, no inherited hubcache or AWS settings,
    fake credentials, and botocore pointed at moto (``AWS_ENDPOINT_URL``, which every s3fs
    client honours, the suite's own reads included); memoised resolves are forgotten."""
    for name in _LEAKY:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    isolate(monkeypatch, tmp_path)
    yield
    resolver.clear_memo()


_buckets: set[str] = set()


@pytest.fixture
def bucket(moto_endpoint) -> str:
    """The session's bucket in moto (created on first use)."""
    if BUCKET not in _buckets:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, key="testing", secret="testing",
                               skip_instance_cache=True)
        try:
            fs.mkdir(BUCKET)
        except FileExistsError:
            pass
        _buckets.add(BUCKET)
    return BUCKET


@pytest.fixture
def s3_root(bucket) -> str:
    """An ``s3://`` cache root no other test uses."""
    return f"s3://{bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    """hubcache's test origin: an HTTP server on 127.0.0.1 serving archives, counting requests."""
    with OriginServer() as server:
        yield server


@pytest.fixture
def model(tmp_path) -> str:
    """A SavedModel-shaped directory (two weight shards, an empty directory)."""
    return build_model_dir(tmp_path / "model", weights_bytes=200_000, shards=2)
