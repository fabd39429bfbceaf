"""The IPC over a real Unix socket: oisp.ipc.server in a thread over a real FlowTable
and OwnPorts, oisp.ipc.client on asyncio, and raw sockets speaking the wire format by
hand for everything a well-behaved client would never send. The last test runs clients
as two users it creates (setpriv), one allowed and one not."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from oisp.ipc import protocol as p
from oisp.ipc.client import IPCClient, IPCUnavailable
from oisp.ipc.server import IPCServer, flow_table_handlers
from oisp.ipc.transport import AccessPolicy, TransportError, listen_unix
from oisp.redirect.flows import FlowEntry, FlowTable
from oisp.own_ports import OwnPorts

ME = frozenset({os.getuid()})


@pytest.fixture
def ipc_dir():
    base = Path(tempfile.mkdtemp(prefix="oisp-ipc-test-"))
    os.chmod(base, 0o755)  # the users a test creates must reach the socket's directory
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def entry(client_port: int = 40000, **kw) -> FlowEntry:
    fields = dict(client_addr=ipaddress.ip_address("10.200.0.1"), client_port=client_port,
                  server_addr=ipaddress.ip_address("10.200.0.2"), server_port=443, proxy_port=8443,
                  pid=4242, process_name="python3")
    return FlowEntry(**(fields | kw))


class Lab:
    """A server over a real flow table, and what it was built on."""

    def __init__(self, address: Path, *, owner=None, policy=None, flows=None, **kw):
        self.address = address
        self.flows = flows if flows is not None else FlowTable(owner=lambda *a, since=None: (77, "named-later"))
        self.own_ports = OwnPorts()
        handlers = flow_table_handlers(self.flows, self.own_ports,
                                       lambda: {"reflector": {"engine": {"dropped": 2}}, "dns": {"answers": 5}})
        self.server = IPCServer(handlers, policy or AccessPolicy.user(os.getuid()), address=str(address),
                                owner=owner or (os.getuid(), None), **kw).start()

    def stop(self):
        self.server.stop()


@pytest.fixture
def lab(ipc_dir):
    made = Lab(ipc_dir / "run" / "ipc.sock")
    try:
        yield made
    finally:
        made.stop()


def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


async def connected_client(address, **kw) -> IPCClient:
    client = await IPCClient(str(address), server_uids=ME, **kw).start()
    await client.wait_connected(5)
    return client


def test_a_lookup_registers_its_upstream_port_in_the_same_round_trip(lab):
    """Protocol v2: the lookup's `upstream` is registered before the answer (so the
    connect that follows it is never reflected), only on a hit, and undone with the
    connection like any registered port."""
    lab.flows.open(entry())

    async def run():
        client = await connected_client(lab.address)
        try:
            miss = await client.lookup("10.200.0.2", 40999, 8443, upstream=(41000, 4))
            assert miss is None and not lab.own_ports.holds(41000, socket.AF_INET)
            flow = await client.lookup("10.200.0.2", 40000, 8443, upstream=(41001, 6))
            assert flow.client_port == 40000 and flow.token
            assert lab.own_ports.holds(41001, socket.AF_INET6) and not lab.own_ports.holds(41001, socket.AF_INET)
            client.unregister_port(41001, 6)
            until(lambda: not lab.own_ports.holds(41001, socket.AF_INET6))
            await client.lookup("10.200.0.2", 40000, 8443, upstream=(41002, 4))
            assert lab.own_ports.holds(41002, socket.AF_INET)
        finally:
            await client.close()
        until(lambda: not lab.own_ports.holds(41002, socket.AF_INET))  # the connection went: so did its port

    asyncio.run(run())


def test_listeners_are_believed_only_when_ours_and_dropped_with_the_connection(ipc_dir):
    """listeners.set against oisp.redirect.listeners' real check: a port this process
    listens on is believed, one nobody listens on is refused (the connection stays), and
    the gate closes the moment the sensor's connection does."""
    from oisp.ipc.client import IPCRequestError
    from oisp.ipc.server import ListenersRefused
    from oisp.redirect.listeners import ListenerGate

    ours = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ours.bind(("::", 0))
    ours.listen()
    nobody = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    nobody.bind(("::", 0))  # bound, never listening
    opened: list[bool] = []
    gate = ListenerGate({443: ours.getsockname()[1], 11434: nobody.getsockname()[1]}, opened.append)
    lab = Lab(ipc_dir / "ipc.sock")

    def set_listeners(session, peer, wanted):
        try:
            gate.set(session, peer, wanted)
        except ValueError as e:
            raise ListenersRefused(str(e)) from None

    lab.server.handlers.set_listeners, lab.server.handlers.listeners_dropped = set_listeners, gate.dropped
    lab.server.handlers.listen = dict(gate.expected)
    try:
        async def run():
            client = await connected_client(lab.address)
            try:
                assert client.listen == gate.expected  # the welcome says where to listen
                with pytest.raises(IPCRequestError) as refused:
                    await client.set_listeners(dict(gate.expected))
                assert refused.value.code == "refused" and "nothing listens" in str(refused.value)
                assert opened == [] and client.connected
                gate.expected = {443: ours.getsockname()[1]}
                await client.set_listeners(dict(gate.expected))
                assert opened == [True]
            finally:
                await client.close()
            until(lambda: opened == [True, False])

        asyncio.run(run())
        assert lab.server.stats["listeners_refused"] == 1
    finally:
        lab.stop()
        ours.close()
        nobody.close()


