"""A flow's owner is a process shown to hold its socket, or unknown; never the previous
user of the port, a process the events merely named, or one that started later.

Real sockets on loopback and real child processes (Linux: /proc and sock_diag); the
platforms without /proc are driven with events built here (ProcessResolver(verify=False)),
with real pids for the processes the events name.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oisp.divert.constants import Event
from oisp.divert.engine import FlowEvent
from oisp.divert import holders
from oisp.redirect.flows import ENDS_RST, FlowEntry, FlowTable
from oisp.redirect.processes import ProcessResolver

LOOPBACK = "127.0.0.1"
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A child that connects from a local port (on the loopback address of the server's
# family) to a server, says so, and waits. argv: local port, server address, server port.
CONNECTOR = """
import socket, sys, time
v6 = ":" in sys.argv[2]
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::1" if v6 else "127.0.0.1", int(sys.argv[1])))
s.connect((sys.argv[2], int(sys.argv[3])))
print("connected", flush=True)
time.sleep(30)
"""
SLEEPER = "import sys, time; print('up', flush=True); time.sleep(30)"


@pytest.fixture
def servers():
    made = [socket.create_server((LOOPBACK, 0)) for _ in range(2)]
    yield made
    for server in made:
        server.close()


@pytest.fixture
def children():
    started = []

    def start(code: str, *argv, **popen) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdout=subprocess.PIPE, text=True,
                                 **popen)
        started.append(child)
        assert child.stdout.readline()  # it is there, with its socket if it makes one
        return child

    yield start
    for child in started:
        child.kill()
        child.wait()


def _port(sock) -> int:
    return sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return _port(probe)


def event(kind: Event, pid: int, local_port: int, remote_port: int, local=LOOPBACK) -> FlowEvent:
    return FlowEvent(event=kind, pid=pid, protocol=socket.IPPROTO_TCP, local=ipaddress.ip_address(local),
                     local_port=local_port, remote=ipaddress.ip_address(LOOPBACK), remote_port=remote_port,
                     outbound=True, timestamp=0, endpoint_id=0, parent_endpoint_id=0)


@linux
def test_a_port_reused_by_another_process_is_not_named_after_its_previous_user(servers, children):
    """Main named this process for the child's connection: the owner of a local port
    was cached by the port alone and never let go without SOCKET/FLOW events."""
    a, b = (_port(s) for s in servers)
    port = _free_port()
    resolver = ProcessResolver()
    mine = socket.socket()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    mine.bind((LOOPBACK, port))
    mine.connect((LOOPBACK, a))
    assert resolver.owner(LOOPBACK, port, LOOPBACK, a)[0] == os.getpid()
    mine.close()  # we close first: (port, a) waits in TIME_WAIT, the port is free for others
    child = children(CONNECTOR, port, LOOPBACK, b)
    assert resolver.confirms(LOOPBACK, port, LOOPBACK, b, os.getpid()) is False
    assert resolver.owner(LOOPBACK, port, LOOPBACK, b, since=time.time())[0] == child.pid
    assert resolver.confirms(LOOPBACK, port, LOOPBACK, b, child.pid) is True
    # The closed connection has no socket to hold any more: unknown, not its last owner.
    assert resolver.owner(LOOPBACK, port, LOOPBACK, a) == (None, None)
    assert resolver.counts["socket_gone"] == 1


@linux
def test_a_candidate_the_events_name_is_refused_unless_it_holds_the_socket(servers, children):
    """Main took an owning event's pid as the answer, so a late event of the port's
    previous user (or a CONNECT of the last client to that server) named it."""
    server = _port(servers[0])
    other = children(SLEEPER)  # alive, started earlier: only holding the socket tells it apart
    resolver = ProcessResolver()
    with socket.create_connection((LOOPBACK, server)) as mine:
        resolver._note_events([event(Event.FLOW_ESTABLISHED, other.pid, _port(mine), server),
                               event(Event.SOCKET_CONNECT, other.pid, 0, server)])
        # Only the candidates the events name (as on a SYN): none holds it, so none is given.
        assert resolver.hinted_owner(LOOPBACK, _port(mine), LOOPBACK, server, since=time.time()) == (None, None)
        assert resolver.counts["refused"] == 1  # one pid, named twice
        pid, name = resolver.owner(LOOPBACK, _port(mine), LOOPBACK, server, since=time.time())
        assert pid == os.getpid()
        assert name
        assert resolver.counts["by_proc_scan"] == 1


@linux
def test_a_holder_that_started_after_the_connection_is_not_its_owner(servers, children):
    """A child given the socket later (inherited, passed) holds it too, but did not make
    the connection: with only it left, the owner is unknown."""
    server = _port(servers[0])
    mine = socket.create_connection((LOOPBACK, server))
    connected = time.time()
    time.sleep(0.1)  # well past the start times' resolution (a clock tick)
    child = children(SLEEPER, pass_fds=(mine.fileno(),))
    port = _port(mine)
    mine.close()  # the child's inherited copy is the only one left
    resolver = ProcessResolver()
    assert resolver.owner(LOOPBACK, port, LOOPBACK, server, since=connected) == (None, None)
    assert resolver.counts["refused"] == 1
    assert resolver.owner(LOOPBACK, port, LOOPBACK, server, since=time.time())[0] == child.pid


def test_started_is_read_from_proc_past_a_name_with_parentheses(children):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    child = children("import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'a) b (c', 0, 0, 0); "
                     "print('up', flush=True); time.sleep(30)")
    assert Path(f"/proc/{child.pid}/comm").read_text().strip() == "a) b (c"
    before = holders.since_boot(time.time())
    assert before - 5 < holders.started(child.pid) <= before + holders.START_SLACK
    assert holders.started(child.pid + 10_000_000) is None  # above pid_max: no such process


# -- without /proc: the events, bound to the connection ---------------------------------

def test_without_proc_an_event_of_the_connection_before_does_not_name_a_new_one(children):
    """The previous connection on this four-tuple (its end not seen yet) noted its owner a
    second before the new flow's SYN: not this flow's. The new connection's own event
    counts; an ended socket's never does."""
    resolver = ProcessResolver(verify=False)
    old, new = children(SLEEPER), children(SLEEPER)
    syn = time.time()
    now = time.monotonic()
    resolver._note_events([event(Event.FLOW_ESTABLISHED, old.pid, 40000, 443)], now=now - 1.0)
    assert resolver.hinted_owner(LOOPBACK, 40000, LOOPBACK, 443, since=syn) == (None, None)
    resolver._note_events([event(Event.FLOW_ESTABLISHED, new.pid, 40000, 443)], now=now)
    assert resolver.hinted_owner(LOOPBACK, 40000, LOOPBACK, 443, since=syn)[0] == new.pid
    resolver._note_events([event(Event.FLOW_DELETED, new.pid, 40000, 443)], now=now)
    assert resolver.hinted_owner(LOOPBACK, 40000, LOOPBACK, 443, since=syn) == (None, None)
    # Its CONNECT, arriving after the end (the SOCKET and FLOW handles are apart), stays ended.
    resolver._note_events([event(Event.SOCKET_CONNECT, new.pid, 40000, 443)], now=now + 0.1)
    assert resolver.hinted_owner(LOOPBACK, 40000, LOOPBACK, 443, since=syn) == (None, None)
    # Once the end is long past, the entry is gone.
    resolver._note_events([], now=now + 10)
    assert not resolver._tuples


