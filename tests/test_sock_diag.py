"""The exact sock_diag lookup of a TCP socket's inode, checked against os.fstat of real
loopback sockets, and ProcessResolver's use of it."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from oisp.divert import holders
from oisp.redirect import sock_diag
from oisp.redirect.processes import ProcessResolver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="netlink sock_diag is Linux")


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def server4():
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def connect(server: socket.socket, family=socket.AF_INET, host=None, v6only=None):
    client = socket.socket(family, socket.SOCK_STREAM)
    if v6only is not None:
        client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    client.connect((host or server.getsockname()[0], server.getsockname()[1]))
    accepted, _ = server.accept()
    return client, accepted


def test_the_kernel_answers_here():
    assert sock_diag.available()


def test_ipv4_connection_both_ends(server4):
    client, accepted = connect(server4)
    with client, accepted:
        (caddr, cport), (saddr, sport) = client.getsockname(), client.getpeername()
        assert sock_diag.tcp_inode(caddr, cport, saddr, sport) == inode(client)
        assert sock_diag.tcp_inode(ipaddress.ip_address(caddr), cport, ipaddress.ip_address(saddr), sport) \
            == inode(client)
        # The server's end of the same connection is another socket, found from its own side.
        assert sock_diag.tcp_inode(saddr, sport, caddr, cport) == inode(accepted) != inode(client)


@pytest.mark.skipif(not ipv6_loopback(), reason="no ::1")
def test_ipv6_connection():
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as server:
        client, accepted = connect(server, socket.AF_INET6)
        with client, accepted:
            caddr, cport = client.getsockname()[:2]
            saddr, sport = client.getpeername()[:2]
            assert sock_diag.tcp_inode(caddr, cport, saddr, sport) == inode(client)
            assert sock_diag.tcp_inode(ipaddress.IPv6Address(caddr), cport, "::1", sport) == inode(client)
            assert sock_diag.tcp_inode(saddr, sport, caddr, cport) == inode(accepted)


def test_ipv4_from_a_dual_stack_socket(server4):
    """An AF_INET6 socket (IPV6_V6ONLY off) connected to ::ffff:127.0.0.1: the reflector
    sees plain IPv4 packets, so the lookup is asked in IPv4 terms."""
    client, accepted = connect(server4, socket.AF_INET6, host="::ffff:127.0.0.1", v6only=False)
    with client, accepted:
        caddr, cport = client.getsockname()[:2]
        assert caddr == "::ffff:127.0.0.1"
        sport = server4.getsockname()[1]
        assert sock_diag.tcp_inode("127.0.0.1", cport, "127.0.0.1", sport) == inode(client)
        assert sock_diag.tcp_inode(caddr, cport, "::ffff:127.0.0.1", sport) == inode(client)
        assert sock_diag.tcp_inode(caddr, cport, "127.0.0.1", sport) == inode(client)
        # Which question finds it: both. The AF_INET lookup (tried first) already does, since
        # the socket sits in the IPv4 established table; the kernel answers AF_INET6 with
        # mapped addresses from that same table, so the second try only matters for a miss.
        ports = cport.to_bytes(2, "big"), sport.to_bytes(2, "big")
        loopback = socket.inet_aton("127.0.0.1")
        assert sock_diag._lookup(socket.AF_INET, ports, loopback + bytes(12), loopback + bytes(12), 0) \
            == inode(client)
        mapped = bytes(10) + b"\xff\xff" + loopback
        assert sock_diag._lookup(socket.AF_INET6, ports, mapped, mapped, 0) == inode(client)


def test_no_socket_is_none(server4):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]  # bound, never connected: not in the lookup tables
    assert sock_diag.tcp_inode("127.0.0.1", free_port, "127.0.0.1", server4.getsockname()[1]) is None
    client, accepted = connect(server4)
    with client, accepted:
        cport, sport = client.getsockname()[1], server4.getsockname()[1]
        assert sock_diag.tcp_inode("127.0.0.1", cport, "127.0.0.1", sport + 1 if sport < 65535 else 1) is None
        assert sock_diag.tcp_inode("127.0.0.2", cport, "127.0.0.1", sport) is None
        assert sock_diag.tcp_inode("::1", cport, "::1", sport) is None


def test_a_listener_is_not_the_connection(server4):
    """Asked for (listener's address and port → some peer), the kernel's exact lookup falls
    back to the listener; that answer is refused."""
    client, accepted = connect(server4)
    with client, accepted:
        laddr, lport = server4.getsockname()
        cport = client.getsockname()[1]
        assert sock_diag.tcp_inode(laddr, lport, "127.0.0.1", cport + 1 if cport < 65535 else 1) is None
        assert sock_diag.tcp_inode(laddr, lport, "127.0.0.1", cport) == inode(accepted) != inode(server4)


def test_a_time_wait_socket_has_no_inode(server4):
    client, accepted = connect(server4)
    cport, sport = client.getsockname()[1], server4.getsockname()[1]
    client.close()  # the side that closes first goes to TIME_WAIT
    accepted.recv(1)
    accepted.close()
    assert sock_diag.tcp_inode("127.0.0.1", cport, "127.0.0.1", sport) is None


def test_a_stale_answer_is_skipped_by_its_sequence_number(server4):
    client, accepted = connect(server4)
    with client, accepted:
        (caddr, cport), (saddr, sport) = client.getsockname(), client.getpeername()
        assert sock_diag.tcp_inode(caddr, cport, saddr, sport) == inode(client)  # the thread's socket exists
        # An unread answer, as a lookup that timed out would leave: the accepted socket's,
        # under sequence number 0 (the counter starts at 1).
        stale = sock_diag._REQUEST.pack(
            sock_diag._REQUEST.size, sock_diag.SOCK_DIAG_BY_FAMILY, sock_diag.NLM_F_REQUEST, 0, 0,
            socket.AF_INET, socket.IPPROTO_TCP, 0, 0, sock_diag.ALL_STATES,
            sport.to_bytes(2, "big"), cport.to_bytes(2, "big"), socket.inet_aton(saddr), socket.inet_aton(caddr),
            0, sock_diag.INET_DIAG_NOCOOKIE, sock_diag.INET_DIAG_NOCOOKIE)
        sock_diag._socket().send(stale)
        assert sock_diag.tcp_inode(caddr, cport, saddr, sport) == inode(client)
        with pytest.raises(BlockingIOError):  # both answers were read: none is left for the next lookup
            sock_diag._socket().recv(8192, socket.MSG_DONTWAIT)


def test_a_lookup_does_not_hang_or_raise():
    started = time.monotonic()
    with pytest.raises(OSError):
        sock_diag._socket().recv(8192)  # no question asked: the receive timeout ends the wait
    assert time.monotonic() - started < sock_diag.TIMEOUT + 1
    for args in [("not an address", 1, "127.0.0.1", 2), ("127.0.0.1", 70000, "127.0.0.1", 2),
                 ("127.0.0.1", 1, "::1", 2), (None, 1, None, 2), ("127.0.0.1", None, "127.0.0.1", 2),
                 (b"\x7f\0\0", 1, "127.0.0.1", 2), ("fe80::1%no-such-interface", 1, "fe80::2", 2)]:
        assert sock_diag.tcp_inode(*args) is None


def test_threads_each_get_their_own_answers(server4):
    pairs = [connect(server4) for _ in range(8)]
    try:
        def check(pair):
            client, _ = pair
            (caddr, cport), (saddr, sport) = client.getsockname(), client.getpeername()
            return all(sock_diag.tcp_inode(caddr, cport, saddr, sport) == inode(client) for _ in range(50))
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(check, pairs))
    finally:
        for client, accepted in pairs:
            client.close()
            accepted.close()


def test_resolver_names_this_process_through_sock_diag(server4, monkeypatch):
    """Once a flow of ours was attributed (here by the newest-first scan of /proc), our
    next connection is found among our fds from the sock_diag inode, without the
    /proc/net/tcp scan."""
    scans = []
    monkeypatch.setattr(holders, "socket_inode", lambda *end: scans.append(end[1]) or None)
    resolver = ProcessResolver()
    sport = server4.getsockname()[1]
    first, first_accepted = connect(server4)
    second, second_accepted = connect(server4)
    with first, first_accepted, second, second_accepted:
        assert resolver.owner("127.0.0.1", first.getsockname()[1], "127.0.0.1", sport)[0] == os.getpid()
        assert resolver.counts["by_proc_scan"] == 1  # no recent owner yet: all processes, newest first
        pid, name = resolver.owner(ipaddress.ip_address("127.0.0.1"), second.getsockname()[1],
                                   ipaddress.ip_address("127.0.0.1"), sport)
        assert pid == os.getpid()
        assert name
        assert resolver.counts["by_recent_owner"] == 1
        assert resolver.counts["by_proc_scan"] == 1
        assert scans == []


def test_resolver_scans_proc_without_the_server_end_or_sock_diag(server4, monkeypatch):
    scans = []
    scan = holders.socket_inode
    monkeypatch.setattr(holders, "socket_inode", lambda *end: scans.append(end[1]) or scan(*end))
    resolver = ProcessResolver()
    sport = server4.getsockname()[1]
    pairs = [connect(server4) for _ in range(3)]
    try:
        ports = [client.getsockname()[1] for client, _ in pairs]
        assert resolver.owner("127.0.0.1", ports[0], "127.0.0.1", sport)[0] == os.getpid()  # all processes, newest first
        assert resolver.owner("127.0.0.1", ports[1])[0] == os.getpid()  # no server end: the scan
        assert scans == [ports[1]]
        monkeypatch.setattr(sock_diag, "available", lambda: False)
        assert resolver.owner("127.0.0.1", ports[2], "127.0.0.1", sport)[0] == os.getpid()
        assert scans == [ports[1], ports[2]]
        assert resolver.counts["by_recent_owner"] == 2
    finally:
        for client, accepted in pairs:
            client.close()
            accepted.close()