# -- raw sockets: the wire format by hand -------------------------------------------------------
def raw(address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(address))
    return sock


def frame(obj) -> bytes:
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack(">I", len(body)) + body


HELLO = frame({"type": "hello", "versions": [2]})


def read_until_closed(sock: socket.socket) -> list[p.Message]:
    """Everything the server sends until it closes (bounded by the socket's timeout)."""
    decoder, out = p.Decoder("client"), []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += decoder.feed(data)
    return out


# -- the socket's place -------------------------------------------------------------------------
def test_socket_directory_and_file_modes(ipc_dir):
    path = ipc_dir / "run" / "ipc.sock"
    sock = listen_unix(path, uid=os.getuid())
    try:
        d, s = os.lstat(path.parent), os.lstat(path)
        assert stat.S_IMODE(d.st_mode) == 0o755 and d.st_uid == os.geteuid()
        assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600 and s.st_uid == os.getuid()
        assert os.listdir(path.parent) == ["ipc.sock"]  # the temporary name is gone
    finally:
        sock.close()
    grouped = listen_unix(path, uid=os.getuid(), gid=os.getgid())  # replaces the stale socket
    try:
        s = os.lstat(path)
        assert stat.S_IMODE(s.st_mode) == 0o660 and s.st_gid == os.getgid()
    finally:
        grouped.close()


def test_socket_directory_that_is_a_link_or_open_is_refused_or_fixed(ipc_dir):
    (ipc_dir / "elsewhere").mkdir()
    (ipc_dir / "linked").symlink_to(ipc_dir / "elsewhere")
    with pytest.raises(TransportError, match="not a directory"):
        listen_unix(ipc_dir / "linked" / "ipc.sock", uid=os.getuid())
    (ipc_dir / "open").mkdir()
    os.chmod(ipc_dir / "open", 0o777)
    listen_unix(ipc_dir / "open" / "ipc.sock", uid=os.getuid()).close()
    assert stat.S_IMODE(os.lstat(ipc_dir / "open").st_mode) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_socket_directory_of_another_owner_is_refused(ipc_dir):
    (ipc_dir / "theirs").mkdir()
    os.chown(ipc_dir / "theirs", 65534, 65534)
    with pytest.raises(TransportError, match="belongs to uid 65534"):
        listen_unix(ipc_dir / "theirs" / "ipc.sock", uid=0)


