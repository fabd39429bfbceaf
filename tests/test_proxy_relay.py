"""The relay between two sockets: bytes exact, back-pressure bounds its memory, an end
of stream is passed on while the other direction keeps flowing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

from oisp.proxy.relay import Relay


async def relayed_pair(**options):
    """(client end, upstream end, relay): two real loopback TCP connections joined by a Relay."""
    pairs = []
    for _ in range(2):
        listener = socket.create_server(("127.0.0.1", 0))
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
        listener.close()
        for s in (outer, inner):
            s.setblocking(False)
        pairs.append((outer, inner))
    relay = Relay(**options)
    await relay.attach("client", pairs[0][1])
    await relay.attach("upstream", pairs[1][1])
    relay.start()
    return pairs[0][0], pairs[1][0], relay


async def read_all(loop, sock, limit=None) -> bytes:
    chunks = []
    while data := await loop.sock_recv(sock, 1 << 16):
        chunks.append(data)
        if limit is not None and sum(map(len, chunks)) >= limit:
            break
    return b"".join(chunks)


def test_bytes_exact_both_ways_and_back_pressure_bounds_memory():
    async def main():
        loop = asyncio.get_running_loop()
        seen = {"client": 0, "upstream": 0}
        client, upstream, relay = await relayed_pair(
            on_data=lambda side, data: seen.__setitem__(side, seen[side] + len(data)))
        payload = os.urandom(32 << 20)
        sender = loop.create_task(loop.sock_sendall(upstream, payload))
        await asyncio.sleep(1.0)  # nobody reads the client end yet
        buffered = relay.sides[0].transport.get_write_buffer_size()
        in_flight = seen["upstream"]
        assert not sender.done()  # the sender is held back ...
        # ... and the relay holds little of it
        assert buffered < 4 << 20
        assert in_flight < 12 << 20
        got = await read_all(loop, client, len(payload))
        await sender
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        await loop.sock_sendall(client, b"request")
        assert await loop.sock_recv(upstream, 100) == b"request"
        for s in (client, upstream):
            s.close()
        await asyncio.wait_for(relay.done, 5)
        assert seen == {"client": 7, "upstream": len(payload)}

    asyncio.run(main())


def test_an_end_of_stream_is_passed_on_and_the_other_direction_goes_on():
    async def main():
        loop = asyncio.get_running_loop()
        client, upstream, relay = await relayed_pair(half_close_grace=10.0)
        await loop.sock_sendall(client, b"last words")
        client.shutdown(socket.SHUT_WR)
        assert await read_all(loop, upstream) == b"last words"  # then EOF
        await loop.sock_sendall(upstream, b"the answer")
        upstream.shutdown(socket.SHUT_WR)
        assert await read_all(loop, client) == b"the answer"
        await asyncio.wait_for(relay.done, 5)  # both ends ended: closed without the grace
        for s in (client, upstream):
            s.close()

    asyncio.run(main())


def test_a_half_closed_connection_is_cut_after_the_grace():
    async def main():
        loop = asyncio.get_running_loop()
        client, upstream, relay = await relayed_pair(half_close_grace=0.3)
        client.shutdown(socket.SHUT_WR)
        assert await read_all(loop, upstream) == b""
        await asyncio.wait_for(relay.done, 5)
        assert await read_all(loop, client) == b""
        for s in (client, upstream):
            s.close()

    asyncio.run(main())
