"""Proxies and certificates, as tensorflow_hub (urllib) honours them, through ``hubcache.resolve``
against real servers on 127.0.0.1: a forwarding and CONNECT proxy the test starts
(``loopback_net.LoopbackProxy``, which counts what it carried), the kit's origin server, and the
same origin speaking TLS with a certificate from a CA made in the test (``cryptography``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

import hubcache
from hubcache import ConfigError, DownloadError
from hubcache.core import resolver
from hubcache.download import network
from hubcache.download.fetch import open_source
from hubcache.download.pointer import follow_pointer
from hubcache.testing import OriginServer, archive_of, tree_of
from loopback_net import LoopbackProxy, TlsOriginServer, free_port, make_pki

USER, PASSWORD = "proxy-user", "pr0xy-s3cret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """A second CA, which did not sign the origin's certificate."""
    return make_pki(str(tmp_path_factory.mktemp("other-pki")), ca_name="another CA")


@pytest.fixture
def tls_origin(pki):
    with TlsOriginServer(pki) as server:
        yield server


@pytest.fixture
def proxy():
    with LoopbackProxy() as server:
        yield server


@pytest.fixture
def archive(model):
    return archive_of(model)


@pytest.fixture
def fast(monkeypatch):
    """One retry, no long waits: failures show up in a fraction of a second."""
    monkeypatch.setenv("HUBCACHE_RETRIES", "1")


def fresh_cache():
    """Forget memoised resolves and the cached entries, so the next resolve downloads again."""
    resolver.clear_memo()
    import tempfile

    shutil.rmtree(os.path.join(tempfile.gettempdir(), "tfhub_modules"), ignore_errors=True)


# -- proxies: which requests go through them -----------------------------------------------------


def test_an_http_handle_goes_through_http_proxy(origin, proxy, archive, model, monkeypatch):
    url = origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    assert tree_of(hubcache.resolve(url)) == tree_of(model)
    assert [(c.method, c.target, c.status) for c in proxy.carried] == [("GET", url, 200)]
    assert origin.count("/m.tar.gz") == 1


def test_an_https_handle_is_tunnelled_with_connect(tls_origin, pki, proxy, archive, model, monkeypatch):
    url = tls_origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    assert tree_of(hubcache.resolve(url)) == tree_of(model)
    assert [(c.method, c.target) for c in proxy.carried] == [("CONNECT", f"127.0.0.1:{tls_origin.port}")]
    assert tls_origin.count("/m.tar.gz") == 1


def test_a_tfhub_handle_over_https_through_the_proxy(tls_origin, pki, proxy, archive, model, monkeypatch):
    """The compressed protocol's redirect chain (handle, then archive) through one proxy."""
    handle = tls_origin.add_tfhub_model("/google/spice/2", archive)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca)
    monkeypatch.setenv("https_proxy", proxy.url())
    assert tree_of(hubcache.resolve(handle)) == tree_of(model)
    assert proxy.count("CONNECT") >= 1 and proxy.count("GET") == 0
    assert tls_origin.count("/storage/google/spice/2.tar.gz") == 1


def test_an_https_proxy_is_reached_over_tls_for_http_handles(origin, pki, archive, model, monkeypatch):
    """As urllib: TLS to the proxy itself (checked against the same trust store), then the http
    request sent whole."""
    url = origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    with LoopbackProxy(tls=pki) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        assert tree_of(hubcache.resolve(url)) == tree_of(model)
        assert [(c.method, c.target) for c in proxy.carried] == [("GET", url)]
        assert proxy._server.handshakes == 1


def test_each_scheme_has_its_own_variable(origin, proxy, archive, monkeypatch):
    url = origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())  # for https URLs only
    hubcache.resolve(url)
    assert proxy.count() == 0 and origin.count("/m.tar.gz") == 1


def test_lower_case_beats_upper_case(origin, proxy, archive, monkeypatch):
    url = origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("http_proxy", proxy.url())
    hubcache.resolve(url)
    assert proxy.count("GET") == 1


def test_a_proxy_without_a_scheme(origin, proxy, archive, monkeypatch):
    url = origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")
    hubcache.resolve(url)
    assert proxy.count("GET") == 1


