"""An untrusted bucket: a ``gs://`` cache (``TFHUB_CACHE_DIR=gs://...``, or the shared tier of
``HUBCACHE_BACKEND=home,gcs``) is shared by a fleet, and more principals can usually write it than
any one host trusts (every host's service account, CI jobs, notebooks). Here someone who can write
the bucket plants what a host then reads, against a real GCS emulator (fake-gcs-server on
127.0.0.1) and a real loopback origin: manifests whose names leave the entry, objects changed
behind their manifest, manifests that are valid JSON of the wrong shape, names with terminal
control characters that maintenance prints, a lease claiming a TTL of 10⁹ s, and a forged entry
claiming a pinned handle's digest. The host's files outside its home tier are snapshotted around
each resolve, and the origin's request count says who served the bytes.

What a bucket writer still can do is stated where it is measured: an unpinned handle copied down
by ``home,gcs`` gets whatever consistent entry (manifest, sizes, CRC-32s) the bucket holds, marked
unverified; with a single ``gcs`` backend a pinned handle is compared with the digest in the
bucket's manifest, which a bucket writer can forge. There the bucket's ACL is the trust boundary.
An entry whose objects were damaged behind a well-formed manifest stays in the bucket (each
``home,gcs`` host misses it and downloads from the origin) until ``hubcache verify --repair``
removes it.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from typing import Callable

import pytest

import hubcache
from gcs_emulator import fresh_root, gcs  # first: it configures gcsfs before gcsfs is imported
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.core.manifest import Manifest
from hubcache.stores.objectstore import CLOCK_SKEW, MAX_LEASE_TTL, LeaseState
from hubcache.testing import archive_of, build_model_dir, read_tree, tree_of

from bucket_layout import descriptor_object, manifest_json, plant_manifest
from second_user import evil, manifest_of  # noqa: F401 (fixture: a model of the same layout, other bytes)
from test_maintenance_untrusted import EVIL, PLANTED, assert_clean, damaged_manifest
from test_maintenance_untrusted import hubcache as run_hubcache
from test_tier_copy_hostile import _fleet_second_host, only_the_entry, record, snapshot, tiers

SCENARIO = "18. An untrusted bucket"


def bucket_path(url: str) -> str:
    """A ``gs://`` URL as a gcsfs path."""
    return url.split("://", 1)[1]


def bucket_manifest(key: str) -> str:
    """The gcsfs path of the object holding ``key``'s manifest (at the end of its descriptor) in
    the bucket ``TFHUB_CACHE_DIR`` names."""
    return descriptor_object(bucket_path(os.environ["TFHUB_CACHE_DIR"]), key)


def read_bucket_manifest(key: str) -> bytes:
    """``key``'s manifest JSON in the bucket."""
    return manifest_json(gcs(), bucket_manifest(key))


def plant_bucket_manifest(key: str, data: bytes) -> None:
    """Put ``data`` as ``key``'s manifest in the bucket, as a bucket writer would."""
    plant_manifest(gcs(), bucket_manifest(key), data)


def edit_bucket_manifest(key: str, edit: Callable[[Manifest], None]) -> None:
    """Rewrite ``key``'s manifest in the bucket as a bucket writer would."""
    manifest = Manifest.from_json(read_bucket_manifest(key))
    edit(manifest)
    plant_bucket_manifest(key, manifest.to_json())