# -- a well-behaved client ------------------------------------------------------------------------
def test_lookup_hold_release_ports_counters_notes(lab):
    known = lab.flows.open(entry())
    unnamed = lab.flows.open(entry(client_port=40001, pid=None, process_name=None))
    lab.flows.open(entry(client_port=40002, pid=os.getpid()))
    lab.server.note("DNS answers are not watched: test", level="degraded")
    pushed = []

    async def run():
        client = await connected_client(lab.address, on_note=pushed.append)
        try:
            flow = await client.lookup("10.200.0.2", 40000, 8443)
            assert (flow.client_addr, flow.client_port, flow.server_addr, flow.server_port) == \
                   ("10.200.0.1", 40000, "10.200.0.2", 443)
            assert (flow.pid, flow.process_name, flow.created) == (4242, "python3", known.created)
            assert flow.token and known.held == 1
            client.release(flow.token)
            assert await client.lookup("10.200.0.2", 40099, 8443) is None
            assert await client.lookup("::ffff:10.200.0.2", 40000, 8443) is not None  # as a dual-stack listener sees it
            plain = await client.lookup("10.200.0.2", 40001, 8443, hold=False)
            assert plain.pid is None and plain.token == 0 and unnamed.held == 0
            named = await client.lookup("10.200.0.2", 40001, 8443, hold=False, name_owner=True)
            assert (named.pid, named.process_name) == (77, "named-later")  # the table's owner, in the worker
            assert flow.process_created is None  # read only on the slow path
            me = await client.lookup("10.200.0.2", 40002, 8443, hold=False, name_owner=True)
            assert me.process_created == psutil.Process(os.getpid()).create_time()
            await client.register_port(50001, 4)
            assert lab.own_ports.holds(50001, socket.AF_INET)
            client.unregister_port(50001, 4)
            counters = await client.counters()
            assert counters["reflector.engine.dropped"] == 2 and counters["dns.answers"] == 5
            assert counters["ipc.lookups"] == 6 and counters["ipc.lookup_misses"] == 1
            lab.server.note("the filter names the port alone", level="info")
            await asyncio.sleep(0.2)
            assert [n.text for n in client.notes] == ["DNS answers are not watched: test",
                                                      "the filter names the port alone"]
            assert [n.level for n in pushed] == ["degraded", "info"]
        finally:
            await client.close()

    asyncio.run(run())
    until(lambda: known.held == 0 and not lab.own_ports.holds(50001, socket.AF_INET))


def test_a_note_of_no_known_level_is_refused_before_it_reaches_a_client(lab):
    with pytest.raises(ValueError, match="level"):
        lab.server.note("x", level="urgent")


def test_a_failing_note_listener_costs_nothing_but_its_note(lab):
    lab.flows.open(entry())

    def broken(note):
        raise RuntimeError("listener bug")

    async def run():
        client = await connected_client(lab.address, on_note=broken)
        try:
            lab.server.note("first")
            await asyncio.sleep(0.1)
            assert client.connected and [n.text for n in client.notes] == ["first"]
            assert await client.lookup("10.200.0.2", 40000, 8443, hold=False) is not None
        finally:
            await client.close()

    asyncio.run(run())
    until(lambda: lab.server.stats["disconnected"] == 1)
    assert lab.server.stats["accepted"] == 1  # one connection throughout


def test_a_gone_client_leaves_nothing_behind_and_the_server_serves_the_next(lab):
    held = lab.flows.open(entry())

    async def first():
        client = await connected_client(lab.address)
        await client.lookup("10.200.0.2", 40000, 8443)
        await client.register_port(50002, 6)
        await client.register_port(50002, 6)  # two sockets on one port
        assert held.held == 1 and lab.own_ports.holds(50002, socket.AF_INET6)
        client._protocol.transport.abort()  # dies without goodbye or release
        await client.close()

    asyncio.run(first())
    until(lambda: held.held == 0 and not lab.own_ports.holds(50002, socket.AF_INET6) and lab.server.stats["disconnected"] == 1)

    async def second():
        client = await connected_client(lab.address)
        try:
            assert (await client.lookup("10.200.0.2", 40000, 8443, hold=False)).client_port == 40000
        finally:
            await client.close()

    asyncio.run(second())


