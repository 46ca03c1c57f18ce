"""The progress display, seen as a user sees it: the CLI runs in a child process whose stderr is a
real pseudo-terminal (stdlib ``pty``), downloading from a throttled local origin, and what it
wrote is replayed through a VT100 emulator (``pyte``) to get the screen; the raw byte stream is
checked too, for the frames drawn while the download was running.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pyte
import pytest

from hubcache.core.handles import cache_key
from hubcache.testing import archive_of, build_model_dir

COLS, ROWS = 120, 24
BAR = re.compile(r"(\d+)%\|")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HUBCACHE_NO_PROGRESS", "TFHUB_DOWNLOAD_PROGRESS"):
        env.pop(name, None)  # conftest silences progress for in-process tests
    env.update(extra)
    return env


def run_in_terminal(argv: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    """Run ``hubcache argv`` with stdout and stderr on one pseudo-terminal (COLS x ROWS).

    Returns the exit status, the raw text written, and the final screen.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    child = subprocess.Popen([sys.executable, "-m", "hubcache", *argv], stdin=subprocess.DEVNULL,
                             stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no end of output within {timeout} s: {b''.join(chunks)[-500:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        child.kill()
        code = child.wait()
    raw = b"".join(chunks).decode("utf-8", errors="replace")
    screen = pyte.Screen(COLS, ROWS)
    pyte.Stream(screen).feed(raw)
    return code, raw, "\n".join(line.rstrip() for line in screen.display).strip()


def run_piped(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubcache", *argv], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.fixture
def slow(origin, tmp_path):
    """Three ~3 MB archives served at 2 MB/s each: a download lasts about 1.5 s.

    The downloader reports progress once per 1 MiB read, so a few MiB are needed to see frames
    drawn mid-download.
    """
    urls = []
    for i in range(3):
        model = build_model_dir(tmp_path / f"slow{i}", weights_bytes=3_000_000, seed=i)
        path = f"/slow/model{i}.tar.gz"
        urls.append(origin.add(path, archive_of(model)))
        origin.throttle(path, 2_000_000)
    return urls


@pytest.fixture
def fast(origin, tmp_path):
    """One small archive at full speed (for tests that only look at what is drawn)."""
    model = build_model_dir(tmp_path / "fast", weights_bytes=300_000)
    return origin.add("/fast/model.tar.gz", archive_of(model))


def archive_size(origin, url: str) -> int:
    return len(origin.routes[url.split(str(origin._server.server_address[1]), 1)[1]].body)


def kib(n: int) -> str:
    """How tqdm prints a byte count with unit_scale and unit_divisor=1024 (``2.87M``)."""
    from tqdm import tqdm

    return tqdm.format_sizeof(n, divisor=1024)


def test_resolve_on_a_terminal_draws_a_bar_with_byte_counts(slow, origin):
    code, raw, screen = run_in_terminal(["resolve", slow[0]], child_env())
    assert code == 0, raw
    size = archive_size(origin, slow[0])
    # The final screen: one finished bar, labelled with the handle's tail, then the path.
    bar = next(line for line in screen.splitlines() if "%|" in line)
    host = slow[0].split("/")[2]
    assert bar.startswith(f"{host}/slow/model0.tar.gz: 100%|") and "█" in bar
    assert f"{kib(size)}/{kib(size)} [" in bar
    assert raw.endswith(f"/tfhub_modules/{cache_key(slow[0])}\r\n")  # the path, on stdout
    # While it ran, partial frames were drawn in place (carriage returns, rising percentages).
    percents = [int(p) for p in BAR.findall(raw)]
    assert len(percents) >= 3 and any(0 < p < 100 for p in percents), percents
    assert percents == sorted(percents) and percents[-1] == 100
    assert "\r" in raw


def test_no_bar_without_a_terminal(fast):
    result = run_piped(["resolve", fast], child_env())
    assert result.returncode == 0
    assert result.stderr == "" and "\r" not in result.stdout
    assert result.stdout.endswith(f"/tfhub_modules/{cache_key(fast)}\n")


def test_hubcache_no_progress_silences_the_terminal(fast):
    code, raw, screen = run_in_terminal(["resolve", fast], child_env(HUBCACHE_NO_PROGRESS="1"))
    assert code == 0
    assert "%|" not in raw and "\r" not in raw.replace("\r\n", "\n")
    assert raw.endswith(f"/tfhub_modules/{cache_key(fast)}\r\n") and raw.count("\n") == 1


def test_tfhub_download_progress_forces_the_bar_without_a_terminal(fast, origin):
    result = run_piped(["resolve", fast], child_env(TFHUB_DOWNLOAD_PROGRESS="1"))
    assert result.returncode == 0
    size = archive_size(origin, fast)
    assert "/fast/model.tar.gz: 100%|" in result.stderr and f"{kib(size)}/{kib(size)}" in result.stderr


def test_prefetch_on_a_terminal_draws_one_display(slow, origin):
    code, raw, screen = run_in_terminal(["prefetch", "--jobs", "3", *slow], child_env())
    assert code == 0, raw
    total = sum(archive_size(origin, url) for url in slow)
    lines = screen.splitlines()
    bars = [line for line in lines if "%|" in line]
    assert len(bars) == 1, screen  # one display, not one bar per download
    assert bars[0].startswith("prefetch 3/3: 100%|") and f"{kib(total)}/{kib(total)} [" in bars[0]
    fetched = [line for line in lines if line.startswith("fetched")]
    assert sorted(line.split()[-1] for line in fetched) == sorted(slow)
    assert lines[-1].startswith("3 handles in ") and "3 downloaded" in lines[-1]
    # The display counted handles up as they finished, while bytes were still arriving.
    assert re.search(r"prefetch [012]/3: +\d+%\|", raw), raw[-2000:]