def second_host_resolves(origin, model, monkeypatch, tmp_path, plant: Callable[[str, str], None]) -> dict:
    """Host 1 of a ``home,gcs`` fleet fills the bucket; ``plant(key, bucket entry path)`` forges it;
    host 2 (this process, an empty home tier) resolves the handle. Asserts the forged entry was a
    miss: nothing outside host 2's home tier changed (victims where ``../../x`` and an absolute
    name point included), only the entry is in the tier, the origin served, the model's bytes are
    served. Returns the figures."""
    url, _ = _fleet_second_host(origin, model, monkeypatch, tmp_path)
    key = cache_key(url)
    plant(key, f"{bucket_path(os.environ['TFHUB_CACHE_DIR'])}/{key}")
    home = tiers()[0]
    os.makedirs(home.store.root)
    victims = {os.path.join(os.path.dirname(home.store.root), "x"): b"victim", str(tmp_path / "abs-victim"): b"v"}
    for path, data in victims.items():
        with open(path, "wb") as f:
            f.write(data)
    before = snapshot(str(tmp_path), home.store.root)
    began = time.perf_counter()
    path = hubcache.resolve(url)
    seconds = time.perf_counter() - began
    after = snapshot(str(tmp_path), home.store.root)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert not changed, f"written or removed outside the home tier: {sorted(changed)[:5]}"
    assert only_the_entry(home.store.root, key) == [], "a temp dir or a stray file is left in the tier"
    assert path == home.store.entry_path(key) and tree_of(path) == tree_of(model)
    assert origin.count() == 2, "the forged bucket entry must not serve; the origin does"
    assert home.store.read_manifest(key).archive.get("verified", True) is not False, "the origin's, verified"
    # The copy up replaces a bucket entry whose manifest is unusable; one whose manifest reads well
    # stays as planted (every host misses it) until `hubcache verify --repair` or `rm` removes it.
    problems = tiers()[1].store.verify(key, full=True)
    return dict(files_outside_home_tier=len(changed), host2_origin_requests=origin.count() - 1,
                served="the origin's archive", served_bytes_match_origin=True, resolve_s=round(seconds, 3),
                bucket_entry_after="replaced by the copy up" if not problems else f"still damaged ({problems[0]})")


# -- 1. names that leave the entry ------------------------------------------------------------------

#: case -> how the bucket writer edits the manifest (``abs_``: an absolute path in the sandbox).
LEAVING = {
    "file ../../x": lambda m, abs_: m.files.append(record("../../x", b"evil")),
    "absolute file name": lambda m, abs_: m.files.append(record(abs_, b"evil")),
    "file a//b": lambda m, abs_: m.files.append(record("variables//evil", b"evil")),
    "file ./x": lambda m, abs_: m.files.append(record("./x", b"evil")),
    "directory ../../evil-dir": lambda m, abs_: m.dirs.append("../../evil-dir"),
    "link l -> ../../x": lambda m, abs_: m.symlinks.update(l="../../x"),
    "link l -> absolute path": lambda m, abs_: m.symlinks.update(l=abs_),
    "link through a link": lambda m, abs_: m.symlinks.update({"esc": "assets/up/..", "assets/up": ".."}),
}


@pytest.mark.parametrize("case", list(LEAVING))
def test_a_manifest_whose_names_leave_the_entry_writes_nothing_outside(case, origin, model, monkeypatch,
                                                                       tmp_path, figures):
    """A ``home,gcs`` host copies down an entry whose bucket manifest names a file, a directory
    or a link target outside the entry (``..``, absolute, not in normal form, through another
    link): the entry is a miss, the origin serves, nothing outside the home tier is written."""
    def plant(key: str, entry: str) -> None:
        edit_bucket_manifest(key, lambda m: LEAVING[case](m, str(tmp_path / "abs-victim")))
        # The announced bytes wait where each planted name points (as the emulator cleans names),
        # so a copy that followed the name would find exactly what the manifest says.
        for name in {r.path for r in Manifest.from_json(read_bucket_manifest(key)).files} - set(tree_of(model)):
            gcs().pipe_file(posixpath.normpath(f"{entry}/{name}"), b"evil")

    measured = second_host_resolves(origin, model, monkeypatch, tmp_path, plant)
    figures.update(run=f"home,gcs host 2 resolves a bucket entry whose manifest has {case}", **measured)


# -- 2. objects changed behind the manifest ----------------------------------------------------------


def _weights(key: str) -> str:
    """The name of the entry's largest file (a weights shard), from its bucket manifest."""
    manifest = Manifest.from_json(read_bucket_manifest(key))
    return max(manifest.files, key=lambda r: r.size).path