def test_without_proc_a_wildcard_bound_connect_names_its_flow():
    resolver = ProcessResolver(verify=False)
    syn = time.time()
    resolver._note_events([event(Event.SOCKET_CONNECT, os.getpid(), 40002, 443, local="0.0.0.0")])
    assert resolver.hinted_owner(LOOPBACK, 40002, LOOPBACK, 443, since=syn)[0] == os.getpid()


def test_without_proc_a_connect_of_an_unbound_socket_is_no_answer(children):
    """It names the server, not the connection: the last client's CONNECT (main took any
    of the last two seconds when it was the only one), or even this one's, is not
    shown to be this flow's, so the owner stays unknown until its own event comes."""
    resolver = ProcessResolver(verify=False)
    before, now = children(SLEEPER), children(SLEEPER)
    syn = time.time()
    resolver._note_events([event(Event.SOCKET_CONNECT, before.pid, 0, 443)], now=time.monotonic() - 1.0)
    assert resolver.hinted_owner(LOOPBACK, 40001, LOOPBACK, 443, since=syn) == (None, None)
    resolver._note_events([event(Event.SOCKET_CONNECT, now.pid, 0, 443)])
    assert resolver.hinted_owner(LOOPBACK, 40001, LOOPBACK, 443, since=syn) == (None, None)
    resolver._note_events([event(Event.FLOW_ESTABLISHED, now.pid, 40001, 443)])
    assert resolver.hinted_owner(LOOPBACK, 40001, LOOPBACK, 443, since=syn)[0] == now.pid


