"""The relay between two TLS sockets (the proxy's intercept path), on both of its
record paths: Python (SSLObject.read/write) and native (oisp._native.tls_relay).

The reference is independent of the relay: a real TLS client and a real TLS server
(stdlib ssl sockets in threads) that each record what they wrote and what they read;
the bytes one end wrote must be exactly the bytes the other end read, and exactly what
the relay's observer saw."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import random
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from oisp.proxy import relay as relay_module
from oisp.proxy.relay import Relay
from tests.fakeprovider import HOSTS, make_test_pki

PATHS = ["python", "native"]


def require_native() -> None:
    """The native path must be there, except where Python's `_ssl` carries OpenSSL
    linked in statically (its symbols hidden): there the relay rightly stays in Python."""
    reason = relay_module.NATIVE_UNAVAILABLE
    if reason is None:
        return
    if reason.startswith("OpenSSL symbol not found"):
        pytest.skip(f"this Python's OpenSSL is not reachable by symbol: {reason}")
    pytest.fail(f"the native TLS relay is unavailable: {reason}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("relay-tls-pki"))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    outer = socket.create_connection(listener.getsockname())
    inner, _ = listener.accept()
    listener.close()
    return outer, inner


class End(threading.Thread):
    """One real TLS end (client or server) on a blocking socket: `script(tls)` runs in
    the thread; what it read and wrote is kept for the comparison."""

    def __init__(self, sock, context, script, **wrap):
        super().__init__(daemon=True)
        self.sock, self.context, self.script, self.wrap = sock, context, script, wrap
        self.result, self.error = None, None

    def run(self) -> None:
        try:
            self.sock.settimeout(30)
            with self.context.wrap_socket(self.sock, **self.wrap) as tls:
                self.result = self.script(tls)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def outcome(self):
        self.join(60)
        assert not self.is_alive(), "a TLS end did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def read_until_eof(tls) -> bytes:
    chunks = []
    while data := tls.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def read_exactly(tls, n: int) -> bytes:
    got = []
    while n > 0:
        got.append(tls.recv(min(n, 1 << 16)))
        n -= len(got[-1])
        assert got[-1], "EOF early"
    return b"".join(got)


def write_fragmented(tls, payload: bytes, seed: int) -> None:
    """Writes of random sizes, 1 byte to 40 KiB: records from tiny to full (16 KiB),
    arriving split across and joined within TCP reads."""
    rnd, at = random.Random(seed), 0
    while at < len(payload):
        n = rnd.choice((1, 7, 100, 1500, 16384, 16385, 40000))
        tls.sendall(payload[at:at + n])
        at += n


async def relayed_tls(pki, path: str, client_script, server_script, seen: dict,
                      upstream_max: ssl.TLSVersion | None = None):
    """Client end -> relay (client side, serving the leaf) -> relay (upstream side) -> server end.
    Returns (client end, server end, relay) once both handshakes are done and it started."""
    if path == "native":
        require_native()
    ca, cert, key = pki
    client_outer, client_inner = tcp_pair()
    upstream_inner, upstream_outer = tcp_pair()
    for s in (client_inner, upstream_inner):
        s.setblocking(False)
    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serving.load_cert_chain(cert, key)
    upstream_serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_serving.load_cert_chain(cert, key)
    if upstream_max is not None:
        upstream_serving.maximum_version = upstream_max
    trusting = ssl.create_default_context(cafile=ca)
    server = End(upstream_outer, upstream_serving, server_script, server_side=True, suppress_ragged_eofs=False)
    client = End(client_outer, trusting, client_script, server_hostname=HOSTS[0], suppress_ragged_eofs=False)
    relay = Relay(native_tls=path == "native", stats={},
                  on_data=lambda side, data: seen.setdefault(side, []).append(data))
    up = await relay.attach("upstream", upstream_inner, trusting, server_hostname=HOSTS[0])
    down = await relay.attach("client", client_inner, serving, server_side=True)
    server.start()
    client.start()
    await up.handshake(10)
    await down.handshake(10)
    relay.start()
    return client, server, relay


def expect_path(relay: Relay, path: str) -> None:
    """The path the test meant is the path taken (a native run that fell back proves nothing)."""
    natives = [side.native is not None for side in relay.sides]
    assert natives == [path == "native"] * 2
    assert relay.stats == {"tls_native" if path == "native" else "tls_python": 2}


@pytest.mark.parametrize("path", PATHS)
def test_large_fragmented_streams_arrive_exactly_both_ways_and_close_notify_passes(pki, path):
    down_payload = random.Random(1).randbytes(6 << 20)
    up_payload = random.Random(2).randbytes(1 << 20)

    def client_script(tls):
        write_fragmented(tls, up_payload, seed=3)
        got = read_exactly(tls, len(down_payload))
        tls.unwrap()  # close_notify out; returns once the server's close_notify is read
        return got

    def server_script(tls):
        got = read_exactly(tls, len(up_payload))
        write_fragmented(tls, down_payload, seed=4)
        assert tls.recv(100) == b""  # a ragged EOF would raise: the close_notify must arrive
        tls.unwrap()
        return got

    async def main():
        seen: dict[str, list[bytes]] = {}
        client, server, relay = await relayed_tls(pki, path, client_script, server_script, seen)
        expect_path(relay, path)
        client_got = await asyncio.to_thread(client.outcome)
        server_got = await asyncio.to_thread(server.outcome)
        await asyncio.wait_for(relay.done, 10)
        assert hashlib.sha256(client_got).digest() == hashlib.sha256(down_payload).digest()
        assert hashlib.sha256(server_got).digest() == hashlib.sha256(up_payload).digest()
        assert b"".join(seen["upstream"]) == down_payload  # the decoder sees every byte
        assert b"".join(seen["client"]) == up_payload

    asyncio.run(main())


@pytest.mark.parametrize("path", PATHS)
def test_a_stream_is_forwarded_chunk_by_chunk_as_it_arrives(pki, path):
    """Each small write reaches the client before the next is sent (no buffering)."""
    chunks = [f"data: {{\"n\": {i}}}\n\n".encode() for i in range(200)]

    def server_script(tls):
        for chunk in chunks:
            tls.sendall(chunk)
            assert tls.recv(100) == b"ack"  # sent only once the client read the chunk
        tls.unwrap()

    def client_script(tls):
        got = []
        for chunk in chunks:
            data = b""
            while len(data) < len(chunk):
                data += tls.recv(1 << 16)
            got.append(data)
            tls.sendall(b"ack")
        assert tls.recv(100) == b""  # close_notify
        return got

    async def main():
        seen: dict[str, list[bytes]] = {}
        client, server, relay = await relayed_tls(pki, path, client_script, server_script, seen)
        expect_path(relay, path)
        assert await asyncio.to_thread(client.outcome) == chunks
        await asyncio.to_thread(server.outcome)
        assert seen["upstream"] == chunks  # one chunk per record, none held back
        relay.close()
        await asyncio.wait_for(relay.done, 10)

    asyncio.run(main())


def libssl_of_python():
    """The libssl that Python's _ssl module uses (from this process's map), for calls
    Python's ssl does not offer; None where none is mapped."""
    if not sys.platform.startswith("linux"):
        return None
    with open("/proc/self/maps") as maps:
        for line in maps:
            name = line.rsplit(" ", 1)[-1].strip()
            if "/libssl.so" in name:
                return ctypes.CDLL(name)
    return None  # linked into _ssl: another libssl's calls on its SSL* would be wrong