DAMAGE = {
    "an object missing": lambda entry, name, data: gcs().rm(f"{entry}/{name}"),
    "an object 1 byte longer": lambda entry, name, data: gcs().pipe_file(f"{entry}/{name}", data + b"!"),
    "an object's bytes changed (same size, other CRC-32)":
        lambda entry, name, data: gcs().pipe_file(f"{entry}/{name}", bytes(b ^ 0xFF for b in data[:64]) + data[64:]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_objects_changed_behind_the_manifest_are_a_miss(case, origin, model, monkeypatch, tmp_path, figures):
    """A ``home,gcs`` host copies down an entry one of whose objects was removed, lengthened or
    rewritten with other bytes of the same size behind its manifest: the copy stops at the
    mismatch, nothing of it is committed or served, the origin serves the handle."""
    damaged = {}

    def plant(key: str, entry: str) -> None:
        damaged["name"] = _weights(key)
        DAMAGE[case](entry, damaged["name"], gcs().cat_file(f"{entry}/{damaged['name']}"))

    measured = second_host_resolves(origin, model, monkeypatch, tmp_path, plant)
    figures.update(run=f"home,gcs host 2 resolves a bucket entry with {case} ({damaged['name']})", **measured)


# -- 3. valid JSON, not a manifest ---------------------------------------------------------------------

#: case -> the planted manifest's bytes, made from a real manifest's JSON.
SHAPES = {
    "files as an object": lambda d: {**d, "files": {"saved_model.pb": 1}},
    "a size as a string": lambda d: {**d, "files": [["saved_model.pb", "huge", "00000000"]]},
    "a negative size": lambda d: {**d, "files": [["saved_model.pb", -1, "00000000"]]},
    "a size of 10^30": lambda d: {**d, "files": [["saved_model.pb", 10 ** 30, "00000000"]]},
    "archive as a list": lambda d: {**d, "archive": [1, 2]},
    "format as a string": lambda d: {**d, "format": "1"},
    "a JSON list, not an object": lambda d: [d],
    "nested 100000 levels deep": None,  # raw text, below
}
#: Shapes whose numbers or containers break the parser itself (OverflowError, AttributeError).
SHAPES_OF_BROKEN_TYPES = {
    "a size of 1e400 (infinity)": lambda d: {**d, "files": [["saved_model.pb", 1e400, "00000000"]]},
    "symlinks as a list": lambda d: {**d, "symlinks": ["l"]},
}


def planted_bytes(shape: str, table: dict, real: dict) -> bytes:
    if table[shape] is None:
        return b'{"format": 1, "handle": "h", "files": [], "archive": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return json.dumps(table[shape](real)).encode()


@pytest.mark.parametrize("group", [
    "wrong types, absurd sizes, deep nesting",
    "infinite size, symlinks as a list",
])
def test_a_manifest_of_the_wrong_shape_is_a_damaged_entry(group, origin, model, monkeypatch, figures):
    """Manifests that are valid JSON of the wrong shape (wrong types, absurd numbers, nested
    deeper than the parser recurses) planted in a ``gs://`` cache, one per handle: each resolve
    is a miss (the origin serves, the manifest is replaced); ``ls`` and ``verify`` (real
    processes) report them damaged and the other entry good; ``rm`` removes them and keeps it."""
    table = SHAPES if group.startswith("wrong") else SHAPES_OF_BROKEN_TYPES
    figures.update(run=f"gcs backend; {len(table)} planted manifests ({'; '.join(table)}), then "
                       "resolve each, `hubcache ls`, `verify`, `rm` as processes")
    monkeypatch.setenv("TFHUB_CACHE_DIR", fresh_root())
    archive = archive_of(model)
    good = origin.add("/good.tar.gz", archive)
    good_path = hubcache.resolve(good)
    real = json.loads(read_bucket_manifest(cache_key(good)))
    handles = {shape: origin.add(f"/shape-{i}.tar.gz", archive) for i, shape in enumerate(table)}

    def plant() -> None:
        for shape, url in handles.items():
            plant_bucket_manifest(cache_key(url), planted_bytes(shape, table, real))

    plant()
    for shape, url in handles.items():
        resolver.clear_memo()
        path = hubcache.resolve(url)
        assert origin.count(f"/shape-{list(table).index(shape)}.tar.gz") == 1, f"{shape}: not a miss"
        assert path == f"{os.environ['TFHUB_CACHE_DIR']}/{cache_key(url)}"
        assert read_tree(path, gcs()) == tree_of(model)
        assert Manifest.from_json(read_bucket_manifest(cache_key(url))).handle == url, "replaced"
    plant()  # damaged again, for the maintenance commands
    listed = run_hubcache("ls", "--json")
    assert listed.returncode == 0, listed.stderr
    states = {e["key"]: e["state"] for e in json.loads(listed.stdout)["entries"]}
    verified = run_hubcache("verify", "--json")
    statuses = {r["key"]: r["status"] for r in json.loads(verified.stdout)}
    assert states[cache_key(good)] == "committed" and statuses[cache_key(good)] == "ok", (states, statuses)
    for url in handles.values():
        assert states[cache_key(url)] == "damaged" and statuses[cache_key(url)] != "ok", (states, statuses)
    removed = run_hubcache("rm", *handles.values())
    assert removed.returncode == 0, removed.stdout + removed.stderr
    left = [p.rsplit("/", 1)[1] for p in gcs().find(bucket_path(os.environ["TFHUB_CACHE_DIR"]))]
    assert not [n for n in left if n.startswith(tuple(cache_key(u) for u in handles.values()))], left
    assert f"{cache_key(good)}.descriptor.txt" in left
    resolver.clear_memo()
    assert hubcache.resolve(good) == good_path and origin.count("/good.tar.gz") == 1
    figures.update(resolves_that_missed=len(handles), ls_exit=listed.returncode, verify_exit=verified.returncode,
                   listed_damaged=sum(states[cache_key(u)] == "damaged" for u in handles.values()),
                   other_entry="committed, ok, kept", rm_exit=removed.returncode, planted_objects_left=0)


# -- 4. maintenance of a bucket others write --------------------------------------------------------


def test_maintenance_names_planted_objects_fetches_nothing_and_escapes_names(origin, model, monkeypatch,
                                                                              tmp_path, figures):
    """``verify --full`` names an object the entry's manifest does not list; ``verify --repair``
    without handles removes planted damaged manifests, one naming a URL on a loopback origin
    (standing in for an intranet address) and one whose handle carries an OSC title sequence, a
    bell, CR/LF and a bidi override, and fetches nothing; ``ls``, ``verify --full`` and
    ``verify --repair`` (real processes) print those characters escaped."""
    root = fresh_root()
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    url = origin.add("/bucket/m.tar.gz", archive_of(model))
    hubcache.resolve(url)
    key = cache_key(url)
    gcs().pipe_file(f"{bucket_path(root)}/{key}/variables/planted.bin", b"x" * 100)
    secret = origin.add("/intranet/secret.tar.gz", archive_of(build_model_dir(tmp_path / "s", weights_bytes=1000)))
    ssrf_key = "f" * 40
    plant_bucket_manifest(ssrf_key, damaged_manifest(secret).to_json())
    plant_bucket_manifest(PLANTED, damaged_manifest(EVIL).to_json())
    origin.reset_counts()

    runs = {"ls": run_hubcache("ls"), "verify --full": run_hubcache("verify", "--full"),
            "verify --repair": run_hubcache("verify", "--repair")}
    for proc in runs.values():
        assert_clean(proc)
    assert origin.count() == 0, "verify --repair fetched a handle read from the bucket"
    assert "variables/planted.bin is not in the manifest" in runs["verify --full"].stdout
    assert runs["verify --full"].returncode == 1
    escaped = "\\x1b]0;pwned\\x07\\r\\nok   FORGED LINE"
    assert all(escaped in runs[name].stdout for name in runs), {n: p.stdout for n, p in runs.items()}
    assert not any(line.startswith("ok   FORGED") for p in runs.values() for line in p.stdout.splitlines())
    assert runs["verify --repair"].returncode == 0, runs["verify --repair"].stdout
    assert not gcs().exists(bucket_manifest(ssrf_key)) and not gcs().exists(bucket_manifest(PLANTED))
    assert gcs().exists(bucket_manifest(key)), "the good entry is kept"
    figures.update(run="gcs backend; an object planted in an entry, two planted damaged manifests (an origin URL, "
                       "a handle with ESC/BEL/CR/LF/U+202E); `hubcache ls`, `verify --full`, `verify --repair`",
                   unlisted_object_reported=True, origin_requests_by_repair=origin.count(),
                   planted_manifests_removed=2, raw_control_characters_printed=0,
                   escaped_in=", ".join(runs))


# -- 5. a lease claiming an endless TTL ---------------------------------------------------------------


def plant_lease(key: str, heartbeat_age: float) -> bytes:
    """A lease object claiming ``"ttl": 1e9``, its heartbeat ``heartbeat_age`` seconds old."""
    raw = json.dumps({"owner": "planted", "lease": "x", "beat": 1, "time": time.time() - heartbeat_age,
                      "ttl": 1e9}).encode()
    gcs().pipe_file(f"{bucket_path(os.environ['TFHUB_CACHE_DIR'])}/{key}.lock", raw)
    return raw


def test_a_lease_claiming_an_endless_ttl_is_judged_by_ten_minutes(origin, model, monkeypatch, figures):
    """A planted lease claiming ``"ttl": 1e9`` on a handle's key: a waiter judges it by
    max(its own TTL, 10 min), so one whose heartbeat is 12 minutes old (10 min + 1 min of
    allowed clock skew + 1 min) is a leftover, taken over
    at once by a host resolving with ``TFHUB_CACHE_DIR=gs://...`` (the origin serves). A fresh one
    would hold that host at most 10 minutes (the bound is checked, not waited out)."""
    monkeypatch.setenv("TFHUB_CACHE_DIR", fresh_root())
    url = origin.add("/leased.tar.gz", archive_of(model))
    raw = plant_lease(cache_key(url), heartbeat_age=MAX_LEASE_TTL + CLOCK_SKEW + 60)  # 12 min
    began = time.perf_counter()
    path = hubcache.resolve(url)
    seconds = time.perf_counter() - began
    assert read_tree(path, gcs()) == tree_of(model) and origin.count() == 1
    assert seconds < 10, f"held {seconds:.1f} s by a planted lease"
    judged = {own: LeaseState.parse(raw).judged_ttl(own) for own in (1.0, 30.0, 1200.0)}
    assert judged == {1.0: MAX_LEASE_TTL, 30.0: MAX_LEASE_TTL, 1200.0: 1200.0}, judged
    figures.update(run="gcs backend; a planted lease {ttl: 1e9, heartbeat 720 s old} on the handle's key; resolve",
                   claimed_ttl_s=1e9, judged_ttl_s=f"{MAX_LEASE_TTL:g} (own 1 s or 30 s), 1200 (own 1200 s)",
                   resolve_s=round(seconds, 2), origin_requests=origin.count())


def test_a_live_planted_lease_does_not_hold_a_home_gcs_host(origin, model, monkeypatch, tmp_path, events, figures):
    """The same lease with a fresh heartbeat, on a ``home,gcs`` host that misses everywhere. Such a
    host waits for a bucket lease's holder (hosts that miss together download once), but only
    while its heartbeat goes on: the planted lease never beats, so after a few missed heartbeats
    (``PEER_PATIENCE_BEATS`` of a holder configured as this host, 7 s with the default TTL) the
    download goes into the home tier, and the copy up into the bucket is skipped (a
    ``copy_skipped`` event), not minutes of waiting for the lease's claimed TTL."""
    from hubcache.core.tiers import MAX_POLL_SLACK
    from hubcache.stores.objectstore import PEER_PATIENCE_BEATS, heartbeat_interval

    patience = PEER_PATIENCE_BEATS * heartbeat_interval(30.0) + MAX_POLL_SLACK
    url, _ = _fleet_second_host(origin, model, monkeypatch, tmp_path)
    key = cache_key(url)
    tiers()[1].store.remove(key)  # the bucket holds only the planted lease now
    plant_lease(key, heartbeat_age=0)
    resolver.clear_memo()
    began = time.perf_counter()
    path = hubcache.resolve(url)
    seconds = time.perf_counter() - began
    assert path == tiers()[0].store.entry_path(key) and tree_of(path) == tree_of(model)
    skipped = [e for e in events if e.kind == "copy_skipped"]
    assert skipped and "planted" in skipped[-1].data["reason"], [e.kind for e in events]
    assert patience <= seconds < patience + 5 and origin.count() == 2
    figures.update(run="home,gcs host 2; a planted lease {ttl: 1e9, heartbeat now} on the handle's key; resolve",
                   resolve_s=round(seconds, 2), origin_requests=origin.count() - 1,
                   copy_up="skipped (" + skipped[-1].data["reason"] + ")")


def test_a_holder_seen_beating_is_waited_for_through_a_late_heartbeat(origin, model, monkeypatch, tmp_path,
                                                                     events):
    """A ``home,gcs`` host waiting for a bucket lease whose heartbeat it has seen go on keeps
    waiting when one beat comes late (a slow bucket, a busy holder: in the fleet benchmark a
    holder's rewrite took 8.5 s while it uploaded 1 GiB to the emulator, and four hosts gave up
    on it and downloaded the model themselves). Here the lease beats twice, then is silent for
    longer than the patience (7 s), then is released: the host waits it out and takes the
    lease, so the bucket gets the entry and no copy up is skipped. Patience still ends a wait
    for a lease never seen to beat (the test above)."""
    import threading

    from hubcache.core.tiers import MAX_POLL_SLACK
    from hubcache.stores.objectstore import PEER_PATIENCE_BEATS, heartbeat_interval

    patience = PEER_PATIENCE_BEATS * heartbeat_interval(30.0) + MAX_POLL_SLACK
    url, _ = _fleet_second_host(origin, model, monkeypatch, tmp_path)
    key = cache_key(url)
    tiers()[1].store.remove(key)
    lease = f"{bucket_path(os.environ['TFHUB_CACHE_DIR'])}/{key}.lock"
    silence = patience + 4

    def holder():  # beats at 0, 1 and 2 s, then nothing until it releases
        for beat in (1, 2, 3):
            gcs().pipe_file(lease, json.dumps({"owner": "host-1", "lease": "y", "beat": beat, "time": time.time(),
                                               "ttl": 30.0}).encode())
            time.sleep(1.0)
        time.sleep(silence)
        gcs().rm_file(lease)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    time.sleep(0.3)  # the first beat is there
    resolver.clear_memo()
    began = time.perf_counter()
    path = hubcache.resolve(url)
    seconds = time.perf_counter() - began
    thread.join()
    assert tree_of(path) == tree_of(model)
    assert not [e for e in events if e.kind == "copy_skipped"], "gave up on a live holder"
    assert seconds >= 2 + silence - 1, f"stopped waiting after {seconds:.1f} s"
    assert tiers()[1].store.lookup(key, url) is not None, "the bucket got the entry"


# -- 6. a forged entry claiming a pinned digest ------------------------------------------------------


def forge_entry(key: str, handle: str, source: str, sha256: str) -> None:
    """Replace the bucket entry of ``key`` with ``source``'s files and a manifest of them that
    claims ``sha256``: a consistent entry (sizes, CRC-32s) of other bytes."""
    entry = f"{bucket_path(os.environ['TFHUB_CACHE_DIR'])}/{key}"
    for rel, data in tree_of(source).items():
        gcs().pipe_file(f"{entry}/{rel}", data)
    plant_bucket_manifest(key, manifest_of(source, handle, sha256).to_json())


def test_a_forged_entry_claiming_a_pinned_digest(origin, model, evil, monkeypatch, tmp_path, figures):
    """A bucket writer replaces an entry with other bytes and a manifest claiming the real
    archive's sha256. A ``home,gcs`` host resolving the pinned handle does not trust it: a digest
    read from a bucket counts as unverified, so the archive is downloaded from the origin and
    checked against the pin, and the origin's bytes are served. Limits, measured here too: the same host resolving the
    handle *unpinned* gets the forged bytes (copied down, marked unverified); and with a single
    ``gcs`` backend the pin is compared with the digest in the bucket's manifest, which the
    writer forged: the forged entry is served. There the bucket's ACL is the trust boundary."""
    url, digest = _fleet_second_host(origin, model, monkeypatch, tmp_path)
    key = cache_key(url)
    forge_entry(key, url, evil, digest)
    pinned = f"{url}#sha256={digest}"

    path = hubcache.resolve(pinned)
    home = tiers()[0]
    assert tree_of(path) == tree_of(model) and origin.count() == 2, "the pinned handle was verified at the origin"
    assert home.store.read_manifest(key).archive.get("verified", True) is not False

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host3-cache"))
    resolver.clear_memo()
    unpinned = hubcache.resolve(url)
    assert tree_of(unpinned) == tree_of(evil) and origin.count() == 2, "unpinned: the bucket's entry is copied"
    assert tiers()[0].store.read_manifest(key).archive["verified"] is False

    monkeypatch.setenv("HUBCACHE_BACKEND", "gcs")
    resolver.clear_memo()
    single = hubcache.resolve(pinned)
    assert read_tree(single, gcs()) == tree_of(evil) and origin.count() == 2, "single gcs: the forged digest is taken"
    figures.update(run="bucket entry replaced by other bytes whose manifest claims the real sha256; "
                       "resolve url#sha256=<real> on home,gcs, then unpinned on home,gcs, then pinned on gcs alone",
                   home_gcs_pinned="origin's bytes, verified (1 origin request)",
                   home_gcs_unpinned="forged bytes, marked unverified (0 requests)",
                   gcs_alone_pinned="forged bytes served (0 requests): the bucket's ACL is the boundary")
