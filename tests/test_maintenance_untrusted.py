"""The maintenance commands (verify, ls, info, prune, rm) against a cache others can write.

What a cache or bucket holds (manifests, descriptors, extra files) is planted here as someone
who can write the cache would plant it, and the real ``hubcache`` command runs as a child process:
``verify --repair`` never fetches a handle it read from the cache, no control character from the
cache reaches the terminal, ``verify --full`` names what an entry holds beyond its manifest, and
the size budget counts the bytes really there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from gcs_emulator import fresh_root, gcs  # first: it sets up gcsfs for the emulator before any import
from hubcache.core.handles import cache_key
from hubcache.core.manifest import Manifest
from hubcache.testing import archive_of, build_model_dir
from bucket_layout import descriptor_object
from bucket_layout import plant_manifest as plant_bucket_manifest
from local_layout import committed_names, manifest_data, write_manifest_json

#: A terminal title change (OSC), a bell, a CR+LF that forges a line, a CSI (C1) and a bidi override.
EVIL = "https://evil.example/m\x1b]0;pwned\x07\r\nok   FORGED LINE\x9b2J\u202e\x7f"
PLANTED = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def home(tmp_path, monkeypatch) -> str:
    """The home backend selected; its cache root (as the child processes see it)."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home")
    root = str(tmp_path / "cache")
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    return root