def test_without_proc_an_exited_or_later_process_is_refused(children):
    resolver = ProcessResolver(verify=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    resolver._note_events([event(Event.FLOW_ESTABLISHED, int(gone.stdout), 40003, 443)])
    assert resolver.hinted_owner(LOOPBACK, 40003, LOOPBACK, 443, since=time.time() - 0.1) == (None, None)
    # psutil's start times rest on a boot time in whole seconds here: a wide margin.
    later = children(SLEEPER)
    resolver._note_events([event(Event.FLOW_ESTABLISHED, later.pid, 40004, 443)])
    assert resolver.hinted_owner(LOOPBACK, 40004, LOOPBACK, 443, since=time.time() - 3.0) == (None, None)
    assert resolver.counts["refused"] == 2


# -- the flow table ----------------------------------------------------------------------

def _entry(pid=None, name=None, created=None):
    entry = FlowEntry(ipaddress.ip_address("10.0.0.1"), 40000, ipaddress.ip_address("10.0.0.2"), 443, 8443, pid, name)
    if created is not None:
        entry.created = created
    return entry


def test_an_ended_entry_is_not_taken_for_the_new_connection_on_its_port():
    """The proxy accepted the new connection before the ring's flow for it was adopted:
    main answered with the lingering entry of the previous one, and its owner."""
    table = FlowTable()
    old = table.open(_entry(pid=7, name="python"))
    table.touch([(old.key, ENDS_RST)])  # it ended, and lingers
    new = _entry(pid=8, name="python")
    table.on_miss = lambda: table.open(new) if table.get(new.key) is old else None
    assert table.lookup("10.0.0.2", 40000, 8443) is new


def test_an_owner_the_kernel_does_not_confirm_is_named_again():
    named = []

    def owner(client, port, server, server_port, since=None):
        named.append(since)
        return 8, "curl"

    table = FlowTable(owner=owner, confirm=lambda client, port, server, server_port, pid: pid == 8)
    stale = table.open(_entry(pid=7, name="python", created=1234.5))
    found = table.lookup("10.0.0.2", 40000, 8443, name_owner=False)
    # not named on the event loop
    assert (found.pid, found.process_name) == (None, None)
    assert not named
    found = table.lookup("10.0.0.2", 40000, 8443)
    # bound by the flow's start
    assert (found.pid, found.process_name) == (8, "curl")
    assert named == [1234.5]
    # confirmed: kept
    assert table.lookup("10.0.0.2", 40000, 8443) is stale
    assert len(named) == 1


# -- what the events say ------------------------------------------------------------------

def _recorded(pid):
    import json

    from oisp.decode import Direction, FlowContext
    from oisp.events import FlowRecorder

    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    reply = json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}]}).encode()
    rec = FlowRecorder(FlowContext(("10.0.0.1", 40000), ("10.0.0.2", 443), 0.0, pid=pid, sni="api.openai.com",
                                   tls_version="TLSv1.3", alpn="http/1.1"))
    events = rec.start()
    events += rec.feed(Direction.REQUEST, b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\n"
                       b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body), 0.5)
    events += rec.feed(Direction.RESPONSE, b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(reply), reply), 0.6)
    return events + rec.close(1.0)