def ssl_pointer(lib, sslsock) -> int:
    """The SSL* of an ssl.SSLSocket, checked against its app data (as tls_relay does)."""
    pointer = ctypes.c_void_p.from_address(id(sslsock._sslobj) + 2 * ctypes.sizeof(ctypes.c_void_p)
                                           + ctypes.sizeof(ctypes.c_ssize_t)).value
    lib.SSL_get_ex_data.restype = ctypes.c_void_p
    lib.SSL_get_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int]
    assert lib.SSL_get_ex_data(pointer, 0) == id(sslsock._sslobj)
    return pointer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reaches libssl through /proc/self/maps")
@pytest.mark.parametrize("path", PATHS)
def test_key_updates_from_both_ends_are_relayed(pki, path):
    """TLS 1.3 KeyUpdate (update_requested) from the client, then from the server: the
    relay's sides take the new keys and answer, and data goes on flowing both ways."""
    lib = libssl_of_python()
    if lib is None:
        require_native()  # fails unless OpenSSL is linked into _ssl (then neither path can reach it)
        pytest.skip("Python's libssl is linked into _ssl: SSL_key_update is not reachable")
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_get_key_update_type.argtypes = [ctypes.c_void_p]
    requested = 1  # SSL_KEY_UPDATE_REQUESTED
    rounds = 5

    def message(kind: str, i: int) -> bytes:
        return f"{kind} {i} ".encode() + bytes([65 + i]) * 3000

    def exchange(tls, me: int) -> list[bytes]:
        """Round i: the client (me 0) on even rounds, the server on odd ones, asks for a
        key update and pings; the other reads the ping and pongs. Messages have a fixed
        size, so reads are exact even when the relay joins a pong and the next ping."""
        got = []
        for i in range(rounds):
            if i % 2 == me:
                assert lib.SSL_key_update(ssl_pointer(lib, tls), requested) == 1
                assert lib.SSL_get_key_update_type(ssl_pointer(lib, tls)) == requested
                tls.sendall(message("ping", i))
                got.append(read_exactly(tls, len(message("pong", i))))
            else:
                got.append(read_exactly(tls, len(message("ping", i))))
                tls.sendall(message("pong", i))
        return got

    def client_script(tls):
        assert tls.version() == "TLSv1.3"
        got = exchange(tls, 0)
        tls.unwrap()
        return got

    def server_script(tls):
        got = exchange(tls, 1)
        assert tls.recv(100) == b""
        tls.unwrap()
        return got

    async def main():
        seen: dict[str, list[bytes]] = {}
        client, server, relay = await relayed_tls(pki, path, client_script, server_script, seen)
        expect_path(relay, path)
        client_got = await asyncio.to_thread(client.outcome)
        server_got = await asyncio.to_thread(server.outcome)
        await asyncio.wait_for(relay.done, 10)
        assert client_got == [message("pong" if i % 2 == 0 else "ping", i) for i in range(rounds)]
        assert server_got == [message("ping" if i % 2 == 0 else "pong", i) for i in range(rounds)]
        assert b"".join(seen["client"]) == b"".join(server_got)
        assert b"".join(seen["upstream"]) == b"".join(client_got)

    asyncio.run(main())