def test_a_token_of_a_former_connection_releases_nothing(ipc_dir):
    """After a reconnect the new server numbers its tokens from 1 again: the old token 1
    must not release the new connection's flow 1."""
    address = ipc_dir / "ipc.sock"
    first = Lab(address)

    async def run():
        client = await connected_client(address, backoff=(0.02, 0.1))
        try:
            first.flows.open(entry())
            old = await client.lookup("10.200.0.2", 40000, 8443)
            first.stop()
            deadline = time.monotonic() + 5
            while client.connected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            second = Lab(address)
            try:
                kept = second.flows.open(entry())
                await client.wait_connected(5)
                new = await client.lookup("10.200.0.2", 40000, 8443)
                assert new.token != old.token and kept.held == 1  # both were the servers' token 1
                client.release(old.token)  # the former connection's: dropped
                await client.counters()  # a round trip: a release sent before it would have arrived
                assert kept.held == 1
                client.release(new.token)
                await client.counters()
                assert kept.held == 0
            finally:
                await client.close()
                second.stop()
        finally:
            first.stop()

    asyncio.run(run())


def test_a_slow_owner_lookup_holds_up_no_other_request(ipc_dir):
    """Naming a process may take long (/proc on a busy host): it runs in the worker, and
    the lookups behind it are answered meanwhile."""
    def slow_owner(*_, since=None):
        time.sleep(0.6)
        return 99, "slow"

    lab = Lab(ipc_dir / "ipc.sock", flows=FlowTable(owner=slow_owner))
    try:
        lab.flows.open(entry(pid=None, process_name=None))
        lab.flows.open(entry(client_port=40001))

        async def run():
            client = await connected_client(lab.address)
            try:
                slow = asyncio.ensure_future(client.lookup("10.200.0.2", 40000, 8443, hold=False, name_owner=True))
                await asyncio.sleep(0.05)
                started = time.monotonic()
                fast = await client.lookup("10.200.0.2", 40001, 8443, hold=False)
                assert fast.client_port == 40001 and time.monotonic() - started < 0.3 and not slow.done()
                assert (await slow).pid == 99
            finally:
                await client.close()

        asyncio.run(run())
    finally:
        lab.stop()


def test_slow_lookups_waiting_for_the_worker_are_bounded_per_client(ipc_dir):
    from oisp.ipc import server as server_module

    gate = threading.Event()

    def blocked_owner(*_, since=None):
        gate.wait(10)
        return 1, "x"

    lab = Lab(ipc_dir / "ipc.sock", flows=FlowTable(owner=blocked_owner))
    try:
        lab.flows.open(entry(pid=None, process_name=None))
        sock = raw(lab.address)
        sock.sendall(HELLO + b"".join(
            frame({"type": "flow.lookup", "id": i, "peer_addr": "10.200.0.2", "peer_port": 40000, "proxy_port": 8443,
                   "hold": False, "name_owner": True}) for i in range(1, server_module.MAX_SLOW + 11)))
        decoder, got = p.Decoder("client"), []
        while len(got) < 11:  # the welcome and ten refusals come first
            got += decoder.feed(sock.recv(65536))
        assert [m.code for m in got[1:]] == ["busy"] * 10
        assert [m.id for m in got[1:]] == list(range(server_module.MAX_SLOW + 1, server_module.MAX_SLOW + 11))
        gate.set()
        while len(got) < 11 + server_module.MAX_SLOW:  # then every waiting one is answered
            got += decoder.feed(sock.recv(65536))
        assert all(isinstance(m, p.FlowAnswer) and m.flow.pid == 1 for m in got[11:])
        sock.close()
    finally:
        gate.set()
        lab.stop()


