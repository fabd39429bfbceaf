"""The proxy's own upstream ports are registered before the SYN leaves, released after;
the process filter's include/exclude rules; the reflector's filter."""

import asyncio
import socket
import threading

import pytest

from oisp.redirect import OwnPorts, ProcessFilter, connect_upstream, open_upstream
from oisp.redirect.own_ports import upstream_port_range
from oisp.redirect.reflector import reflector_filter


def listener(family, host):
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    seen = []

    def accept():
        conn, peer = server.accept()
        seen.append(peer[1])
        conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return server, seen, thread


def ipv6_available():
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         pytest.param(socket.AF_INET6, "::1", marks=pytest.mark.skipif(
                                             not ipv6_available(), reason="no IPv6 loopback"))])
def test_connect_upstream_registers_the_port_the_server_sees(family, host):
    own = OwnPorts()
    server, seen, thread = listener(family, host)
    sock = connect_upstream(host, server.getsockname()[1], own)
    thread.join(5)
    port = sock.getsockname()[1]
    assert seen == [port] and port in own and own.mask[port] and len(own) == 1
    own.close(sock)
    assert port not in own and len(own) == 0 and sock.fileno() == -1
    server.close()


def test_open_upstream_does_not_block_the_loop_and_registers():
    own = OwnPorts()
    server, seen, thread = listener(socket.AF_INET, "127.0.0.1")

    async def main():
        sock = await open_upstream("127.0.0.1", server.getsockname()[1], own)
        return sock, sock.getsockname()[1] in own

    sock, registered = asyncio.run(main())
    thread.join(5)
    assert registered and seen == [sock.getsockname()[1]]
    own.close(sock)
    assert len(own) == 0
    server.close()


def test_a_failed_connect_leaves_no_port_registered():
    own = OwnPorts()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(OSError):
        connect_upstream("127.0.0.1", closed_port, own, timeout=2)
    assert len(own) == 0 and not own.mask.any()


def test_a_port_shared_by_two_sockets_stays_registered_until_both_go():
    own = OwnPorts()
    own.register(5000)
    own.register(5000)
    own.unregister(5000)
    assert 5000 in own
    own.unregister(5000)
    assert 5000 not in own


def test_process_filter_rules():
    everyone = ProcessFilter()
    assert not everyone.active and everyone.allows(None, None)
    only = ProcessFilter(include="python,node")
    assert only.allows(1, "Python") and only.allows(2, "node") and not only.allows(3, "chrome")
    assert not only.allows(None, None)  # unknown owner: not in the include list
    but_not = ProcessFilter(include="python", exclude=["42"])
    assert but_not.allows(41, "python") and not but_not.allows(42, "python")
    no_chrome = ProcessFilter(exclude="chrome, 7")
    assert no_chrome.allows(None, None) and not no_chrome.allows(5, "chrome") and not no_chrome.allows(7, "x")


def test_reflector_filter_names_every_server_and_proxy_port():
    assert reflector_filter({443: 8443, 80: 8080}) == (
        "tcp and outbound and ((tcp.DstPort == 80 or tcp.DstPort == 443) or tcp.SrcPort == 8080 or tcp.SrcPort == 8443)")


def test_upstream_sockets_take_reserved_ports_and_spill_over_to_registered_ones():
    own = OwnPorts((62000, 62003))
    server, seen, thread = listener(socket.AF_INET, "127.0.0.1")
    sock = connect_upstream("127.0.0.1", server.getsockname()[1], own)
    thread.join(5)
    port = sock.getsockname()[1]
    assert seen == [port] and 62000 <= port <= 62003
    assert port in own and not own.mask.any() and len(own) == 0  # the filter leaves it out: no registry
    own.close(sock)
    server.close()
    # Every reserved port taken by someone else: an ephemeral port, registered before the connect.
    squatters = []
    for p in range(62000, 62004):
        s = socket.socket()
        s.bind(("0.0.0.0", p))
        squatters.append(s)
    server, seen, thread = listener(socket.AF_INET, "127.0.0.1")
    sock = connect_upstream("127.0.0.1", server.getsockname()[1], own)
    thread.join(5)
    port = sock.getsockname()[1]
    assert seen == [port] and not 62000 <= port <= 62003 and own.mask[port] and len(own) == 1
    assert own.counts == {"in_range": 1, "registered": 1}
    own.close(sock)
    assert len(own) == 0
    for s in [server, *squatters]:
        s.close()


def test_the_reserved_range_lies_above_the_ephemeral_range():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        high = int(f.read().split()[1])
    assert upstream_port_range() == ((high + 1, 65535) if 65535 - high >= 1024 else None)
    with pytest.raises(ValueError, match="1024..65535"):
        OwnPorts((80, 90))


def test_reflector_filter_leaves_out_the_reserved_range():
    assert reflector_filter({443: 8443}, (61000, 65535)) == (
        "tcp and outbound and (((tcp.DstPort == 443) and (tcp.SrcPort < 61000)) or tcp.SrcPort == 8443)")
    assert reflector_filter({443: 8443}, (50000, 50999)) == (
        "tcp and outbound and (((tcp.DstPort == 443) and (tcp.SrcPort < 50000 or tcp.SrcPort > 50999))"
        " or tcp.SrcPort == 8443)")