def no_proxy_cases(port):
    """(NO_PROXY, bypassed?) for the host 127.0.0.1:<port>."""
    return [("127.0.0.1", True), (f"127.0.0.1:{port}", True), (f"127.0.0.1:{port + 1}", False),
            ("*", True), ("example.com, 127.0.0.1", True), (".0.0.1", True),  # urllib's suffix rule
            ("27.0.0.1", False), ("localhost", False)]


def test_no_proxy_bypasses_hosts_as_urllib_does(origin, proxy, archive, monkeypatch):
    origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    port = int(origin.url("/").split(":")[2].split("/")[0])
    for i, (no_proxy, bypassed) in enumerate(no_proxy_cases(port)):
        monkeypatch.setenv("NO_PROXY", no_proxy)
        before = proxy.count()
        fresh_cache()
        hubcache.resolve(origin.url("/m.tar.gz"))
        assert (proxy.count() == before) == bypassed, no_proxy
        assert _urllib_proxies(origin.url("/m.tar.gz")) == (not bypassed), f"urllib disagrees on {no_proxy!r}"


def _urllib_proxies(url):
    """Whether urllib itself (what tensorflow_hub uses) would send ``url`` through a proxy."""
    request = urllib.request.Request(url)
    handler = urllib.request.ProxyHandler()
    proxy = handler.proxies.get(request.type)
    if not proxy:
        return False
    handler.proxy_open(request, proxy, request.type)
    # an http URL is sent whole to the proxy; an https one is tunnelled (its host is the proxy's)
    return request.has_proxy() or request._tunnel_host is not None


@pytest.mark.parametrize("url", [
    "http://models.corp.example/m.tar.gz", "https://models.corp.example/m.tar.gz",
    "https://corp.example/m.tar.gz", "https://corp.example:8443/m.tar.gz", "https://notcorp.example/m",
    "https://Models.CORP.example./m", "http://internal:8080/m", "http://internal:9090/m",
    "http://10.1.2.3/m", "http://[::1]:8080/m",
    "https://example.org/m", "http://localhost/m",
])
@pytest.mark.parametrize("no_proxy", ["corp.example,internal:8080", ".corp.example , localhost",
                                      "*", "", "10.0.0.0/8,::1", "example.org:443"])
def test_every_decision_is_urllibs(url, no_proxy, monkeypatch):
    """Domain suffixes, ports, case, spaces, CIDR (which urllib does not read): hubcache decides
    exactly as urllib's ProxyHandler for the same environment, host by host."""
    monkeypatch.setenv("http_proxy", "http://proxy.corp.example:3128")
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp.example:3129")
    monkeypatch.setenv("no_proxy", no_proxy)
    assert (network.current().proxy_for(url) is not None) == _urllib_proxies(url)


def test_the_host_is_matched_without_the_credentials_of_the_handle(monkeypatch):
    """urllib would match ``user:pw@host`` against NO_PROXY (it does not send such URLs at all);
    hubcache sends the credentials as a header and matches the host alone."""
    monkeypatch.setenv("https_proxy", "http://proxy.corp.example:3128")
    monkeypatch.setenv("no_proxy", "models.corp.example")
    assert network.current().proxy_for("https://user:pw@models.corp.example/m") is None
    assert network.current().proxy_for("https://user:pw@other.example/m") is not None


def test_http_proxy_is_ignored_in_a_cgi_script_as_urllib_does(origin, proxy, archive, monkeypatch):
    """CVE-2016-1000110: a web server sets HTTP_PROXY from a client's ``Proxy:`` header."""
    url = origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    monkeypatch.setenv("REQUEST_METHOD", "GET")
    hubcache.resolve(url)
    assert proxy.count() == 0 and not _urllib_proxies(url)


@pytest.mark.parametrize("value", ["http://proxy:3128", "http://proxy", "https://proxy:3128/", "proxy:3128",
                                   "user:pw@proxy:3128", "http://us%40er:p%3Aw@proxy:3128/path",
                                   "http://user@proxy:3128", "socks5://user:pw@proxy:1080", "http://[::1]:3128",
                                   "http://a@b@proxy:1"])
