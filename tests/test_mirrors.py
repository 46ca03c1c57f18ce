"""Handles on the real model hosts: the China mirror and Kaggle Models (tfhub.dev redirects there).

The hosts cannot be reached from a test, so ``routed_hosts`` sends each one's requests to a path
prefix on one local origin server, which answers as that host does (the redirect chains of the
compressed protocol), while hubcache sees the real URLs: handles, cache keys, ``Location``
headers. Everything is resolved through the default ``tmp`` backend.
"""

from __future__ import annotations

import json
import os
from urllib.parse import parse_qs

import pytest

import hubcache
from hubcache.core import entry
from hubcache.core.handles import cache_key, parse_handle
from hubcache.core.locate import Location, locate
from hubcache.testing import archive_of, routed_hosts, tree_of

TFHUB = "https://tfhub.dev/"
KAGGLE = "https://www.kaggle.com/"
STORAGE = "https://storage.googleapis.com/"
CN_HUB = "https://hub.tensorflow.google.cn/"
CN_GCS = "https://gcs.tensorflow.google.cn/"
#: A signed storage URL's query, as Kaggle's redirects carry (never to be stored or shown).
SIGNED = "X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Expires=259200&X-Goog-Signature=5ec7e7"


@pytest.fixture
def hosts(origin):
    """Each real host, routed to ``/<host>/`` on the origin."""
    routes = {base: origin.url("/" + base.split("://", 1)[1]) for base in (TFHUB, KAGGLE, STORAGE, CN_HUB, CN_GCS)}
    with routed_hosts(routes):
        yield origin


def _path(url: str) -> str:
    """The origin path a real URL is served at (``/<host>/<path>``), query left out."""
    return "/" + url.split("://", 1)[1].split("?", 1)[0]


def _entry(handle: str) -> str:
    return os.path.join(os.environ["TMPDIR"], "tfhub_modules", cache_key(handle))


def _manifest(handle: str) -> dict:
    """hubcache's manifest of the handle's entry (at the end of its descriptor)."""
    with open(_entry(handle) + ".descriptor.txt", "rb") as f:
        found = entry.descriptor_manifest(f.read())
    assert found is not None, "no manifest: hubcache did not commit this entry"
    return json.loads(found)


# -- the China mirror ----------------------------------------------------------------------------


def test_china_mirror_handle_locates_the_mirror_bucket_archive():
    handle = parse_handle("https://hub.tensorflow.google.cn/google/imagenet/mobilenet_v2_100_224/classification/5")
    assert locate(handle, "COMPRESSED") == Location(
        "https://gcs.tensorflow.google.cn/tfhub-modules/google/imagenet/mobilenet_v2_100_224/classification/5.tar.gz",
        "archive")
    # tensorflow_hub's uncompressed resolver has no mirror rule: the handle's own pointer is asked.
    assert locate(handle, "UNCOMPRESSED") == Location(
        "https://hub.tensorflow.google.cn/google/imagenet/mobilenet_v2_100_224/classification/5"
        "?tf-hub-format=uncompressed", "pointer")
    # Only that host, as tensorflow_hub matches it (scheme included).
    assert locate(parse_handle("http://hub.tensorflow.google.cn/google/spice/2"), "COMPRESSED").url == \
        "http://hub.tensorflow.google.cn/google/spice/2?tf-hub-format=compressed"


def test_china_mirror_handle_downloads_once_from_the_bucket(hosts, model):
    handle = CN_HUB + "google/spice/2"
    bucket_url = CN_GCS + "tfhub-modules/google/spice/2.tar.gz"
    hosts.add(_path(bucket_url), archive_of(model))
    path = hubcache.resolve(handle)
    assert path == _entry(handle)
    assert tree_of(path) == tree_of(model)
    # Straight to the bucket: no ?tf-hub-format round trip to hub.tensorflow.google.cn.
    assert [(r.path, r.query) for r in hosts.requests] == [(_path(bucket_url), "")]
    assert _manifest(handle)["source"] == bucket_url
    assert hubcache.resolve(handle) == path and hosts.count() == 1


# -- Kaggle Models -------------------------------------------------------------------------------


def _kaggle_model(origin, model_page: str, storage_url: str, archive: bytes, *, status: int = 302) -> None:
    """Serve a Kaggle model page: ``?tf-hub-format=compressed`` redirects (``status``) to a signed
    storage URL holding ``archive``; without it, the HTML page."""
    origin.add(_path(storage_url), archive)
    origin.add_tfhub_model(_path(model_page), b"")  # its own archive route is not used
    route = origin.routes[_path(model_page)]
    assert route.tfhub is not None
    route.tfhub["compressed"] = storage_url
    if status != 302:
        # OriginServer's tfhub routes answer 302; other statuses go through a plain redirect route.
        origin.routes[_path(model_page)] = type(route)(status=status, headers={"Location": storage_url})