def test_notes_never_block_the_redirector_thread(ipc_dir):
    """note() is called from the redirector's threads: a client that reads nothing must
    not make it wait (the server queues, then cuts that client)."""
    lab = Lab(ipc_dir / "ipc.sock", max_unsent=64 * 1024)
    try:
        sock = raw(lab.address)
        sock.sendall(HELLO)
        until(lambda: any(s.welcomed for s in lab.server.sessions))
        started = time.monotonic()
        for i in range(3000):  # ~1.5 MB of notes, more than the socket buffers and max_unsent
            lab.server.note(f"note {i} " + "x" * 480)
        assert time.monotonic() - started < 1.0
        until(lambda: lab.server.stats["slow_clients"] == 1)
        sock.close()
    finally:
        lab.stop()


def test_requests_in_flight_are_answered_by_id(lab):
    for port in range(41000, 41050):
        lab.flows.open(entry(client_port=port))

    async def run():
        client = await connected_client(lab.address)
        try:
            flows = await asyncio.gather(*(client.lookup("10.200.0.2", port, 8443, hold=False)
                                           for port in range(41000, 41060)))
            assert [f.client_port if f else None for f in flows] == list(range(41000, 41050)) + [None] * 10
        finally:
            await client.close()

    asyncio.run(run())


# -- what a broken or hostile client gets -----------------------------------------------------------
@pytest.mark.parametrize("sent, code", [
    (HELLO + frame(b"{not json"), "malformed"),
    (HELLO + struct.pack(">I", p.MAX_FRAME + 1), "too_large"),
    (frame({"type": "counters.get", "id": 1}), "not_ready"),
    (frame({"type": "hello", "versions": [9]}), "unsupported_version"),
    (HELLO + HELLO, "unknown_type"),
    (HELLO + frame({"type": "welcome", "version": 1}), "unknown_type"),
    (HELLO + frame({"type": "port.register", "id": 1, "port": 0, "family": 4}), "bad_field"),
])
def test_protocol_violations_get_an_error_and_a_closed_connection(lab, sent, code):
    sock = raw(lab.address)
    sock.sendall(sent)
    got = read_until_closed(sock)
    assert isinstance(got[-1], p.Error) and got[-1].code == code and got[-1].id is None
    assert lab.server.stats["protocol_errors"] == 1

    async def still_serving():
        client = await connected_client(lab.address)
        await client.close()

    asyncio.run(still_serving())


def test_fuzzed_frames_over_the_socket_crash_nothing(lab):
    """Random bytes after a hello, many connections: each is closed with an error or
    left open, the server thread lives on and answers a good client."""
    import random

    rng = random.Random(1)
    for _ in range(40):
        sock = raw(lab.address)
        sock.settimeout(1)
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000)))
        try:
            sock.sendall(HELLO + (junk if rng.random() < 0.5 else frame(junk)))
            read_until_closed(sock)
        except (TimeoutError, socket.timeout, OSError):
            pass  # a partial frame: the server waits for its end (frame_timeout)
        sock.close()

    async def good():
        lab.flows.open(entry())
        client = await connected_client(lab.address)
        try:
            assert await client.lookup("10.200.0.2", 40000, 8443, hold=False) is not None
        finally:
            await client.close()

    asyncio.run(good())
    assert lab.server.stats["protocol_errors"] >= 20


def test_clients_beyond_the_limit_are_told_busy(ipc_dir):
    lab = Lab(ipc_dir / "ipc.sock", max_clients=1)
    try:
        first = raw(lab.address)
        first.sendall(HELLO)
        second = raw(lab.address)
        got = read_until_closed(second)
        assert [m.code for m in got] == ["busy"] and lab.server.stats["refused_busy"] == 1
        first.close()
    finally:
        lab.stop()


def test_hello_and_frame_deadlines(ipc_dir):
    lab = Lab(ipc_dir / "ipc.sock", hello_timeout=0.3, frame_timeout=0.3)
    try:
        silent = raw(lab.address)
        started = time.monotonic()
        assert [m.code for m in read_until_closed(silent)] == ["malformed"]
        assert 0.25 < time.monotonic() - started < 3 and lab.server.stats["hello_timeouts"] == 1
        trickle = raw(lab.address)
        trickle.sendall(HELLO + b"\x00\x00")  # half a length prefix, then nothing
        got = read_until_closed(trickle)
        assert isinstance(got[0], p.Welcome) and got[-1].code == "malformed"
        assert lab.server.stats["frame_timeouts"] == 1
    finally:
        lab.stop()


