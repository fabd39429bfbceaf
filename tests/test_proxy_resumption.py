"""The proxy resumes its TLS sessions with an upstream server: the second and later
connections skip the full handshake. The upstream server's own view is the reference."""

from __future__ import annotations

import asyncio
import ssl

from oisp.proxy.ca import CertificateAuthority
from oisp.proxy.certs import LeafIssuer
from oisp.proxy.server import Target, TransparentProxy
from tests.fakeprovider import make_test_pki

REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def test_upstream_sessions_are_resumed(tmp_path):
    upstream_ca, cert, key = make_test_pki(tmp_path)
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    reused = []

    async def upstream_server(reader, writer):
        reused.append(writer.get_extra_info("ssl_object").session_reused)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(REPLY)
        await writer.drain()
        writer.close()

    async def main():
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(cert, key)
        upstream = await asyncio.start_server(upstream_server, "127.0.0.1", 0, ssl=server_context)
        upstream_port = upstream.sockets[0].getsockname()[1]
        proxy = TransparentProxy(
            lookup=lambda addr, port: Target(client=(addr, port), server=("127.0.0.1", upstream_port)),
            issuer=LeafIssuer(ca), upstream_cafile=upstream_ca)
        proxy_port = await proxy.start(0, host="127.0.0.1")
        client_context = ssl.create_default_context(cafile=str(ca.cert_path))
        answers = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_context,
                                                           server_hostname="api.openai.com")
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-length: 2\r\n\r\n{}")
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        await proxy.stop()
        await proxy.drain(2.0)
        upstream.close()
        return answers, proxy.stats

    answers, stats = asyncio.run(main())
    assert answers == [REPLY] * 3
    assert reused == [False, True, True]  # as the upstream server saw it
    assert stats["upstream_resumed"] == 2 and stats["intercepted"] == 3