def test_tfhub_handle_follows_its_redirect_to_kaggle(hosts, model):
    """tfhub.dev answers with a redirect to the Kaggle model page (keeping the compressed query),
    which redirects to a signed storage URL: three hops, one download, nothing of the signature
    kept."""
    handle = TFHUB + "google/spice/2"
    page = KAGGLE + "models/google/spice/frameworks/tensorFlow2/variations/spice/versions/2"
    storage = STORAGE + "kaggle-models-data/1040/1234/bundle/archive.tar.gz?" + SIGNED
    _kaggle_model(hosts, page, storage, archive_of(model))
    hosts.redirect(_path(handle), page + "?tf-hub-format=compressed&tfhub-redirect=true", status=301)

    path = hubcache.resolve(handle)

    assert path == _entry(handle) and tree_of(path) == tree_of(model)
    hops = [(r.path, parse_qs(r.query)) for r in hosts.requests]
    assert hops == [
        (_path(handle), {"tf-hub-format": ["compressed"]}),
        (_path(page), {"tf-hub-format": ["compressed"], "tfhub-redirect": ["true"]}),
        (_path(storage), parse_qs(SIGNED)),
    ]
    manifest = _manifest(handle)
    assert manifest["source"] == storage.split("?", 1)[0], "the signed query must not be stored"
    with open(_entry(handle) + ".descriptor.txt", encoding="utf-8") as f:
        descriptor = f.read()
    for text in (json.dumps(manifest), descriptor):
        assert "X-Goog-Signature" not in text and "5ec7e7" not in text


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_kaggle_handle_as_model_pages_show_it(hosts, model, status):
    """The handle a Kaggle model page shows (the short form, often with ``?tfhub-redirect=true``):
    its query is kept and ``tf-hub-format=compressed`` added; the archive behind the redirect has
    no archive suffix (its format is read from its bytes)."""
    handle = KAGGLE + "models/google/spice/tensorFlow2/spice/2?tfhub-redirect=true"
    storage = STORAGE + f"kaggle-models-data/1040/{status}/bundle/archive?" + SIGNED
    _kaggle_model(hosts, handle.split("?")[0], storage, archive_of(model, "gz"), status=status)

    path = hubcache.resolve(handle)

    assert path == _entry(handle) and tree_of(path) == tree_of(model)
    first, second = hosts.requests
    assert parse_qs(first.query) == {"tfhub-redirect": ["true"], "tf-hub-format": ["compressed"]}
    assert first.query.startswith("tfhub-redirect=true&"), "the handle's own query is kept as written"
    assert (second.path, second.status) == (_path(storage), 200)
    hosts.reset_counts()
    hubcache.core.resolver.clear_memo()  # a new process: the entry on disk is used
    assert hubcache.resolve(handle) == path and hosts.count() == 0


def test_kaggle_redirect_to_a_relative_location(hosts, model):
    """A redirect whose ``Location`` is a path on the same host is followed there."""
    handle = KAGGLE + "models/google/spice/tensorFlow1/spice/1"
    hosts.add(_path(KAGGLE + "models/download/1.tar.gz"), archive_of(model))
    hosts.add_tfhub_model(_path(handle), b"")
    hosts.routes[_path(handle)].tfhub["compressed"] = "/models/download/1.tar.gz"
    assert tree_of(hubcache.resolve(handle)) == tree_of(model)
    assert [r.path for r in hosts.requests] == [_path(handle), _path(KAGGLE + "models/download/1.tar.gz")]


def test_tfhub_handle_of_a_model_kaggle_does_not_have(hosts):
    """A tfhub.dev model that did not move to Kaggle redirects to Kaggle's model list, a web page:
    an error saying so, nothing cached."""
    handle = TFHUB + "google/retired/1"
    listing = KAGGLE + "models?tfhub-redirect=true"
    hosts.redirect(_path(handle), listing, status=302)
    hosts.add(_path(listing), b"<!DOCTYPE html><html>Models | Kaggle</html>", headers={"Content-Type": "text/html"})
    with pytest.raises(hubcache.ArchiveError, match="HTML page, not an archive") as info:
        hubcache.resolve(handle)
    assert handle in str(info.value)
    assert not os.path.exists(_entry(handle))