def test_a_client_that_does_not_read_is_cut_not_queued_for(ipc_dir):
    lab = Lab(ipc_dir / "ipc.sock", max_unsent=4096)
    try:
        sock = raw(lab.address)
        sock.sendall(HELLO)
        request = frame({"type": "counters.get", "id": 1})
        try:
            for _ in range(5000):  # ~3 MB of answers, never read
                sock.sendall(request)
        except OSError:
            pass  # the server cut us while we were still sending
        until(lambda: lab.server.stats["slow_clients"] == 1 and not lab.server.sessions)
        assert lab.server.stats["accepted"] == 1
    finally:
        lab.stop()


def test_a_request_without_an_answer_fails_in_time(ipc_dir):
    """A server that welcomes and then never answers: the lookup fails (IPCUnavailable)
    after request_timeout (plus the sweep's period), it does not hang the proxy."""
    from oisp.ipc import client as client_module

    address = ipc_dir / "mute.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(address))
    listener.listen(1)
    held = []

    def mute():
        conn, _ = listener.accept()
        held.append(conn)
        conn.recv(65536)  # the hello
        conn.sendall(p.encode(p.Welcome(version=2)))

    thread = threading.Thread(target=mute, daemon=True)
    thread.start()

    async def run():
        client = await connected_client(address, request_timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(IPCUnavailable, match="no answer"):
                await client.lookup("10.200.0.2", 40000, 8443)
            assert 0.29 < time.monotonic() - started < 0.3 + client_module.SWEEP + 0.5
            assert client.stats["timeouts"] == 1
        finally:
            await client.close()

    try:
        asyncio.run(run())
    finally:
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


# -- restarts -------------------------------------------------------------------------------------
def test_server_restart_the_client_reconnects_and_registers_again(ipc_dir):
    address = ipc_dir / "run" / "ipc.sock"
    first = Lab(address)
    states = []

    async def run():
        client = await connected_client(address, backoff=(0.02, 0.2), on_state=states.append)
        try:
            await client.register_port(50003, 4)
            assert first.own_ports.holds(50003, socket.AF_INET)
            first.stop()
            deadline = time.monotonic() + 5
            while client.connected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not client.connected
            started = time.monotonic()
            with pytest.raises(IPCUnavailable):
                await client.lookup("10.200.0.2", 40000, 8443)
            assert time.monotonic() - started < 0.1  # fails at once: the proxy lets the flow go
            await asyncio.sleep(0.3)  # a few failed reconnects
            second = Lab(address)
            try:
                second.flows.open(entry())
                await client.wait_connected(5)
                deadline = time.monotonic() + 5
                while not second.own_ports.holds(50003, socket.AF_INET) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert second.own_ports.holds(50003, socket.AF_INET)  # registered again on the new server
                flow = await client.lookup("10.200.0.2", 40000, 8443)
                assert flow.client_port == 40000
            finally:
                await client.close()
                second.stop()
        finally:
            first.stop()

    asyncio.run(run())
    assert states == [True, False, True, False]  # up, down with the first server, up with the second, closed
    assert not address.exists()  # the last server removed its socket


def test_a_stale_socket_of_a_dead_server_is_replaced(ipc_dir):
    address = ipc_dir / "ipc.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(address))
    dead.close()  # a killed server leaves its socket's name behind
    lab = Lab(address)
    try:
        async def run():
            client = await connected_client(address)
            await client.close()

        asyncio.run(run())
    finally:
        lab.stop()


def test_a_live_server_is_not_taken_over(lab):
    with pytest.raises(TransportError, match="already serves"):
        Lab(lab.address)

    async def run():  # the first one still serves
        client = await connected_client(lab.address)
        await client.close()

    asyncio.run(run())


def test_the_client_believes_only_the_expected_server(lab):
    async def run():
        client = await IPCClient(str(lab.address), server_uids=frozenset({os.getuid() + 12345}),
                                 backoff=(0.02, 0.05)).start()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await client.wait_connected(0.5)
            assert client.stats["refused_server"] >= 1 and "not by the redirector" in client.last_error
        finally:
            await client.close()

    asyncio.run(run())
    assert lab.server.stats["accepted"] >= 1 and lab.server.stats["lookups"] == 0


# -- another user -----------------------------------------------------------------------------------
# A client written from docs/ipc.md with the standard library only, run by the system
# Python (the test's own may sit under a directory the created users cannot read).
RAW_CLIENT = r"""
import json, os, socket, struct, sys
def frame(obj):
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body
def read(sock):
    head = b""
    while len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            return None
        head += more
    size, = struct.unpack(">I", head)
    body = b""
    while len(body) < size:
        body += sock.recv(size - len(body))
    return json.loads(body)
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(5)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print(json.dumps({"uid": os.getuid(), "result": "EACCES"})); sys.exit()
try:
    sock.sendall(frame({"type": "hello", "versions": [2], "software": "raw"}))
    welcome = read(sock)
    if welcome is None:
        print(json.dumps({"uid": os.getuid(), "result": "closed"})); sys.exit()
    sock.sendall(frame({"type": "flow.lookup", "id": 1, "peer_addr": "10.200.0.2", "peer_port": 40000,
                        "proxy_port": 8443, "hold": False}))
    print(json.dumps({"uid": os.getuid(), "result": "answered", "welcome": welcome, "answer": read(sock)}))
except (ConnectionResetError, BrokenPipeError):
    print(json.dumps({"uid": os.getuid(), "result": "closed"}))
"""


def _user(name: str) -> tuple[int, int]:
    subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    import pwd

    record = pwd.getpwnam(name)
    return record.pw_uid, record.pw_gid


def _remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)


