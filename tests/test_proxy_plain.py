"""The proxy's plaintext listener (local model servers), driven on loopback without a
divert handle: a client connects to the listener, whose lookup names a real server.
An AI exchange gives the HTTPS path's events, network.connect first; other HTTP and
a TLS connection leave none; a server that speaks first is not kept waiting."""

from __future__ import annotations

import asyncio
import json

from oisp.proxy.server import Destination, TransparentProxy
from tests.fixed_flows import FixedFlows

CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()
REPLY = json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": "hello"}, "done": True,
                    "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 1}).encode()


def http(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:11434\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def start(server_behaviour):
    """A server on loopback running `server_behaviour(reader, writer)`, and a proxy whose
    plaintext listener sends every connection there, as if to port 11434."""
    server = await asyncio.start_server(server_behaviour, "127.0.0.1", 0)
    server_port = server.sockets[0].getsockname()[1]
    events: list[dict] = []
    lookups: list[tuple] = []

    def lookup(addr, port):
        lookups.append((addr, port))
        return Destination(client=(addr, port), server=("127.0.0.1", server_port), pid=None)

    from oisp.spec import default_spec

    spec = default_spec().with_port_providers({server_port: "ollama"})
    proxy = TransparentProxy(flows=FixedFlows(lookup), issuer=None, spec=spec, on_events=events.extend)
    port = await proxy.start(0, "127.0.0.1", plain=True)
    return server, proxy, port, events, lookups


async def reply_once(reader, writer, body: bytes = REPLY) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    await reader.read()  # until the client closes
    writer.close()


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()
    return body


async def settle(proxy) -> None:
    for _ in range(100):
        if not proxy._tasks:
            return
        await asyncio.sleep(0.02)


def test_an_ai_exchange_is_recorded_with_its_connect_first():
    async def main():
        server, proxy, port, events, lookups = await start(reply_once)
        assert await exchange(port, http("POST", "/api/chat", CHAT)) == REPLY
        await settle(proxy)
        await proxy.stop()
        server.close()
        return events, proxy.stats

    events, stats = asyncio.run(main())
    assert [e["event_type"] for e in events] == ["network.connect", "ai.request", "ai.response", "network.flow"]
    assert events[1]["data"]["provider"]["id"] == "ollama"
    assert events[1]["data"]["model"]["id"] == "llama3.2"
    assert events[2]["data"]["choices"][0]["message"]["content"] == "hello"
    assert "plaintext_capture" in events[2]["confidence"]["reasons"]
    assert events[0]["ts"] <= events[1]["ts"]  # the connect is stamped when the connection began
    assert stats["plain"] == stats["plain_ai"] == 1


def test_other_http_and_tls_leave_no_event():
    async def tls_echo(reader, writer):
        data = await reader.read(100)
        writer.write(data)  # whatever came, back: relayed untouched both ways
        await writer.drain()
        writer.close()

    async def main():
        server, proxy, port, events, _ = await start(reply_once)
        body = await exchange(port, http("GET", "/api/version"))
        await settle(proxy)
        server.close()
        other, proxy2, port2, events2, _ = await start(tls_echo)
        hello = b"\x16\x03\x01\x00\x05hello"
        reader, writer = await asyncio.open_connection("127.0.0.1", port2)
        writer.write(hello)
        echoed = await reader.read(100)
        writer.close()
        await settle(proxy2)
        other.close()
        return body, events, echoed, events2, proxy2.stats

    body, events, echoed, events2, stats = asyncio.run(main())
    assert body == REPLY
    assert events == []
    assert echoed == b"\x16\x03\x01\x00\x05hello"
    assert events2 == []
    assert stats["plain_tls"] == 1


def test_a_server_that_speaks_first_is_not_kept_waiting():
    async def greeter(reader, writer):
        writer.write(b"220 hello\r\n")  # before the client says anything
        await writer.drain()
        await reader.read()
        writer.close()

    async def main():
        server, proxy, port, events, _ = await start(greeter)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await asyncio.wait_for(reader.readline(), 2.0)
        writer.close()
        await settle(proxy)
        server.close()
        return greeting, events

    greeting, events = asyncio.run(main())
    assert greeting == b"220 hello\r\n"
    assert events == []


def test_a_long_upload_without_a_reply_is_not_held_unbounded(monkeypatch):
    import oisp.proxy.server as server_module

    monkeypatch.setattr(server_module, "PLAIN_PENDING_MAX", 64 * 1024)
    big = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "x" * 300_000}],
                      "stream": False}).encode()

    async def slow_reader(reader, writer):
        await reader.readexactly(200_000)  # the request is still arriving: no reply yet
        await asyncio.sleep(0.3)
        await reply_once(reader, writer)

    async def main():
        server, proxy, port, events, lookups = await start(slow_reader)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(http("POST", "/api/chat", big))
        await writer.drain()
        await asyncio.sleep(0.2)
        named_before_reply = len(lookups)  # the accept's lookup, then the naming's
        writer.close()
        await settle(proxy)
        server.close()
        return named_before_reply

    assert asyncio.run(main()) == 2

