"""Building blocks of the reliability scenarios: archives with a chosen member order, child
processes that resolve handles (``_child.py``), file-system snapshots and polling, and an event
recorder hung on the real ``hubcache_event`` hook."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import hubcache
from hubcache.core.events import Event
from hubcache.plugins.registry import get_registry
from hubcache.testing import compress

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")
LEFTOVER_SUFFIXES = (".tmp", ".part", ".trash")


def make_archive(files: list[tuple[str, bytes]], fmt: str = "gz") -> bytes:
    """A tar archive of ``files`` in exactly this order (parents implied), compressed as ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return compress(buf.getvalue(), fmt)


def tree(path: str) -> dict[str, bytes]:
    """Every regular file under ``path`` as ``{relative path: bytes}`` (symlinks skipped)."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                with open(full, "rb") as f:
                    out[os.path.relpath(full, path)] = f.read()
    return out


def snapshot(root: str) -> dict[str, tuple]:
    """Everything under ``root``: relative path -> (kind, size, mtime_ns, content digest)."""
    import hashlib

    out: dict[str, tuple] = {}
    if not os.path.exists(root):
        return out
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = ("dir", st.st_mtime_ns)
            else:
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
                out[rel] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def leftovers(root: str) -> list[str]:
    """Temp dirs, ``.part`` files and trash a writer left in a cache root."""
    try:
        return sorted(n for n in os.listdir(root) if n.endswith(LEFTOVER_SUFFIXES))
    except FileNotFoundError:
        return []


def count_files(path: str) -> int:
    """Regular files under ``path`` (0 if it vanished meanwhile)."""
    total = 0
    for _, _, names in os.walk(path):
        total += len(names)
    return total


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.001,
             what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def proc_state(pid: int) -> str:
    """The kernel's one-letter state of a process (``T``: stopped, ``Z``: zombie), ``""`` if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def child_command(config: dict) -> list[str]:
    """The command line of a child resolving process (see ``_child.py`` for ``config``)."""
    return [sys.executable, CHILD, json.dumps(config)]


def start_child(config: dict, *, env: dict[str, str] | None = None, user: int | None = None) -> subprocess.Popen:
    """Start a child process resolving handles (inherits the isolated test environment)."""
    kwargs: dict = {}
    if user is not None:
        kwargs.update(user=user, group=user, extra_groups=[])
    return subprocess.Popen(child_command(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, **(env or {})), **kwargs)


def held_locks(pid: int) -> list[tuple[str, str]]:
    """The ``flock``/POSIX locks a process holds, as (READ|WRITE, file path) from ``/proc/locks``."""
    inodes: dict[str, str] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inodes[f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"] = target
    out = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields or len(fields) < 6 or fields[4] != str(pid):
                continue
            out.append((fields[3], inodes.get(fields[5], fields[5])))
    return out


def open_files(pid: int) -> list[str]:
    """Paths of the files a process has open."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def child_results(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """Wait for a child and return its JSON report (fails the test with its stderr otherwise)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child exited {proc.returncode}: {err.decode(errors='replace')[-3000:]}"
    return json.loads(out.decode().strip().splitlines()[-1])


@dataclass
class EventLog:
    """Records every hubcache event of this process while registered (real hook, no mock)."""

    events: list[Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @hubcache.hookimpl
    def hubcache_event(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def kinds(self, kind: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.kind == kind]

    def __enter__(self) -> EventLog:
        get_registry().register(self, self._name)
        return self

    def __exit__(self, *exc) -> None:
        registry = get_registry()
        registry.pm.unregister(self)
        registry.plugins.pop(self._name, None)

    @property
    def _name(self) -> str:
        return f"reliability-events-{id(self)}"
