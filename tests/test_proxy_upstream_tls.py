"""The proxy's TLS towards upstream. It resumes sessions: a new connection to a server
it has just talked to skips the full handshake (the reference is the upstream's own
view, OpenSSL's session_reused on the server side). And it verifies the upstream even
when the client's handshake runs alongside (a client offering HTTP/1.1 alone): an
unverified upstream never sees a byte of the request. The client is curl, one
connection per request, over loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import threading

import pytest

from oisp.proxy.ca import CertificateAuthority
from oisp.proxy.certs import LeafIssuer
from oisp.proxy.server import Destination, TransparentProxy
from tests.fakeprovider import make_test_pki
from tests.fixed_flows import FixedFlows

BODY = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "resumed?"},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


class Upstream:
    """A TLS server answering one HTTP/1.1 request per connection; records for each
    connection whether its session was resumed."""

    def __init__(self, cert: str, key: str, tickets: bool = True):
        self.requests = 0
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        if not tickets:  # a server that never lets a session be resumed
            self.context.options |= ssl.OP_NO_TICKET
            self.context.num_tickets = 0
        self.resumed: list[bool] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += tls.recv(4096)
                    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                       if line.lower().startswith(b"content-length:")), b"0"))
                    body = head.split(b"\r\n\r\n", 1)[1]
                    while len(body) < length:
                        body += tls.recv(4096)
                    self.requests += 1
                    self.resumed.append(tls.session_reused)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(BODY) + BODY)
                    tls.unwrap()
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def pki(tmp_path):
    return make_test_pki(tmp_path)


def run_proxy(tmp_path, upstream_ca: str, upstream_port: int, body):
    """Run a TransparentProxy (every connection goes to the upstream) while `body(port)`
    runs in this thread; returns (body's result, the proxy's stats)."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    proxy = TransparentProxy(flows=FixedFlows(lambda addr, port: Destination(client=(addr, port),
                                                                             server=("127.0.0.1", upstream_port))),
                             issuer=LeafIssuer(ca), upstream_cafile=upstream_ca)

    async def main():
        port = await proxy.start(0, host="127.0.0.1")
        result = await asyncio.get_running_loop().run_in_executor(None, body, port, str(ca.cert_path))
        await proxy.stop()
        return result

    return asyncio.run(main()), proxy.stats


def curl(port: int, cafile: str, host: str = "api.openai.com", check: bool = True):
    done = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", cafile, "--resolve", f"{host}:{port}:127.0.0.1",
                           f"https://{host}:{port}/v1/chat/completions", "-H", "content-type: application/json",
                           "-d", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'],
                          capture_output=True, text=True, timeout=30)
    if not check:
        return done
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_later_connections_resume_the_upstream_session(tmp_path, pki):
    upstream_ca, cert, key = pki
    upstream = Upstream(cert, key)
    try:
        answers, stats = run_proxy(tmp_path, upstream_ca, upstream.port,
                                   lambda port, cafile: [curl(port, cafile) for _ in range(3)]
                                   + [curl(port, cafile, "api.anthropic.com")])
    finally:
        upstream.close()
    assert [a["choices"][0]["message"]["content"] for a in answers] == ["resumed?"] * 4
    # The first connection to each name is a full handshake; the next ones to it resume.
    assert upstream.resumed == [False, True, True, False]
    assert stats["upstream_resumed"] == 2
    assert stats["intercepted"] == 4


def test_a_server_that_refuses_resumption_gets_full_handshakes(tmp_path, pki):
    upstream_ca, cert, key = pki
    upstream = Upstream(cert, key, tickets=False)
    try:
        answers, stats = run_proxy(tmp_path, upstream_ca, upstream.port,
                                   lambda port, cafile: [curl(port, cafile) for _ in range(3)])
    finally:
        upstream.close()
    assert [a["choices"][0]["message"]["content"] for a in answers] == ["resumed?"] * 3
    assert upstream.resumed == [False, False, False]
    assert stats["upstream_resumed"] == 0
    assert stats["intercepted"] == 3


def test_an_upstream_that_fails_verification_never_sees_the_request(tmp_path, pki):
    _, cert, key = pki
    (tmp_path / "other").mkdir()
    other_ca, _, _ = make_test_pki(tmp_path / "other")  # the proxy trusts this CA, not the upstream's
    upstream = Upstream(cert, key)
    try:
        done, stats = run_proxy(tmp_path, other_ca, upstream.port,
                                lambda port, cafile: curl(port, cafile, check=False))
    finally:
        upstream.close()
    # the client gets no answer ...
    assert done.returncode != 0
    assert not done.stdout
    assert upstream.requests == 0  # ... and the upstream no request
    assert stats["intercepted"] == 0
    assert stats["upstream_errors"] == 1