def test_the_switch_keeps_tls_in_python():
    probe = "from oisp.proxy import relay; print(relay.NATIVE_TLS, relay.NATIVE_UNAVAILABLE)"
    env = {**os.environ, "OISP_NATIVE_TLS": "0"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "OISP_NATIVE_TLS=0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reaches libssl through /proc/self/maps")
@pytest.mark.parametrize("path", PATHS)
def test_a_renegotiation_by_upstream_while_the_client_keeps_sending(pki, path):
    """TLS 1.2 upstream asks for a renegotiation (HelloRequest) while the client's pings
    keep coming: the relay's upstream side cannot encrypt until the new handshake's
    messages are read, so what arrives meanwhile waits and goes out in order after."""
    lib = libssl_of_python()
    if lib is None:
        require_native()
        pytest.skip("Python's libssl is linked into _ssl: SSL_renegotiate is not reachable")
    for name in ("SSL_renegotiate", "SSL_do_handshake", "SSL_renegotiate_pending"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    rounds = 40

    def message(kind: str, i: int) -> bytes:
        return f"{kind} {i:03d} ".encode() + b"." * 500

    def client_script(tls):
        got = []
        for i in range(rounds):
            tls.sendall(message("ping", i))
            got.append(read_exactly(tls, len(message("pong", i))))
        tls.unwrap()
        return got

    def server_script(tls):
        assert tls.version() == "TLSv1.2"
        pointer = ssl_pointer(lib, tls)
        got = [read_exactly(tls, len(message("ping", 0)))]
        assert lib.SSL_renegotiate(pointer) == 1
        assert lib.SSL_do_handshake(pointer) == 1  # the HelloRequest is out
        tls.sendall(message("pong", 0))
        for i in range(1, rounds):
            got.append(read_exactly(tls, len(message("ping", i))))  # reads the new handshake too
            tls.sendall(message("pong", i))
        assert lib.SSL_renegotiate_pending(pointer) == 0  # the renegotiation finished
        assert tls.recv(100) == b""
        tls.unwrap()
        return got

    async def main():
        seen: dict[str, list[bytes]] = {}
        client, server, relay = await relayed_tls(pki, path, client_script, server_script, seen,
                                                  upstream_max=ssl.TLSVersion.TLSv1_2)
        expect_path(relay, path)
        client_got = await asyncio.to_thread(client.outcome)
        server_got = await asyncio.to_thread(server.outcome)
        await asyncio.wait_for(relay.done, 10)
        assert server_got == [message("ping", i) for i in range(rounds)]
        assert client_got == [message("pong", i) for i in range(rounds)]
        assert b"".join(seen["client"]) == b"".join(server_got)
        assert b"".join(seen["upstream"]) == b"".join(client_got)

    asyncio.run(main())
