"""The proxy's own upstream ports are registered before the SYN leaves, released after;
the process filter's include/exclude rules; the reflector's filter and its swap budget."""

import asyncio
import errno
import socket
import threading

import pytest

from oisp.redirect import OwnPorts, connect_upstream, open_upstream
from oisp.redirect.succession import reflector_filter


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
    assert seen == [port]
    assert own.holds(port, family)
    assert len(own) == 1
    own.close(sock)
    assert not own.holds(port, family)
    assert len(own) == 0
    assert sock.fileno() == -1
    server.close()


def test_open_upstream_does_not_block_the_loop_and_registers():
    own = OwnPorts()
    server, seen, thread = listener(socket.AF_INET, "127.0.0.1")

    async def main():
        sock = await open_upstream("127.0.0.1", server.getsockname()[1], own)
        return sock, own.holds(sock.getsockname()[1], socket.AF_INET)

    sock, registered = asyncio.run(main())
    thread.join(5)
    assert registered
    assert seen == [sock.getsockname()[1]]
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
    assert len(own) == 0
    assert not own.mask.any()


def test_a_port_shared_by_two_sockets_stays_registered_until_both_go():
    own = OwnPorts()
    own.register(5000, socket.AF_INET)
    own.register(5000, socket.AF_INET)
    own.register(5000, socket.AF_INET6)
    own.unregister(5000, socket.AF_INET)
    assert own.holds(5000, socket.AF_INET)
    assert own.mask[5000] == 3
    own.unregister(5000, socket.AF_INET)
    assert not own.holds(5000, socket.AF_INET)
    assert own.holds(5000, socket.AF_INET6)
    assert own.mask[5000] == 2
    own.unregister(5000, socket.AF_INET6)
    assert own.mask[5000] == 0
    assert len(own) == 0


def test_reflector_filter_names_every_server_and_proxy_port():
    assert reflector_filter({443: 8443, 80: 8080}) == (
        "tcp and outbound and (tcp.DstPort == 80 or tcp.DstPort == 443 or tcp.SrcPort == 8080 or tcp.SrcPort == 8443)")


def test_no_other_socket_can_send_from_a_registered_port():
    """What makes the mask trustworthy: while an upstream socket holds its port, the
    kernel lets no other socket of that family bind it, whatever it asks for."""
    own = OwnPorts()
    server, seen, thread = listener(socket.AF_INET, "127.0.0.1")
    sock = connect_upstream("127.0.0.1", server.getsockname()[1], own)
    thread.join(5)
    port = sock.getsockname()[1]
    attempts = [("0.0.0.0", ()), ("127.0.0.1", ()), ("127.0.0.1", (socket.SO_REUSEADDR,)),
                ("0.0.0.0", (socket.SO_REUSEADDR, socket.SO_REUSEPORT))]
    for host, options in attempts:
        other = socket.socket()
        for option in options:
            other.setsockopt(socket.SOL_SOCKET, option, 1)
        with pytest.raises(OSError) as refused:
            other.bind((host, port))
        assert refused.value.errno == errno.EADDRINUSE, (host, options)
        other.close()
    # An IPv6-only socket may take the same number: the mask names IPv4 alone, so the
    # reflector would take that socket's connections like any client's.
    if ipv6_available():
        v6 = socket.socket(socket.AF_INET6)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::", port))
        assert own.holds(port, socket.AF_INET)
        assert not own.holds(port, socket.AF_INET6)
        v6.close()
    own.close(sock)
    server.close()



def test_the_swap_budget_allows_a_burst_then_one_per_period():
    from oisp.redirect.succession import SwapBudget

    now = [100.0]
    budget = SwapBudget(burst=3, every=2.0, clock=lambda: now[0])
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    assert budget.ready_in() == pytest.approx(2.0)
    now[0] += 1.0
    assert not budget.take()
    assert budget.ready_in() == pytest.approx(1.0)
    now[0] += 1.0
    assert budget.take()
    assert not budget.take()
    now[0] += 60.0  # a long quiet spell refills the burst, no more
    assert [budget.take() for _ in range(4)] == [True, True, True, False]


def test_the_dns_hold_does_not_wait_for_a_swap_the_budget_cannot_give_in_time():
    """An answer naming a new address waits for the filter only while a swap can come."""
    import threading

    from oisp.redirect import FlowTable, TargetSet
    from oisp.redirect.reflector import Reflector

    class Recording(threading.Condition):
        def wait_for(self, predicate, timeout=None):
            waited.append(timeout)
            return super().wait_for(predicate, 0)

    waited = []
    reflector = Reflector(TargetSet(), FlowTable(), OwnPorts())
    reflector.succession.covered_changed = Recording()
    # a swap may come: it waits
    assert not reflector.wait_covered(1, timeout=1.0)
    assert waited == [1.0]
    while reflector.succession.budget.take():
        pass
    assert not reflector.wait_covered(1, timeout=1.0)
    assert waited == [1.0, 0.0]
