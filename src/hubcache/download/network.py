"""Proxies and certificates for hubcache's HTTP client, read from the environment exactly as
tensorflow_hub's client (Python's ``urllib``) reads them, so a set-up that works for one works for
the other.

Proxies: ``http_proxy`` / ``HTTP_PROXY`` for http URLs, ``https_proxy`` / ``HTTPS_PROXY`` for
https URLs, ``no_proxy`` / ``NO_PROXY`` for the hosts reached directly; urllib reads them
(``urllib.request.getproxies``, lower case winning over upper case, ``HTTP_PROXY`` ignored in a CGI
script) and decides each host (``proxy_bypass``: ``*``, a host, a domain suffix, ``host:port``).
Both are asked, not imitated, so hubcache follows whatever the running Python does; on macOS and
Windows that includes the system's proxy settings when no variable names a proxy. As for urllib:
an http URL is sent to its proxy whole (``GET http://host/path``); an https URL goes through a
``CONNECT`` tunnel over plain TCP, whatever scheme the proxy URL has; ``ALL_PROXY`` is not read;
credentials in the proxy URL (``http://user:password@proxy:3128``) are sent as
``Proxy-Authorization`` (basic), only when both the user and the password are there, and are
shown as ``***`` wherever the proxy is named.

Certificates: ``TFHUB_DISABLE_CERT_VALIDATION=true`` (exactly ``true``, as tensorflow_hub compares
it) turns validation off, with one warning per process. Otherwise the trust store is the system's
default, as urllib's: OpenSSL's default file and directory, which ``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` replace; to it hubcache adds the CA bundle (a PEM file, or a hashed directory)
named by ``REQUESTS_CA_BUNDLE``, else by ``CURL_CA_BUNDLE``. Adding, never replacing, means
hubcache trusts every server tensorflow_hub trusts on the same machine. certifi is not used (nor
was it: urllib3, like urllib, loads the system's store).

Decisions are made once per state of these variables (:func:`current`): the connection pools of
each proxy, and the TLS context, are kept until a variable changes, so a test or a program that
changes them in-process gets new ones, and the cost on each request is a dozen dictionary lookups.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import unquote, urlsplit

from ..core.setting import Setting
from ..core.errors import ConfigError
from ..core.redact import HIDDEN

if TYPE_CHECKING:  # urllib3 and ssl are imported where they are used
    import ssl

    import urllib3

logger = logging.getLogger("hubcache")

ENV_DISABLE_CERT_VALIDATION = "TFHUB_DISABLE_CERT_VALIDATION"
#: The only value that disables validation: tensorflow_hub compares ``os.getenv(...) == "true"``.
DISABLE_CERT_VALIDATION_VALUE = "true"
#: OpenSSL's own variables: they replace the default file and directory of the system's store.
OPENSSL_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")
#: A CA bundle added to the store: the first one set wins (the order ``requests`` reads them in).
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
#: The proxy variables urllib reads (lower case first: it wins).
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
#: Every variable of the network set-up (``hubcache.testing.isolate`` clears them for a test).
VARIABLES = PROXY_VARIABLES + (ENV_DISABLE_CERT_VALIDATION,) + OPENSSL_VARIABLES + CA_BUNDLE_VARIABLES
#: What the set-up is keyed on: the variables, and the CGI marker that makes urllib drop HTTP_PROXY.
#: (urllib also accepts mixed-case spellings such as ``Https_Proxy``: read when any of these
#: changes, but a change to one of them alone is not noticed in a running process.)
_KEY_VARIABLES = VARIABLES + ("REQUEST_METHOD",)

CERT_HINT = ("if the server's certificate comes from a private CA (a company proxy, an internal server), "
             "point SSL_CERT_FILE or REQUESTS_CA_BUNDLE at a PEM file of that CA's certificates")


@dataclass(frozen=True)
class Proxy:
    """The proxy a URL goes through.

    Attributes:
        url: what urllib3 connects to: ``http://host:port`` (``https://`` for TLS to the proxy
            itself, which urllib does only for http URLs); no credentials.
        shown: the proxy as it may be shown: ``http://***@host:port`` when it has credentials.
        variable: the environment variable that named it (``system`` for the system's settings).
        headers: ``Proxy-Authorization``, when the proxy URL has a user and a password.
    """

    url: str
    shown: str
    variable: str
    headers: dict[str, str] = field(default_factory=dict)


def _parse_proxy(proxy: str) -> tuple[str | None, str | None, str | None, str]:
    """``(scheme, user, password, host:port)`` of a proxy URL or a bare ``[user:pass@]host:port``:
    urllib's ``_parse_proxy`` (private, so written out here; a test compares the two)."""
    scheme: str | None
    match = re.match(r"([^/:]+):(.*)", proxy, re.DOTALL)
    scheme, rest = (match.group(1).lower(), match.group(2)) if match else (None, proxy)
    if not rest.startswith("/"):
        scheme, authority = None, proxy  # an authority: "proxy:3128", "user:pw@proxy:3128"
    else:
        if not rest.startswith("//"):
            raise ValueError(f"proxy URL with no authority: {proxy!r}")
        if "@" in rest:
            end = rest.find("/", rest.find("@"))
        else:
            end = rest.find("/", 2)
        authority = rest[2:] if end == -1 else rest[2:end]
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        return scheme, None, None, authority
    user, colon, password = userinfo.partition(":")
    return scheme, user, password if colon else None, hostport


def _has_port(hostport: str) -> bool:
    # urllib's _splitport: a port is the digits after the last colon (none for "[::1]").
    return re.fullmatch(r"(.*):([0-9]*)", hostport, re.DOTALL) is not None


class Network:
    """The proxy and TLS decisions for one state of the environment, and the connection pools
    made by them (one pool manager per target scheme and proxy)."""

    def __init__(self, environ: dict[str, str | None]) -> None:
        import urllib.request

        self._environ = environ
        from_env = urllib.request.getproxies_environment()
        # getproxies(): the variables, else (macOS, Windows) the system's settings, as urllib.
        self.proxies: dict[str, str] = from_env or urllib.request.getproxies()
        self._from_env = bool(from_env)
        self.verify = environ.get(ENV_DISABLE_CERT_VALIDATION) != DISABLE_CERT_VALIDATION_VALUE
        self.ca_bundle = next(((name, value) for name in CA_BUNDLE_VARIABLES if (value := environ.get(name))),
                              None)
        self._managers: dict[tuple[str, str], urllib3.PoolManager] = {}
        self._context: ssl.SSLContext | None = None
        #: id of a proxied manager -> its proxy as shown (see proxy_of)
        self._shown: dict[int, str] = {}
        self._lock = threading.Lock()
        self._context_lock = threading.Lock()

    # -- proxies ------------------------------------------------------------------------------

    def _variable(self, scheme: str) -> str:
        if not self._from_env:
            return "system"
        for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
            if self._environ.get(name):
                return name
        return f"{scheme}_proxy"

    def _bypass(self, host: str) -> bool:
        import urllib.request

        if self._from_env or sys.platform not in ("darwin", "win32"):
            # on every platform; the stubs declare it only where it is also proxy_bypass
            by_environment: Callable[[str, dict[str, str]], object] = getattr(
                urllib.request, "proxy_bypass_environment")
            return bool(by_environment(host, self.proxies))
        return bool(urllib.request.proxy_bypass(host))  # the system's exceptions

    def proxy_for(self, url: str) -> Proxy | None:
        """The proxy ``url`` goes through, or ``None`` for a direct connection.

        Raises:
            ConfigError: the proxy variable for ``url``'s scheme is not a proxy urllib could use.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        value = self.proxies.get(scheme)
        if not value:
            return None
        host = unquote(parts.netloc.rpartition("@")[2])
        if host and self._bypass(host):
            return None
        variable = self._variable(scheme)
        try:
            kind, user, password, hostport = _parse_proxy(value)
        except ValueError:
            raise ConfigError(f"{variable} is not a proxy URL (it has no host)",
                              hint="write it as http://host:port") from None
        kind = kind or scheme
        hostport = unquote(hostport)
        if scheme == "https":
            # urllib tunnels an https URL with CONNECT over plain TCP whatever the proxy URL's
            # scheme, and (through http.client's HTTPSConnection) to port 443 when none is given.
            connect = f"http://{hostport}" if _has_port(hostport) else f"http://{hostport}:443"
        elif kind in ("http", "https"):
            connect = f"{kind}://{hostport}"  # urllib3's default ports are urllib's: 80, 443
        else:
            raise ConfigError(f"{variable} names a {kind}:// proxy; http URLs go through http:// or https:// "
                              "proxies only (as for tensorflow_hub)", hint="give the proxy's http:// address")
        headers = {}
        if user and password:  # as urllib: both, percent-decoded
            import base64

            token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
            headers["Proxy-Authorization"] = f"Basic {token}"
        credentials = f"{HIDDEN}@" if user is not None else ""
        return Proxy(connect, f"{kind}://{credentials}{hostport}", variable, headers)

    # -- pools --------------------------------------------------------------------------------

    def manager(self, url: str, new: Callable[..., urllib3.PoolManager]) -> urllib3.PoolManager:
        """The pool manager for ``url``: made once (by ``new(cls, **kwargs)``) per target scheme
        and proxy, then shared.

        Raises:
            ConfigError: a proxy variable or a CA bundle cannot be used.
        """
        scheme = urlsplit(url).scheme.lower()
        proxy = self.proxy_for(url)
        key = (scheme, proxy.url if proxy is not None else "")
        manager = self._managers.get(key)
        if manager is None:
            with self._lock:
                manager = self._managers.get(key)
                if manager is None:
                    cls, kwargs = self._manager_args(scheme, proxy)
                    manager = new(cls, **kwargs)
                    if proxy is not None:
                        self._shown[id(manager)] = proxy.shown
                    self._managers[key] = manager
        return manager

    def _manager_args(self, scheme: str, proxy: Proxy | None) -> tuple[type[urllib3.PoolManager], dict[str, Any]]:
        import urllib3

        kwargs: dict[str, Any] = {}
        # TLS to the origin (https URLs) or to the proxy itself (an https:// proxy for http URLs).
        if scheme == "https" or (proxy is not None and proxy.url.startswith("https://")):
            kwargs["ssl_context"] = self.ssl_context()
            # urllib3 sets the context's verify_mode from cert_reqs on every connection.
            kwargs["cert_reqs"] = "CERT_REQUIRED" if self.verify else "CERT_NONE"
        if proxy is None:
            return urllib3.PoolManager, kwargs
        kwargs.update(proxy_url=proxy.url, proxy_headers=dict(proxy.headers))
        return urllib3.ProxyManager, kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of every https connection in this state (built once: loading the
        system's store takes milliseconds).

        Raises:
            ConfigError: the CA bundle variable names nothing readable as CA certificates.
        """
        context = self._context
        if context is None:
            with self._context_lock:
                if self._context is None:
                    self._context = self._build_context()
                context = self._context
        return context

    def _build_context(self) -> ssl.SSLContext:
        import ssl

        from urllib3.util.ssl_ import create_urllib3_context

        if not self.verify:
            context = create_urllib3_context(cert_reqs=ssl.CERT_NONE)
            _warn_unverified()
            return context
        context = create_urllib3_context()
        context.load_default_certs()  # as urllib: honours SSL_CERT_FILE and SSL_CERT_DIR
        if self.ca_bundle is not None:
            name, path = self.ca_bundle
            try:
                if os.path.isdir(path):
                    context.load_verify_locations(capath=path)
                else:
                    context.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as error:
                reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
                raise ConfigError(f"{name}={path} cannot be read as CA certificates: {reason}",
                                  hint=f"point {name} at a PEM file of CA certificates, or unset it") from None
        return context

    # -- what `hubcache config` shows ---------------------------------------------------------

    def settings(self) -> list[Setting]:
        """The effective proxies and certificate settings, with where each came from (proxy
        credentials shown as ``***``)."""
        rows = []
        for scheme in ("http", "https"):
            name = f"{scheme}_proxy"
            value = self.proxies.get(scheme)
            if not value:
                rows.append(Setting(name, None, "default", "", f"proxy for {scheme} URLs"))
                continue
            try:
                kind, user, _, hostport = _parse_proxy(value)
                shown = f"{kind or scheme}://{HIDDEN + '@' if user is not None else ''}{hostport}"
            except ValueError:
                shown = f"{value.rpartition('@')[2]} (not a proxy URL)"
            variable = self._variable(scheme)
            source = ("system", "") if variable == "system" else ("env", variable)
            rows.append(Setting(name, shown, *source, f"proxy for {scheme} URLs"))
        no_proxy = self.proxies.get("no")
        origin = next((n for n in ("no_proxy", "NO_PROXY") if self._environ.get(n)), "")
        rows.append(Setting("no_proxy", no_proxy, "env" if origin else ("system" if no_proxy else "default"),
                            origin, "hosts reached directly: * (all), host, domain suffix, host:port"))
        disable = self._environ.get(ENV_DISABLE_CERT_VALIDATION)
        if disable is None:
            rows.append(Setting("cert_validation", "on", "default", "", "check servers' certificates"))
        elif self.verify:
            rows.append(Setting("cert_validation", f"on (only 'true' turns it off, not {disable!r})", "env",
                                ENV_DISABLE_CERT_VALIDATION, "check servers' certificates"))
        else:
            rows.append(Setting("cert_validation", "off", "env", ENV_DISABLE_CERT_VALIDATION,
                                "check servers' certificates"))
        import ssl

        paths = ssl.get_default_verify_paths()
        for name, value, variable in (("ca_file", paths.cafile, "SSL_CERT_FILE"),
                                      ("ca_dir", paths.capath, "SSL_CERT_DIR")):
            given = self._environ.get(variable)
            if given and value is None:
                value = f"{given} (missing: ignored, as by OpenSSL)"
            rows.append(Setting(name, value, "env" if given else "default", variable if given else "",
                                "the system's trust store"))
        if self.ca_bundle is not None:
            rows.append(Setting("ca_bundle", self.ca_bundle[1], "env", self.ca_bundle[0],
                                "CA certificates added to the trust store"))
        else:
            rows.append(Setting("ca_bundle", None, "default", "", "CA certificates added to the trust store"))
        return rows


_current: tuple[tuple[str | None, ...], Network] | None = None
_current_lock = threading.Lock()
_warned = False
_warn_lock = threading.Lock()
# The environment's own keys (bytes on POSIX) and its underlying dict: one C-level lookup each.
_encode = getattr(os.environ, "encodekey", None)
_keys = tuple(map(_encode, _KEY_VARIABLES)) if _encode is not None else _KEY_VARIABLES


def _key() -> tuple[Any, ...]:
    data = getattr(os.environ, "_data", None)
    return tuple(map(data.get, _keys)) if data is not None else tuple(map(os.environ.get, _KEY_VARIABLES))


def current() -> Network:
    """The :class:`Network` of the environment as it is now (the same object while none of its
    variables changes)."""
    global _current
    key = _key()
    held = _current
    if held is not None and held[0] == key:
        return held[1]
    with _current_lock:
        held = _current
        if held is None or held[0] != key:
            environ = {name: os.environ.get(name) for name in _KEY_VARIABLES}
            held = _current = (key, Network(environ))
        return held[1]


def _warn_unverified() -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    logger.warning("certificate validation is off for every https download (%s=%s): anyone on the "
                   "network path can serve other bytes; unset it once the servers' CA is trusted "
                   "(SSL_CERT_FILE or REQUESTS_CA_BUNDLE)", ENV_DISABLE_CERT_VALIDATION,
                   DISABLE_CERT_VALIDATION_VALUE)


def proxy_of(manager: object) -> str:
    """The proxy a pool manager from :meth:`Network.manager` goes through, as it may be shown
    (``http://***@host:port``), or ``""`` for a direct one."""
    proxy = getattr(manager, "proxy", None)
    if proxy is None:
        return ""
    held = _current
    shown = held[1]._shown.get(id(manager)) if held is not None else None
    return shown or str(proxy)  # a manager's own proxy URL never holds the credentials


def unrecoverable(error: BaseException) -> tuple[str, str] | None:
    """``(message, hint)`` for a connection failure that retrying cannot mend: a server whose
    certificate does not verify, a proxy that wants credentials. ``None`` for any other."""
    import ssl

    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or "it does not verify"
            return f"the server's certificate was refused: {reason}", CERT_HINT
        if isinstance(cause, OSError) and "Tunnel connection failed: 407" in str(cause):
            return ("the proxy refused the tunnel: 407 Proxy Authentication Required",
                    "put the proxy's user and password in its URL, before the host: user:password@host:port")
    return None


def connection_problem(error: BaseException) -> str:
    """A short reason for a failed connection, the proxy's part told apart (urllib3 nests the
    useful text in tuples of exceptions)."""
    import http.client

    import urllib3

    if isinstance(error, urllib3.exceptions.ProxyError):
        inner = error.original_error
        tunnel = re.search(r"Tunnel connection failed: (.*)", str(inner))
        if tunnel:
            return f"the proxy refused the tunnel: {tunnel.group(1)}"
        if isinstance(inner, urllib3.exceptions.NewConnectionError):
            return f"no connection to the proxy: {str(inner).rpartition('connection: ')[2]}"
        if isinstance(inner, http.client.RemoteDisconnected):
            return "the proxy closed the connection without an answer"
        return f"the proxy failed: {inner}"
    return str(getattr(error, "reason", None) or error)


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps (urllib3 nests the ssl error in its own, in args)."""
    found: list[BaseException] = []
    todo = [error]
    while todo and len(found) < 16:
        cause = todo.pop()
        if cause in found:
            continue
        found.append(cause)
        todo.extend(a for a in cause.args if isinstance(a, BaseException))
        todo.extend(c for c in (cause.__cause__, cause.__context__, getattr(cause, "original_error", None))
                    if isinstance(c, BaseException))
    return found
