"""Real network pieces on 127.0.0.1 for the proxy and certificate tests: a forwarding and CONNECT
proxy that counts what it carried, a certificate authority made on the spot (with the
``cryptography`` package), and the test kit's origin server speaking TLS."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import os
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from hubcache.testing import OriginServer
from hubcache.testkit import _make_handler

#: Headers a proxy consumes and never forwards.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade"}


@dataclass
class Carried:
    """One request the proxy received: ``CONNECT host:port`` or ``GET http://host/path``."""

    method: str
    target: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class LoopbackProxy:
    """An HTTP proxy on 127.0.0.1 (free port): forwards ``GET http://…`` and tunnels ``CONNECT``.

    Attributes:
        auth: ``(user, password)`` it demands in ``Proxy-Authorization`` (407 otherwise).
        hosts: its own name table (``name -> address``): names this machine cannot resolve reach
            the loopback origins through the proxy only.
        mode: ``"forward"``; ``"502"`` answers every request with 502 Bad Gateway; ``"refuse"``
            closes each connection without a word.
        tls: a certificate to speak TLS with (an ``https://`` proxy); ``None``: plain TCP.
    """

    auth: tuple[str, str] | None = None
    hosts: dict[str, str] = field(default_factory=dict)
    mode: str = "forward"
    tls: Pki | None = None
    carried: list[Carried] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._sockets: set[socket.socket] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """``http://[user:password@]127.0.0.1:port`` (credentials as given: percent-encode them);
        ``https://`` for a proxy speaking TLS."""
        credentials = f"{user}:{password}@" if user is not None else ""
        return f"{'https' if self.tls else 'http'}://{credentials}127.0.0.1:{self.port}"

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for c in self.carried if method is None or c.method == method)

    def start(self) -> LoopbackProxy:
        self._server = _server_class(self.tls.server_context() if self.tls else None)(
            ("127.0.0.1", 0), _proxy_handler(self))
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="loopback-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def __enter__(self) -> LoopbackProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _address(self, host: str, port: int) -> tuple[str, int]:
        return self.hosts.get(host.lower(), host), port


def _server_class(context: ssl.SSLContext | None) -> type[ThreadingHTTPServer]:
    """A threaded server, speaking TLS with ``context`` if given (the handshake happens in each
    request's thread, at its first read; a client that refuses the certificate is not news)."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        handshakes = 0

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, address = self.socket.accept()
            if context is None:
                return sock, address
            self.handshakes += 1
            return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    return Server


def _proxy_handler(proxy: LoopbackProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _admit(self) -> Carried | None:
            """Record the request; answer it here (and return None) unless it is to be carried."""
            record = Carried(self.command, self.path, dict(self.headers))
            with proxy._lock:
                proxy.carried.append(record)
            self.close_connection = True  # one request per connection keeps the counts exact
            if proxy.mode == "refuse":
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if proxy.mode == "502":
                self._answer(record, 502, "Bad Gateway")
                return None
            if proxy.auth is not None:
                token = base64.b64encode(":".join(proxy.auth).encode()).decode()
                if self.headers.get("Proxy-Authorization") != f"Basic {token}":
                    self._answer(record, 407, "Proxy Authentication Required",
                                 {"Proxy-Authenticate": 'Basic realm="loopback"'})
                    return None
            return record

        def _answer(self, record: Carried, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
            record.status = status
            body = f"{status} {reason} from the loopback proxy\n".encode()
            self.send_response(status, reason)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_CONNECT(self) -> None:
            record = self._admit()
            if record is None:
                return
            host, _, port = self.path.rpartition(":")
            try:
                upstream = socket.create_connection(proxy._address(host.strip("[]"), int(port)), timeout=10)
            except OSError:
                return self._answer(record, 502, "Bad Gateway")
            record.status = 200
            self.send_response(200, "Connection established")
            self.end_headers()
            self.wfile.flush()
            with proxy._lock:
                proxy._sockets.update((upstream, self.connection))
            _pump(self.connection, upstream)

        def do_GET(self) -> None:
            record = self._admit()
            if record is None:
                return
            parts = urlsplit(self.path)
            if parts.scheme != "http" or not parts.hostname:
                return self._answer(record, 400, "Bad Request")
            address = proxy._address(parts.hostname, parts.port or 80)
            upstream = http.client.HTTPConnection(*address, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Connection"] = "close"
            try:
                upstream.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
                response = upstream.getresponse()
            except OSError:
                return self._answer(record, 502, "Bad Gateway")
            record.status = response.status
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                while chunk := response.read1(1 << 16):  # as it arrives: a stall stays a stall
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except (OSError, http.client.HTTPException):
                pass  # the origin cut the body: so does the proxy (close_connection)
            finally:
                upstream.close()

    return Handler


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes, then close both."""
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], 30)
            if not ready:
                return
            for sock in ready:
                data = sock.recv(1 << 16)
                if not data:
                    return
                (b if sock is a else a).sendall(data)
    except OSError:
        return
    finally:
        for sock in (a, b):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        b.close()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- certificates ---------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and a server certificate it signed, as PEM files."""

    ca: str  # the CA certificate
    cert: str  # the server's certificate
    key: str  # the server's key

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_pki(directory: str, *, names: tuple[str, ...] = ("localhost",),
             addresses: tuple[str, ...] = ("127.0.0.1",), ca_name: str = "hubcache test CA") -> Pki:
    """Make a CA and a server certificate for ``names`` and ``addresses`` under ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (names or addresses)[0])]))
            .issuer_name(ca_subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki = Pki(os.path.join(directory, "ca.pem"), os.path.join(directory, "server.pem"),
              os.path.join(directory, "server.key"))
    with open(pki.ca, "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(pki.cert, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(pki.key, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return pki


class TlsOriginServer(OriginServer):
    """The test kit's origin server, speaking TLS with ``pki``'s certificate; its URLs name
    ``host`` (which must resolve to 127.0.0.1, or be served through a proxy's name table)."""

    def __init__(self, pki: Pki, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.context = pki.server_context()
        self.host = host

    @property
    def handshakes(self) -> int:
        """TLS connections accepted (each begins with a handshake)."""
        return int(getattr(self._server, "handshakes", 0))

    @property
    def port(self) -> int:
        assert self._server is not None, "start the server first"
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        assert self._server is not None, "start the server first"
        return f"https://{self.host}:{self._server.server_address[1]}{path}"

    def start(self) -> TlsOriginServer:
        self._server = _server_class(self.context)(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="tls-origin", daemon=True)
        self._thread.start()
        return self