def test_proxy_urls_are_parsed_as_urllib_parses_them(value):
    parse = getattr(urllib.request, "_parse_proxy", None)
    if parse is None:
        pytest.skip("this Python's urllib has no _parse_proxy to compare with")
    assert network._parse_proxy(value) == parse(value)


def test_a_redirect_to_another_host_decides_again(origin, proxy, archive, model, monkeypatch):
    """127.0.0.1 goes through the proxy, its redirect to localhost (in NO_PROXY) does not; and
    the other way round."""
    origin.add("/storage/m.tar.gz", archive)
    port = origin.url("/").split(":")[2].split("/")[0]
    origin.redirect("/m.tar.gz", f"http://localhost:{port}/storage/m.tar.gz")
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    monkeypatch.setenv("NO_PROXY", "localhost")
    assert tree_of(hubcache.resolve(origin.url("/m.tar.gz"))) == tree_of(model)
    assert [c.target for c in proxy.carried] == [origin.url("/m.tar.gz")]
    assert origin.count("/storage/m.tar.gz") == 1

    origin.redirect("/back.tar.gz", origin.url("/storage/m.tar.gz"))
    fresh_cache()
    hubcache.resolve(f"http://localhost:{port}/back.tar.gz")
    assert [c.target for c in proxy.carried][1:] == [origin.url("/storage/m.tar.gz")]


def test_the_uncompressed_pointer_goes_through_the_proxy(origin, proxy, archive, monkeypatch):
    handle = origin.add_tfhub_model("/google/spice/2", archive, uncompressed="gs://bucket/spice/2")
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    assert follow_pointer(handle + "?tf-hub-format=uncompressed") == "gs://bucket/spice/2"
    assert proxy.count("GET") == 1


def test_the_uncompressed_pointer_checks_certificates_the_same_way(tls_origin, pki, archive, monkeypatch):
    handle = tls_origin.add_tfhub_model("/google/spice/2", archive, uncompressed="gs://bucket/spice/2")
    with pytest.raises(DownloadError, match="certificate") as info:
        follow_pointer(handle + "?tf-hub-format=uncompressed")
    assert "SSL_CERT_FILE" in str(info.value) and info.value.attempts == 1
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca)
    assert follow_pointer(handle + "?tf-hub-format=uncompressed") == "gs://bucket/spice/2"


# -- proxies: credentials and failures -----------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_proxy_credentials_are_sent_to_the_proxy_only(scheme, origin, tls_origin, pki, archive, model,
                                                       monkeypatch, caplog, events):
    caplog.set_level(logging.DEBUG)  # urllib3's own request lines too
    server = origin if scheme == "http" else tls_origin
    url = server.add("/m.tar.gz", archive)
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    with LoopbackProxy(auth=("us@er", "p:ss")) as proxy:
        monkeypatch.setenv(f"{scheme}_proxy", proxy.url("us%40er", "p%3Ass"))
        assert tree_of(hubcache.resolve(url)) == tree_of(model)
        assert [c.status for c in proxy.carried] == [200]
    assert all("Proxy-Authorization" not in r.headers for r in server.requests)
    assert "p:ss" not in caplog.text and "p%3Ass" not in caplog.text
    assert not [e for e in events if "p%3Ass" in repr(e.data)]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_wants_credentials_names_itself_and_the_fix(scheme, origin, tls_origin, archive,
                                                                  monkeypatch, fast):
    server = origin if scheme == "http" else tls_origin
    url = server.add("/m.tar.gz", archive)
    with LoopbackProxy(auth=(USER, PASSWORD)) as proxy:
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", proxy.url(USER, "wrong-" + PASSWORD))
        with pytest.raises(DownloadError) as info:
            hubcache.resolve(url)
        message = str(info.value)
        assert "407" in message and f"via the proxy http://***@127.0.0.1:{proxy.port}" in message, message
        assert message.startswith(repr(url)) and "\n" not in message
        assert PASSWORD not in message and USER not in message
        assert proxy.count() == 1, "a refusal of the credentials is not retried"
        if scheme == "https":
            assert "user:password@host:port" in message, "the hint says how to give them"


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("mode", ["502", "refuse", "absent"])
def test_a_failing_proxy_is_named_in_the_error(scheme, mode, origin, tls_origin, pki, archive, monkeypatch,
                                               fast):
    server = origin if scheme == "http" else tls_origin
    url = server.add("/m.tar.gz", archive)
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    with LoopbackProxy(mode=mode if mode != "absent" else "forward") as proxy:
        port = proxy.port if mode != "absent" else free_port()
        monkeypatch.setenv(f"{scheme}_proxy", f"http://{USER}:{PASSWORD}@127.0.0.1:{port}")
        with pytest.raises(DownloadError) as info:
            hubcache.resolve(url)
    message = str(info.value)
    assert f"via the proxy http://***@127.0.0.1:{port}" in message, message
    assert message.startswith(repr(url)) and "2 attempts" in message and "\n" not in message
    assert PASSWORD not in message and USER not in message
    for attribute in (info.value.url, info.value.handle, info.value.message, info.value.hint or ""):
        assert PASSWORD not in attribute
    if mode == "502":
        assert "502" in message
    assert server.count() == 0