def _as(uid: int, gid: int, address) -> dict:
    done = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
                           "/usr/bin/python3", "-c", RAW_CLIENT, str(address)],
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.privileged
@pytest.mark.skipif(not shutil.which("setpriv") or not shutil.which("useradd") or not os.path.exists("/usr/bin/python3"),
                    reason="needs setpriv, useradd and /usr/bin/python3")
def test_only_the_allowed_user_gets_in(ipc_dir):
    """The allowed user's client is answered; another local user is kept out by the
    socket's mode, and, with the socket opened to everyone, by SO_PEERCRED."""
    tag = f"{os.getpid() % 100000}"
    allowed_name, other_name = f"ipca{tag}", f"ipcb{tag}"
    try:
        allowed, other = _user(allowed_name), _user(other_name)
        address = ipc_dir / "run" / "ipc.sock"
        lab = Lab(address, owner=(allowed[0], None), policy=AccessPolicy.user(allowed[0]))
        try:
            lab.flows.open(entry())
            got = _as(*allowed, address)
            assert got["uid"] == allowed[0] and got["result"] == "answered"
            assert got["welcome"]["type"] == "welcome" and got["welcome"]["version"] == 2
            assert got["answer"]["flow"]["client_port"] == 40000 and got["answer"]["flow"]["process_name"] == "python3"
            assert _as(*other, address) == {"uid": other[0], "result": "EACCES"}  # the socket is 0600, the allowed user's
            os.chmod(address, 0o666)  # as if the mode were wrong: the peer check still holds
            assert _as(*other, address) == {"uid": other[0], "result": "closed"}
            assert lab.server.stats["refused_peer"] == 1 and lab.server.last_refused.uid == other[0]
            assert lab.server.stats["accepted"] == 1 and lab.server.stats["lookups"] == 1
        finally:
            lab.stop()
    finally:
        _remove_user(allowed_name)
        _remove_user(other_name)