def test_an_event_without_a_pid_says_the_process_is_unknown():
    unknown, known = _recorded(None), _recorded(os.getpid())
    assert {e["event_type"] for e in unknown} >= {"network.connect", "ai.request", "ai.response", "network.flow"}
    for event in unknown:
        assert event.get("process") is None
        assert event["confidence"]["process_attribution"] == "unknown"
        assert "process_unknown" in event["confidence"]["limitations"]
    for event in known:
        assert event["process"]["pid"] == os.getpid()
        assert "process_unknown" not in event["confidence"].get("limitations", ())


@linux
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_the_proc_scan_tells_apart_two_connections_on_one_local_port(children, monkeypatch, family):
    """Two processes connect from one local port to one port of two server addresses
    (Linux allows it): without sock_diag, /proc/net/tcp* must be matched on both ends,
    addresses included, or one process is named for the other's connection."""
    from oisp.redirect import sock_diag

    here, there = ("127.0.0.1", "127.0.0.2") if family == socket.AF_INET else ("::1", "::1")
    a = socket.create_server((here, 0), family=family)
    b = socket.create_server((there, _port(a) if family == socket.AF_INET else 0), family=family)
    port = _free_port() if family == socket.AF_INET else 0
    mine = socket.socket(family)
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    mine.bind((here, port))
    mine.connect((here, _port(a)))
    port = _port(mine)
    # IPv4: the same server port on another address; IPv6 (one loopback address): another port.
    server, server_port = there, _port(b)
    with a, b, mine:
        child = children(CONNECTOR, port, server, server_port)
        assert holders.socket_inode(here, port, server, server_port) == sock_diag.tcp_inode(here, port, server,
                                                                                             server_port)
        assert holders.socket_inode(here, port, here, _port(a)) == sock_diag.tcp_inode(here, port, here, _port(a))
        monkeypatch.setattr(sock_diag, "available", lambda: False)
        resolver = ProcessResolver()
        assert resolver.owner(here, port, server, server_port)[0] == child.pid
        assert resolver.owner(here, port, here, _port(a))[0] == os.getpid()


def test_owning_events_are_kept_within_a_bound(monkeypatch):
    """Sockets whose end event never comes (lost, or a program opening connections
    without end) cannot grow the resolver without bound: the oldest go first."""
    from oisp.redirect import processes

    monkeypatch.setattr(processes, "KNOWN_TUPLES", 100)
    resolver = ProcessResolver(verify=False)
    resolver._note_events([event(Event.FLOW_ESTABLISHED, os.getpid(), 20000 + i, 443) for i in range(250)])
    assert len(resolver._tuples) == 100
    assert resolver.hinted_owner(LOOPBACK, 20249, LOOPBACK, 443)[0] == os.getpid()
    assert resolver.hinted_owner(LOOPBACK, 20000, LOOPBACK, 443) == (None, None)


def test_a_name_is_the_current_process_behind_a_reused_pid(children, monkeypatch):
    """A pid reused by a newer process: asked for the current one, its own name, not the
    name the pid had before (main kept a pid's first name for good)."""
    from oisp.divert.owners import ProcessNames

    child = children("import ctypes, time; ctypes.CDLL(None).prctl(15, b'newer', 0, 0, 0); print('up', flush=True); "
                     "time.sleep(30)")
    names = ProcessNames()
    names._names[child.pid] = ("older", 1.0)  # what the pid's previous process left
    assert names(child.pid) == "older"  # not asked for the current process: as kept
    assert names(child.pid, current=True) == "newer"
    child.kill()
    child.wait()
    assert names(child.pid, current=True) == "newer"  # gone: what was learned while it lived
    monkeypatch.setattr(ProcessNames, "MAX_NAMES", 3)
    for pid in (1, os.getpid(), os.getppid(), child.pid):
        names(pid)
    assert len(names._names) == 3
    assert 1 not in names._names