def test_a_proxy_variable_that_is_no_proxy_url_is_a_config_error(origin, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080")
    with pytest.raises(ConfigError, match="HTTP_PROXY names a socks5:// proxy") as info:
        hubcache.resolve(origin.url("/m.tar.gz"))
    assert PASSWORD not in str(info.value)


# -- proxies: retries, resume and the deadline are unchanged -----------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_cut_download_resumes_through_the_proxy(scheme, origin, tls_origin, pki, proxy, model, monkeypatch):
    server = origin if scheme == "http" else tls_origin
    body = archive_of(model)
    url = server.add("/m.tar.gz", body)
    server.fail("/m.tar.gz", ("cut", len(body) // 3))
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    monkeypatch.setenv(f"{scheme}_proxy", proxy.url())
    assert tree_of(hubcache.resolve(url)) == tree_of(model)
    ranges = [r.headers.get("Range") for r in server.requests]
    assert ranges == [None, f"bytes={len(body) // 3}-"]
    assert server.requests[1].headers.get("If-Range")
    assert proxy.count() == 2


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_deadline_cuts_a_stalled_download_through_the_proxy(scheme, origin, tls_origin, pki, proxy,
                                                                 archive, monkeypatch):
    server = origin if scheme == "http" else tls_origin
    url = server.add("/m.tar.gz", archive)
    server.fail("/m.tar.gz", ("stall", 1000, 30))
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    monkeypatch.setenv(f"{scheme}_proxy", proxy.url())
    monkeypatch.setenv("HUBCACHE_DOWNLOAD_DEADLINE", "1")
    started = time.monotonic()
    with pytest.raises(DownloadError, match="HUBCACHE_DOWNLOAD_DEADLINE"):
        hubcache.resolve(url)
    assert time.monotonic() - started < 10


def test_pools_are_kept_per_proxy_and_follow_the_environment(origin, proxy, archive, monkeypatch):
    """One manager per proxy while the variables stay; a change in-process takes effect at once."""
    origin.add("/a.tar.gz", archive)
    origin.add("/b.tar.gz", archive)
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    first = network.current()
    assert network.current() is first
    manager = first.manager(origin.url("/a.tar.gz"), _plain)
    assert first.manager(origin.url("/b.tar.gz"), _plain) is manager
    hubcache.resolve(origin.url("/a.tar.gz"))
    assert proxy.count() == 1
    monkeypatch.delenv("HTTP_PROXY")
    assert network.current() is not first
    hubcache.resolve(origin.url("/b.tar.gz"))
    assert proxy.count() == 1 and origin.count("/b.tar.gz") == 1


def _plain(cls, **kwargs):
    return cls(**kwargs)


# -- certificates -----------------------------------------------------------------------------------


def test_an_unknown_ca_fails_at_once_naming_the_handle_and_the_fix(tls_origin, archive):
    url = tls_origin.add("/m.tar.gz", archive)
    with pytest.raises(DownloadError) as info:
        hubcache.resolve(url)
    message = str(info.value)
    assert message.startswith(repr(url)) and "certificate" in message and "\n" not in message
    assert "SSL_CERT_FILE" in message and "REQUESTS_CA_BUNDLE" in message
    assert info.value.attempts == 1 and tls_origin.handshakes == 1, "no retry mends a certificate"
    assert tls_origin.count() == 0


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_each_ca_variable_makes_the_origin_trusted(variable, tls_origin, pki, archive, model, monkeypatch):
    url = tls_origin.add("/m.tar.gz", archive)
    monkeypatch.setenv(variable, pki.ca)
    assert tree_of(hubcache.resolve(url)) == tree_of(model)


def _hashed_dir(pki, tmp_path):
    """A directory of CA certificates named by subject hash, as OpenSSL's -CApath wants."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command (to name a certificate by its subject hash) is not installed")
    subject_hash = subprocess.run([openssl, "x509", "-hash", "-noout", "-in", pki.ca], capture_output=True,
                                  text=True, check=True).stdout.strip()
    directory = tmp_path / "certs"
    directory.mkdir()
    shutil.copy(pki.ca, directory / f"{subject_hash}.0")
    return str(directory)


@pytest.mark.parametrize("variable", ["SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"])
def test_a_directory_of_cas_makes_the_origin_trusted(variable, tls_origin, pki, archive, model, monkeypatch,
                                                     tmp_path):
    url = tls_origin.add("/m.tar.gz", archive)
    monkeypatch.setenv(variable, _hashed_dir(pki, tmp_path))
    assert tree_of(hubcache.resolve(url)) == tree_of(model)


def test_requests_ca_bundle_beats_curl_ca_bundle(tls_origin, pki, other_pki, archive, monkeypatch):
    url = tls_origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", other_pki.ca)
    monkeypatch.setenv("CURL_CA_BUNDLE", pki.ca)
    with pytest.raises(DownloadError, match="certificate"):
        hubcache.resolve(url)


def test_a_ca_bundle_adds_to_the_store_ssl_cert_file_selects(tls_origin, pki, other_pki, archive, model,
                                                              monkeypatch):
    """Both count: hubcache trusts whatever tensorflow_hub trusts (SSL_CERT_FILE), and more."""
    url = tls_origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("SSL_CERT_FILE", other_pki.ca)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca)
    assert tree_of(hubcache.resolve(url)) == tree_of(model)
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", other_pki.ca)
    fresh_cache()
    assert tree_of(hubcache.resolve(url)) == tree_of(model)


def test_the_host_name_is_still_checked(pki, archive, monkeypatch):
    """The certificate names 127.0.0.1 and localhost; reached as another name, it is refused."""
    with TlsOriginServer(pki, host="models.example.invalid") as server, LoopbackProxy(
            hosts={"models.example.invalid": "127.0.0.1"}) as proxy:
        url = server.add("/m.tar.gz", archive)
        monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        with pytest.raises(DownloadError, match="certificate") as info:
            hubcache.resolve(url)
        assert "models.example.invalid" in str(info.value) and proxy.count("CONNECT") == 1


def test_a_missing_ca_bundle_is_a_config_error_for_https_only(tls_origin, origin, archive, model, monkeypatch,
                                                              tmp_path):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "nowhere.pem"))
    with pytest.raises(ConfigError, match="REQUESTS_CA_BUNDLE=") as info:
        hubcache.resolve(tls_origin.add("/m.tar.gz", archive))
    assert "nowhere.pem" in str(info.value) and info.value.hint
    assert tree_of(hubcache.resolve(origin.add("/m.tar.gz", archive))) == tree_of(model)


def test_disabling_validation_trusts_any_certificate_and_warns_once_per_process(tls_origin, archive, tmp_path):
    """A fresh interpreter, as a user's job: two https downloads, one warning."""
    urls = [tls_origin.add("/a.tar.gz", archive), tls_origin.add("/b.tar.gz", archive)]
    script = textwrap.dedent(f"""
        import hubcache, os
        for url in {urls!r}:
            assert os.path.isdir(hubcache.resolve(url))
        print("resolved")
    """)
    env = {k: v for k, v in os.environ.items() if k not in network.VARIABLES}
    env["TFHUB_DISABLE_CERT_VALIDATION"] = "true"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "resolved", out.stderr
    warnings = [line for line in out.stderr.splitlines() if "TFHUB_DISABLE_CERT_VALIDATION" in line]
    assert len(warnings) == 1, out.stderr
    assert tls_origin.count("/a.tar.gz") == tls_origin.count("/b.tar.gz") == 1


@pytest.mark.parametrize("value", ["True", "1", "yes", " true"])
def test_only_true_disables_validation_as_for_tensorflow_hub(value, tls_origin, archive, monkeypatch):
    monkeypatch.setenv("TFHUB_DISABLE_CERT_VALIDATION", value)
    with pytest.raises(DownloadError, match="certificate"):
        hubcache.resolve(tls_origin.add("/m.tar.gz", archive))


def test_tensorflow_hub_reads_the_variable_as_hubcache_does():
    """The accepted value comes from tensorflow_hub's own source (read, not imported: importing it
    imports TensorFlow), not from memory."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_hub")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorflow_hub is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "resolver.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    constants = {node.targets[0].id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                 and isinstance(node.value, ast.Constant)}
    assert constants["_TFHUB_DISABLE_CERT_VALIDATION"] == network.ENV_DISABLE_CERT_VALIDATION
    assert constants["_TFHUB_DISABLE_CERT_VALIDATION_VALUE"] == network.DISABLE_CERT_VALIDATION_VALUE


def test_a_certificate_refused_through_the_proxy(tls_origin, proxy, archive, monkeypatch):
    url = tls_origin.add("/m.tar.gz", archive)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    with pytest.raises(DownloadError, match="certificate") as info:
        hubcache.resolve(url)
    assert f"via the proxy http://127.0.0.1:{proxy.port}" in str(info.value)
    assert info.value.attempts == 1


# -- what `hubcache config` shows -------------------------------------------------------------------


def test_config_shows_the_proxies_without_credentials_and_the_certificates(monkeypatch, pki, capsys):
    from hubcache.cli import main

    monkeypatch.setenv("HTTPS_PROXY", f"http://{USER}:{PASSWORD}@proxy.corp.example:3128")
    monkeypatch.setenv("no_proxy", "localhost,.corp.example")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca)
    monkeypatch.setenv("TFHUB_DISABLE_CERT_VALIDATION", "1")
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert PASSWORD not in text and USER not in text
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "http://***@proxy.corp.example:3128" in lines["https_proxy"] and "(HTTPS_PROXY)" in lines["https_proxy"]
    assert "localhost,.corp.example" in lines["no_proxy"] and "(no_proxy)" in lines["no_proxy"]
    assert pki.ca in lines["ca_bundle"] and "(REQUESTS_CA_BUNDLE)" in lines["ca_bundle"]
    assert "only 'true' turns it off" in lines["cert_validation"]
    assert main(["config", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["network"]["https_proxy"]["value"] == "http://***@proxy.corp.example:3128"
    assert data["network"]["http_proxy"]["value"] is None
    assert PASSWORD not in json.dumps(data)


def test_isolate_clears_the_network_variables(tmp_path):
    """The suite's own servers are on 127.0.0.1: a developer's proxy must not carry them."""
    for name in network.VARIABLES:
        assert name not in os.environ, name


def test_a_request_pays_almost_nothing_for_the_decision(origin, monkeypatch):
    """Picking the pool for a request reads a dozen variables, never rebuilds while they stay."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "localhost,.corp.example")
    url = origin.url("/m.tar.gz")
    from hubcache.download.fetch import _pool_manager

    manager = _pool_manager(url)
    started = time.perf_counter()
    for _ in range(2000):
        assert _pool_manager(url) is manager
    per_call = (time.perf_counter() - started) / 2000
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} µs per request"


def test_open_source_reports_the_proxy_in_its_errors(proxy, monkeypatch):
    proxy.mode = "502"
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    with pytest.raises(DownloadError) as info:
        open_source("http://127.0.0.1:9/m.tar.gz", retries=0)
    assert str(info.value).endswith(f"via the proxy http://127.0.0.1:{proxy.port})")