def hubcache(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real command in a child process (inherits the test's environment)."""
    return subprocess.run([sys.executable, "-m", "hubcache", *argv], capture_output=True, text=True,
                          timeout=60)


def resolved(handle: str) -> str:
    out = hubcache("resolve", handle)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def plant_manifest(root: str, key: str, manifest: Manifest) -> None:
    """Write a manifest as a writer of the cache could (owned by this trusted user): at the end of
    the entry's descriptor."""
    os.makedirs(root, exist_ok=True)
    write_manifest_json(root, key, manifest.to_json())


def rewrite_manifest(root: str, key: str, **changes: object) -> None:
    data = manifest_data(root, key)
    data.update(changes)
    write_manifest_json(root, key, json.dumps(data))


def entries_on_disk(root: str) -> list[str]:
    """Entry folders and descriptors holding a manifest under ``root``."""
    return committed_names(root)


def damaged_manifest(handle: str) -> Manifest:
    """A manifest naming ``handle`` whose file is missing: a damaged entry verify would repair."""
    from hubcache.core.manifest import FileRecord

    return Manifest(handle=handle, files=[FileRecord("saved_model.pb", 10, "00000000")], creator="planted")


# -- 1. verify --repair without handles only cleans up ------------------------------------------


def test_repair_without_handles_never_fetches_a_handle_a_planted_manifest_names(home, origin, tmp_path):
    """A planted manifest naming a URL (here a loopback origin standing in for an intranet or
    metadata address) must not make ``verify --repair`` request it: the damaged entry is removed,
    nothing is downloaded. Named on the command line, the same handle is downloaded."""
    model = build_model_dir(tmp_path / "m", weights_bytes=20_000)
    target = origin.add("/intranet/secret.tar.gz", archive_of(model))
    plant_manifest(home, PLANTED, damaged_manifest(target))
    # And a real entry of that handle, damaged afterwards: its manifest names it too.
    path = resolved(target)
    os.unlink(os.path.join(path, "saved_model.pb"))
    origin.reset_counts()

    out = hubcache("verify", "--repair", "--json")
    assert origin.count() == 0, "verify --repair fetched a handle read from the cache"
    assert entries_on_disk(home) == [], "the damaged entries are removed, nothing is rebuilt"
    assert out.returncode == 0, out.stdout + out.stderr
    statuses = {r["key"]: r["status"] for r in json.loads(out.stdout)}
    assert statuses == {PLANTED: "removed", cache_key(target): "removed"}

    # The text output says why it was not downloaded again, and the handle still works by name.
    plant_manifest(home, PLANTED, damaged_manifest(target))
    text = hubcache("verify", "--repair")
    assert "removed" in text.stdout and "not downloaded again" in text.stdout and origin.count() == 0

    path = resolved(target)
    os.unlink(os.path.join(path, "saved_model.pb"))
    origin.reset_counts()
    explicit = hubcache("verify", "--repair", "--json", target)
    assert explicit.returncode == 0, explicit.stdout + explicit.stderr
    assert [r["status"] for r in json.loads(explicit.stdout)] == ["repaired"], explicit.stdout
    assert origin.count("/intranet/secret.tar.gz") >= 1  # the user named it: downloaded again


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_repair_without_handles_never_unpacks_a_local_file_a_manifest_names(home, tmp_path, form):
    """A planted manifest naming an archive on the maintenance host's own disk must not make
    ``verify --repair`` unpack it into the cache (from where a bucket tier would publish it)."""
    model = build_model_dir(tmp_path / "private", weights_bytes=10_000)
    archive = tmp_path / "private.tar.gz"
    archive.write_bytes(archive_of(model))
    handle = str(archive) if form == "path" else f"file://{archive}"
    plant_manifest(home, PLANTED, damaged_manifest(handle))
    plant_manifest(home, cache_key(handle), damaged_manifest(handle))

    out = hubcache("verify", "--repair", "--json")
    assert entries_on_disk(home) == [], "nothing may be unpacked from the host's own files"
    assert out.returncode == 0, out.stdout + out.stderr
    assert {r["status"] for r in json.loads(out.stdout)} == {"removed"}


def test_verify_help_says_repair_fetches_only_named_handles():
    out = hubcache("verify", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "downloads again only the HANDLEs named on the command line" in text
    assert "never fetches a handle read from the cache" in text


# -- 2. control characters from a cache are escaped ---------------------------------------------


def assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    for stream in (proc.stdout, proc.stderr):
        for char in ("\x1b", "\r", "\x07", "\x9b", "\u202e", "\x7f"):
            assert char not in stream, (char, stream)


def test_no_control_character_from_a_cache_reaches_the_terminal(home, origin, tmp_path):
    """A manifest whose handle, source and creator carry an OSC title sequence, a bell, CR/LF,
    a C1 CSI and a bidi override, and a file name with ESC: every human-readable command prints
    them escaped (``\\x1b``), each on its one line; ``--json`` is plain JSON."""
    model = build_model_dir(tmp_path / "m", weights_bytes=20_000)
    url = origin.add("/m.tar.gz", archive_of(model))
    key = cache_key(url)
    path = resolved(url)
    rewrite_manifest(home, key, handle=EVIL, source=EVIL, creator=EVIL)
    with open(os.path.join(path, "x\x1b[31mplanted\r"), "wb") as f:  # unlisted: verify --full names it
        f.write(b"x")
    plant_manifest(home, PLANTED, damaged_manifest(EVIL))

    runs = {
        "ls": hubcache("ls"),
        "verify": hubcache("verify"),
        "verify --full": hubcache("verify", "--full"),
        "prune -n": hubcache("prune", "--dry-run", "--max-size", "1"),
        "info": hubcache("info", url),
        "rm": hubcache("rm", PLANTED),
        "error": hubcache("resolve", "/nonexistent/\x1b]0;pwned\x07"),
        "verify -v --repair": hubcache("-v", "verify", "--repair"),
    }
    for name, proc in runs.items():
        assert_clean(proc)
    assert "\\x1b]0;pwned\\x07\\r\\nok   FORGED LINE\\x9b2J\\u202e\\x7f" in runs["ls"].stdout
    assert not any(line.startswith("ok   FORGED") for line in runs["verify"].stdout.splitlines())
    assert "x\\x1b[31mplanted\\r is not in the manifest" in runs["verify --full"].stdout
    assert "from \\x1b" not in runs["info"].stdout and "\\x1b]0;pwned" in runs["info"].stdout
    assert runs["error"].returncode != 0 and "error" in runs["error"].stderr
    listed = hubcache("ls", "--json")
    assert EVIL in {e["handle"] for e in json.loads(listed.stdout)["entries"]}


def test_printable_escapes_every_control_character_and_nothing_else():
    from hubcache.cli import printable

    controls = [chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)]] + ["\u2028", "\u2029", "\u202e", "\u2066"]
    for char in controls:
        out = printable(f"a{char}b")
        assert out.startswith("a\\") and out.endswith("b") and out.isprintable(), repr(out)
    plain = "https://tfhub.dev/google/spice/2 — modèle 模型 [home] 1.5 MiB"
    assert printable(plain) == plain


# -- 3. verify --full names what the manifest does not list -----------------------------------


def test_verify_full_reports_files_an_entry_holds_beyond_its_manifest(home, origin, tmp_path):
    model = build_model_dir(tmp_path / "m", weights_bytes=20_000)
    url = origin.add("/m.tar.gz", archive_of(model))
    path = resolved(url)
    assert json.loads(hubcache("verify", "--full", "--json").stdout)[0]["status"] == "ok"
    with open(os.path.join(path, "variables", "planted.bin"), "wb") as f:
        f.write(b"\0" * 1000)
    os.makedirs(os.path.join(path, "planted_dir", "deep"))
    os.symlink("/etc/passwd", os.path.join(path, "link"))

    quick = json.loads(hubcache("verify", "--json").stdout)[0]
    full = hubcache("verify", "--full", "--json")
    report = json.loads(full.stdout)[0]
    assert quick["status"] == "ok"  # sizes only: what the manifest lists is intact
    assert full.returncode == 1 and report["status"] == "damaged"
    assert report["problems"] == ["link is not in the manifest", "planted_dir/ is not in the manifest",
                                  "variables/planted.bin is not in the manifest"]


def test_verify_full_reports_objects_a_bucket_entry_holds_beyond_its_manifest():
    """The same for an object store (the real GCS emulator): an object under the entry's prefix
    that the manifest does not list."""
    from hubcache.backends.gcs_store import GcsObjectStore
    from hubcache.core.manifest import FileRecord
    from hubcache.maintenance.verify import unlisted

    root = fresh_root()
    store = GcsObjectStore(root, gcs())
    writer = store.writer(PLANTED, "https://example.com/m.tar.gz")
    writer.add_file("saved_model.pb", iter([b"pb"]))
    manifest = Manifest(handle="https://example.com/m.tar.gz", files=[FileRecord("saved_model.pb", 2, "")])
    writer.commit(manifest)
    assert unlisted(store, PLANTED, store.read_manifest(PLANTED)) == []
    gcs().pipe(f"{root.split('://', 1)[1]}/{PLANTED}/variables/planted.bin", b"x" * 100)
    assert unlisted(store, PLANTED, store.read_manifest(PLANTED)) == ["variables/planted.bin"]


# -- 4. the size budget counts real bytes -----------------------------------------------------


def test_prune_budget_counts_real_bytes_not_the_manifest_claim(home, origin, tmp_path):
    """A manifest that lists none of its entry's 10 MiB claims 0 bytes: under a 1 MiB budget
    prune must still evict the entry (before: the total looked like 0 B and nothing went)."""
    model = build_model_dir(tmp_path / "m", weights_bytes=20_000)
    url = origin.add("/m.tar.gz", archive_of(model))
    key = cache_key(url)
    path = resolved(url)
    with open(os.path.join(path, "variables", "hidden.bin"), "wb") as f:
        f.truncate(10 << 20)
    rewrite_manifest(home, key, files=[], dirs=[], symlinks={})
    listed = json.loads(hubcache("ls", "--json").stdout)["entries"]
    assert [(e["state"], e["bytes"]) for e in listed] == [("committed", 0)]  # ls shows the claim

    dry = json.loads(hubcache("prune", "--dry-run", "--max-size", "1M", "--json").stdout)[0]
    assert dry["bytes_before"] >= 10 << 20
    assert [a["outcome"] for a in dry["actions"]] == ["would remove"]
    done = hubcache("prune", "--max-size", "1M")
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(path)


def test_size_budget_after_a_resolve_counts_real_bytes(home, origin, tmp_path, monkeypatch):
    """HUBCACHE_MAX_SIZE, enforced after each download, measures entries the same way."""
    urls = []
    for i in range(2):
        model = build_model_dir(tmp_path / f"m{i}", weights_bytes=20_000, seed=i)
        urls.append(origin.add(f"/m{i}.tar.gz", archive_of(model)))
    first = resolved(urls[0])
    with open(os.path.join(first, "hidden.bin"), "wb") as f:
        f.truncate(10 << 20)
    rewrite_manifest(home, cache_key(urls[0]), files=[], dirs=[], symlinks={})
    time.sleep(0.05)
    monkeypatch.setenv("HUBCACHE_MAX_SIZE", "1M")
    resolved(urls[1])
    assert not os.path.exists(first), "the entry hiding 10 MiB was kept under a 1 MiB budget"


def test_prune_budget_counts_real_bytes_in_a_bucket():
    """An object store entry: real sizes come from the listing, not the manifest."""
    from hubcache.backends.gcs_store import GcsObjectStore
    from hubcache.core.manifest import FileRecord
    from hubcache.maintenance.prune import prune_store

    root = fresh_root()
    store = GcsObjectStore(root, gcs())
    writer = store.writer(PLANTED, "https://example.com/m.tar.gz")
    writer.add_file("saved_model.pb", iter([b"pb"]))
    writer.commit(Manifest(handle="https://example.com/m.tar.gz", files=[FileRecord("saved_model.pb", 2, "")]))
    gcs().pipe(f"{root.split('://', 1)[1]}/{PLANTED}/hidden.bin", b"\0" * (2 << 20))
    report = prune_store(store, max_size=1 << 20, dry_run=True)
    assert report.total_before >= 2 << 20
    assert [a.outcome for a in report.actions] == ["would remove"]


def test_bucket_entries_through_the_cli(origin, tmp_path, monkeypatch):
    """The gcs backend end to end (real emulator, real processes): a planted object is named by
    ``verify --full``; a planted manifest naming an origin URL is removed by ``verify --repair``
    and the origin gets no request."""
    root = fresh_root()
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    model = build_model_dir(tmp_path / "m", weights_bytes=20_000)
    url = origin.add("/bucket/m.tar.gz", archive_of(model))
    resolved(url)
    prefix = root.split("://", 1)[1]
    gcs().pipe(f"{prefix}/{cache_key(url)}/variables/planted.bin", b"x" * 100)
    plant_bucket_manifest(gcs(), descriptor_object(prefix, PLANTED), damaged_manifest(url + "?planted").to_json())
    full = json.loads(hubcache("verify", "--full", "--json").stdout)
    problems = {r["key"]: r["problems"] for r in full}
    assert "variables/planted.bin is not in the manifest" in problems[cache_key(url)]
    origin.reset_counts()
    repair = hubcache("verify", "--repair", "--json")
    assert origin.count() == 0
    assert {r["key"]: r["status"] for r in json.loads(repair.stdout)}[PLANTED] == "removed", repair.stdout
    assert not gcs().exists(descriptor_object(prefix, PLANTED))
