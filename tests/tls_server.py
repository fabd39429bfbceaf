"""A real TLS server on 127.0.0.1 for the certificate tests, and the PEM form of a certificate."""

from __future__ import annotations

import socket
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization

HOST = "api.openai.com"  # the name the tests' leaf certificates are for


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class TLSServer:
    """Accepts connections on 127.0.0.1 with one server context; answers HTTP/1.1 with "ok"."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # closing a socket does not wake accept(): poll a stop flag instead
        self.stopping = threading.Event()
        self.port = self.listener.getsockname()[1]
        self.results: list[str] = []  # the negotiated ALPN, or the server-side handshake error
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TLSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            with raw:
                raw.settimeout(5)
                try:
                    conn = self.context.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.results.append(f"error: {exc}")
                    continue
                alpn = conn.selected_alpn_protocol()
                self.results.append(str(alpn))
                with conn:
                    try:
                        if alpn in (None, "http/1.1"):
                            self._answer(conn)
                    except OSError:  # the client may hang up without a request
                        pass

    @staticmethod
    def _answer(conn: ssl.SSLSocket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
