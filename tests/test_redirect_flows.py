"""The flow table: keys as the proxy sees them, expiry on FIN/RST and idle, the size bound, threads."""

import ipaddress
import threading

from oisp.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from oisp.redirect.flows import FlowEntry, FlowTable, row_key

SERVER4, SERVER6 = ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("fd00::2")


def entry(client_port=40000, server=SERVER4, proxy_port=8443, pid=7):
    client = ipaddress.ip_address("10.0.0.1" if server.version == 4 else "fd00::1")
    return FlowEntry(client, client_port, server, 443, proxy_port, pid, "python")


def test_lookup_uses_the_accepted_sockets_peer_and_local_port():
    table = FlowTable()
    table.open(entry())
    table.open(entry(server=SERVER6, client_port=40001))
    found = table.lookup("10.0.0.2", 40000, 8443)
    assert (found.server_addr, found.server_port, found.pid) == (SERVER4, 443, 7)
    assert table.lookup("fd00::2", 40001, 8443).server_addr == SERVER6
    assert table.lookup("10.0.0.2", 40000, 8080) is None
    assert table.lookup("10.0.0.3", 40000, 8443) is None


def test_lookup_names_the_owner_late_when_the_reflector_could_not():
    table = FlowTable(owner=lambda addr, port, server, server_port, since=None: (99, "node") if port == 40000 else (None, None))
    table.open(entry(pid=None))
    found = table.lookup(SERVER4, 40000, 8443)
    assert (found.pid, found.process_name) == (99, "node")


def test_fin_in_both_directions_ends_the_flow_after_the_linger():
    table = FlowTable(linger=2.0)
    key = table.open(entry()).key
    table.seen(key, TCP_FIN | TCP_ACK, from_client=True, now=100.0)
    assert table.get(key).closed_at is None  # half-closed: the proxy still sends
    table.seen(key, TCP_FIN | TCP_ACK, from_client=False, now=101.0)
    assert table.get(key).closed_at == 101.0
    assert table.expire(now=102.5) == 0  # the last ACK is still reflected
    assert table.expire(now=103.5) == 1
    assert len(table) == 0
    assert table.counts["closed"] == 1


def test_rst_from_either_side_ends_the_flow():
    for from_client in (True, False):
        table = FlowTable(linger=0.5)
        key = table.open(entry()).key
        table.seen(key, TCP_RST, from_client=from_client, now=10.0)
        assert table.expire(now=10.6) == 1


def test_idle_flows_expire():
    table = FlowTable(idle_timeout=30.0)
    key = table.open(entry()).key
    table.seen(key, TCP_ACK, from_client=True, now=1000.0)
    assert table.expire(now=1029.0) == 0
    assert table.expire(now=1031.0) == 1
    assert table.counts["expired_idle"] == 1


def test_a_new_syn_replaces_a_finished_flow_with_the_same_key():
    table = FlowTable()
    key = table.open(entry(pid=1)).key
    table.seen(key, TCP_RST, from_client=True)
    table.open(entry(pid=2))
    assert table.get(key).pid == 2
    assert table.get(key).closed_at is None
    assert len(table) == 1


def test_size_bound_evicts_the_least_recently_seen_and_counts_it():
    table = FlowTable(max_flows=3)
    keys = [table.open(entry(client_port=p)).key for p in (1, 2, 3)]
    table.seen(keys[0], TCP_ACK, from_client=True)  # 1 is now the most recent
    table.open(entry(client_port=4))
    assert len(table) == 3
    assert table.counts["evicted"] == 1
    assert table.get(keys[1]) is None
    assert table.get(keys[0]) is not None


def test_seen_ignores_unknown_flows():
    assert FlowTable().seen((row_key("10.0.0.2"), 1, 8443), TCP_SYN, from_client=True) is None


def test_concurrent_writers_and_readers_agree():
    """Two writers and a reader race on one table: every entry found is whole (the server
    port each writer derived from the client port, under the key that was asked for),
    no thread raises or hangs, and the size bound holds."""
    table = FlowTable(max_flows=500)
    wrong, raised = [], []

    def server_port_of(client_port):
        return 1000 + client_port % 600

    def writer(base):
        for i in range(2000):
            client_port = base + i % 600
            flow = FlowEntry(ipaddress.ip_address("10.0.0.1"), client_port, SERVER4, server_port_of(client_port),
                             8443, 7, "python")
            key = table.open(flow).key
            table.seen(key, TCP_ACK, from_client=True)
            if i % 50 == 0:
                table.expire()

    def reader():
        for i in range(4000):
            port = 10000 + i % 600
            found = table.lookup(SERVER4, port, 8443)
            if found is not None and (found.client_port, found.server_port) != (port, server_port_of(port)):
                wrong.append(found)

    def guarded(fn, *args):
        def run():
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                raised.append(e)
        return run

    threads = [threading.Thread(target=guarded(writer, 10000)), threading.Thread(target=guarded(writer, 10000)),
               threading.Thread(target=guarded(reader))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not [t for t in threads if t.is_alive()], "a thread deadlocked"
    assert not raised
    assert not wrong
    assert len(table) <= 500


def test_a_flow_the_proxy_holds_open_never_idles_out():
    """A pooled keep-alive connection sits idle longer than any packet timeout: while the
    proxy holds it, its flow stays; once released, it idles out from the release."""
    table = FlowTable(idle_timeout=1.0)
    held = table.open(entry())
    held.last_seen = 0.0
    table.hold(held)
    idle = table.open(entry(client_port=40001))
    idle.last_seen = 0.0
    assert table.expire(now=100.0) == 1
    assert table.get(held.key) is held
    assert table.get(idle.key) is None
    table.release(held, now=100.0)
    assert table.expire(now=100.5) == 0
    assert table.expire(now=101.0) == 1
    assert table.get(held.key) is None
    assert table.counts["expired_idle"] == 2
