"""The ring's reflect fast path (_native/reflect_fast.h) decides and rewrites exactly
as the Python reflector does, leaves to Python every packet that changes flow
state, and its flow table behaves like a set."""

from __future__ import annotations

import gc
import random
import socket
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

from oisp._native.ring import FastPath, ReceiveRing
from oisp.divert.address import IPV6, OUTBOUND, new_addresses, row_key
from oisp.redirect import FlowTable, OwnPorts, TargetSet
from oisp.redirect.reflector import Reflector
from tests.reflector_batch import SERVERS, Batch

SLOW, PASS, TO_PROXY, TO_CLIENT, PASS_OTHER = FastPath.SLOW, FastPath.PASS, FastPath.TO_PROXY, \
    FastPath.TO_CLIENT, FastPath.PASS_OTHER
CLIENT = {4: "10.200.1.1", 6: "fd00:1::1"}
OWN_PORT = 50000


def address(outbound: bool = True, v6: bool = False) -> bytes:
    a = new_addresses(1)
    a["bits"] = (OUTBOUND if outbound else 0) | (IPV6 if v6 else 0)
    return a.tobytes()


def fast_ring(flows=(), max_flows: int = 64) -> tuple[FastPath, OwnPorts]:
    own = OwnPorts()
    fast = ReceiveRing(0, 0, 0, 0, nslots=2).enable_fast({443: 8443}, own.mask, max_flows)
    for family in (socket.AF_INET, socket.AF_INET6):  # after enabling: the ring reads the live array
        own.register(OWN_PORT, family)
    for server, client_port in flows:
        assert fast.add(row_key(server), client_port, 8443)
    return fast, own


def layer(family):
    return IP if family == 4 else IPv6


@pytest.mark.parametrize("family", [4, 6])
def test_reflects_both_ways_with_valid_checksums(family):
    server, client = SERVERS[family][0], CLIENT[family]
    fast, _ = fast_ring([(server, 40000)])
    L = layer(family)
    # The client's data to the server lands on the proxy, from (server, client port).
    sent = L(src=client, dst=server) / TCP(sport=40000, dport=443, flags="PA", seq=7) / (b"hello" * 51)
    action, out, addr = fast.decide(bytes(sent), address(v6=family == 6))
    assert action == TO_PROXY
    got = L(out)
    assert (got.src, got.dst, got[TCP].sport, got[TCP].dport) == (server, client, 40000, 8443)
    assert bytes(got[TCP].payload) == b"hello" * 51
    assert got[TCP].seq == 7
    recomputed = L(out)
    del recomputed[TCP].chksum
    if family == 4:
        del recomputed.chksum
    assert L(bytes(recomputed))[TCP].chksum == got[TCP].chksum
    if family == 4:
        assert L(bytes(recomputed)).chksum == got.chksum
    assert np.frombuffer(addr, dtype=new_addresses(1).dtype)["bits"][0] & OUTBOUND == 0  # now inbound

    # The proxy's reply (to its peer, the server address + client port) goes back as the server's.
    reply = L(src=client, dst=server) / TCP(sport=8443, dport=40000, flags="A") / b"world"
    action, out, _ = fast.decide(bytes(reply), address(v6=family == 6))
    assert action == TO_CLIENT
    got = L(out)
    assert (got.src, got.dst, got[TCP].sport, got[TCP].dport) == (server, client, 443, 40000)
    recomputed = L(out)
    del recomputed[TCP].chksum
    assert L(bytes(recomputed))[TCP].chksum == got[TCP].chksum


@pytest.mark.parametrize("family", [4, 6])
def test_fins_and_rsts_are_reflected_and_reported(family):
    server, client = SERVERS[family][0], CLIENT[family]
    fast, _ = fast_ring([(server, 40000)])
    L, v6 = layer(family), family == 6
    key = (row_key(server), 40000, 8443)
    fin_c, fin_p, rst = FastPath.FIN_CLIENT, FastPath.FIN_PROXY, FastPath.RST
    # bits of their own
    assert len({fin_c, fin_p, rst}) == 3
    assert not (fin_c & fin_p or fin_c & rst or fin_p & rst)
    for flags, action, sport, dport, ends in (("FA", TO_PROXY, 40000, 443, fin_c), ("F", TO_PROXY, 40000, 443, fin_c),
                                              ("FA", TO_CLIENT, 8443, 40000, fin_p), ("R", TO_PROXY, 40000, 443, rst),
                                              ("RA", TO_CLIENT, 8443, 40000, rst)):
        packet = bytes(L(src=client, dst=server) / TCP(sport=sport, dport=dport, flags=flags))
        assert fast.decide(packet, address(v6=v6))[0] == action, flags
        assert fast.take_ends(*key) == ends
        assert fast.take_ends(*key) == 0
    fin_client = bytes(L(src=client, dst=server) / TCP(sport=40000, dport=443, flags="FA"))
    fin_proxy = bytes(L(src=client, dst=server) / TCP(sport=8443, dport=40000, flags="FA"))
    fast.decide(fin_client, address(v6=v6))
    fast.decide(fin_proxy, address(v6=v6))
    assert fast.take_touched() == [(key, fin_c | fin_p)]  # both FINs, collected once
    assert fast.take_touched() == []
    syn_ack = bytes(L(src=client, dst=server) / TCP(sport=8443, dport=40000, flags="SA"))
    assert fast.decide(syn_ack, address(v6=v6))[0] == TO_CLIENT  # no state in it


@pytest.mark.parametrize("family", [4, 6])
def test_leaves_clients_syns_unknown_flows_and_odd_packets_to_python(family):
    server, other, client = SERVERS[family][0], SERVERS[family][1], CLIENT[family]
    fast, _ = fast_ring([(server, 40000)])
    L, v6 = layer(family), family == 6
    for flags in ("S", "SA"):  # Python opens flows (and applies the process filter)
        packet = bytes(L(src=client, dst=server) / TCP(sport=40000, dport=443, flags=flags))
        assert fast.decide(packet, address(v6=v6))[0] == SLOW, flags
    known = L(src=client, dst=server) / TCP(sport=40000, dport=443, flags="A")
    assert fast.decide(bytes(known), address(outbound=False, v6=v6))[0] == SLOW  # inbound
    for packet in (L(src=client, dst=other) / TCP(sport=40000, dport=443, flags="A"),  # unknown server
                   L(src=client, dst=server) / TCP(sport=40001, dport=443, flags="A"),  # unknown port
                   L(src=client, dst=server) / TCP(sport=40000, dport=80, flags="A"),  # not redirected
                   L(src=client, dst=server) / TCP(sport=8443, dport=40001, flags="A")):  # reply, no flow
        assert fast.decide(bytes(packet), address(v6=v6))[0] == SLOW
    raw = bytes(known)
    assert fast.decide(raw[:-1], address(v6=v6))[0] == SLOW  # length disagrees with the header
    assert fast.decide(raw + b"\0", address(v6=v6))[0] == SLOW
    if family == 4:
        fragment = IP(src=client, dst=server, flags="MF") / TCP(sport=40000, dport=443, flags="A")
        assert fast.decide(bytes(fragment), address())[0] == SLOW
    else:
        extension = IPv6(src=client, dst=server) / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=443, flags="A")
        assert fast.decide(bytes(extension), address(v6=True))[0] == SLOW


@pytest.mark.parametrize("family", [4, 6])
def test_with_the_targets_loaded_other_addresses_pass_in_c(family):
    server, other, client = SERVERS[family][0], SERVERS[family][1], CLIENT[family]
    L, v6 = layer(family), family == 6
    fast, _ = fast_ring([(server, 40000)])
    to_other = bytes(L(src=client, dst=other) / TCP(sport=40000, dport=443, flags="PA") / b"not ai")
    assert fast.decide(to_other, address(v6=v6))[0] == SLOW  # no targets yet: Python decides
    fast.add_targets([row_key(server)], enable=True)
    assert fast.targets == 1
    assert fast.flows() == 1
    for flags in ("S", "PA", "FA", "R"):
        packet = bytes(L(src=client, dst=other) / TCP(sport=40000, dport=443, flags=flags))
        addr = address(v6=v6)
        assert fast.decide(packet, addr) == (PASS_OTHER, packet, addr), flags
    for flags in ("S", "PA"):  # an AI address: a SYN opens in Python, an unknown flow is Python's too
        packet = bytes(L(src=client, dst=server) / TCP(sport=40001, dport=443, flags=flags))
        assert fast.decide(packet, address(v6=v6))[0] == SLOW, flags
    known = bytes(L(src=client, dst=server) / TCP(sport=40000, dport=443, flags="PA"))
    assert fast.decide(known, address(v6=v6))[0] == TO_PROXY
    no_flow = bytes(L(src=client, dst=other) / TCP(sport=8443, dport=40000, flags="A"))
    assert fast.decide(no_flow, address(v6=v6))[0] == SLOW  # from the proxy port: never passed blind


def syn_ring(max_flows: int = 64) -> FastPath:
    fast, _ = fast_ring(max_flows=max_flows)
    fast.add_targets([row_key(SERVERS[4][0]), row_key(SERVERS[6][0])], enable=True)
    fast.open_syns(True)
    return fast


@pytest.mark.parametrize("family", [4, 6])
def test_opens_flows_on_clients_syns_and_reports_each_once(family):
    """With open_syns a client's SYN to an AI address is reflected at once (the same bytes
    as the Python reflector makes) and queued for Python; a retransmission is not a new
    flow, a SYN on the port of a closed one is."""
    server, client = SERVERS[family][0], CLIENT[family]
    L, v6 = layer(family), family == 6
    fast = syn_ring()
    python = Reflector(TargetSet([server]), FlowTable(), OwnPorts())
    before = time.time()
    syn = bytes(L(src=client, dst=server) / TCP(sport=40000, dport=443, flags="S", seq=99))
    action, out, addr = fast.decide(syn, address(v6=v6))
    batch = Batch([syn], [True])
    batch.addresses["bits"] |= IPV6 if v6 else 0
    python.process(batch)
    assert action == TO_PROXY
    assert out == batch.data.tobytes()
    assert addr == batch.addresses.tobytes()
    [(server_key, client_key, client_port, proxy_port, server_port, version, created)] = fast.take_opened()
    assert (server_key, client_key, client_port, proxy_port, server_port, version) == \
        (row_key(server), row_key(client), 40000, 8443, 443, family)
    assert before - 0.01 <= created <= time.time() + 0.01
    assert fast.opened == (1, 0)
    assert fast.flows() == 1

    def syn_again(port=40000):
        return fast.decide(bytes(L(src=client, dst=server) / TCP(sport=port, dport=443, flags="S")),
                                address(v6=v6))[0]

    # retransmitted
    assert syn_again() == TO_PROXY
    assert fast.take_opened() == []
    key = (row_key(server), 40000, 8443)
    for ending in (("FA", "FA"), ("R",), ("closed by python",)):
        for i, flags in enumerate(ending):
            if flags == "closed by python":
                fast.mark_closed(*key)
                continue
            sport, dport = (40000, 443) if i == 0 else (8443, 40000)
            assert fast.decide(bytes(L(src=client, dst=server) / TCP(sport=sport, dport=dport, flags=flags)),
                                    address(v6=v6))[0] in (TO_PROXY, TO_CLIENT)
        assert syn_again() == TO_PROXY
        assert [o[2] for o in fast.take_opened()] == [40000], ending  # a new connection on the port
        assert fast.take_ends(*key) == 0  # the old connection's ends went with it
    half = bytes(L(src=client, dst=server) / TCP(sport=40000, dport=443, flags="FA"))
    fast.decide(half, address(v6=v6))
    # half-closed is not closed
    assert syn_again() == TO_PROXY
    assert fast.take_opened() == []
    # Python opened a new connection on the port itself (e.g. with the queue full): forget the old.
    fast.mark_closed(*key)
    assert fast.add(*key, reopen=True)
    assert syn_again() == TO_PROXY
    assert fast.take_opened() == []
    fast.mark_closed(*key)
    assert fast.add(*key)  # without reopen the ring keeps what it saw
    assert syn_again() == TO_PROXY
    assert len(fast.take_opened()) == 1


@pytest.mark.parametrize("family", [4, 6])
def test_syns_the_ring_must_not_open_go_to_python(family):
    server, other, client = SERVERS[family][0], SERVERS[family][1], CLIENT[family]
    L, v6 = layer(family), family == 6
    fast = syn_ring()
    syn_ack = bytes(L(src=client, dst=server) / TCP(sport=40000, dport=443, flags="SA"))
    assert fast.decide(syn_ack, address(v6=v6))[0] == SLOW  # not a client's opening SYN
    to_other = bytes(L(src=client, dst=other) / TCP(sport=40000, dport=443, flags="S"))
    assert fast.decide(to_other, address(v6=v6))[0] == PASS_OTHER
    fast.open_syns(False)  # a process filter: Python decides
    syn = bytes(L(src=client, dst=server) / TCP(sport=40000, dport=443, flags="S"))
    assert fast.decide(syn, address(v6=v6))[0] == SLOW
    assert fast.opened == (0, 0)
    assert fast.flows() == 0


def test_a_full_queue_or_table_leaves_the_syn_to_python():
    queue = FastPath.OPENED_MAX
    fast = syn_ring(max_flows=queue + 100)
    server = SERVERS[4][0]

    def syn(port):
        packet = bytes(IP(src=CLIENT[4], dst=server) / TCP(sport=port, dport=443, flags="S"))
        return fast.decide(packet, address())[0]

    assert [syn(20000 + i) for i in range(queue)] == [TO_PROXY] * queue
    # the queue is full
    assert syn(30000) == SLOW
    assert fast.opened == (queue, queue)
    assert syn(20000) == TO_PROXY  # a retransmission needs no room
    opened = fast.take_opened()
    assert [o[2] for o in opened] == list(range(20000, 20000 + queue))  # oldest first
    assert syn(30000) == TO_PROXY
    assert fast.opened == (queue + 1, 1)
    small = syn_ring(max_flows=4)  # 16 slots (the least), at most 8 entries: 2 targets + 6 flows
    packets = [bytes(IP(src=CLIENT[4], dst=server) / TCP(sport=p, dport=443, flags="S")) for p in range(1, 8)]
    assert [small.decide(p, address())[0] for p in packets] == [TO_PROXY] * 6 + [SLOW]
    assert len(small.take_opened()) == 6


def test_a_full_table_turns_the_target_shortcut_off_for_good():
    # Room for 8 entries.
    fast = ReceiveRing(0, 0, 0, 0, nslots=2).enable_fast({443: 8443}, np.zeros(65536, dtype=bool), 8)
    fast.add_targets([row_key(f"10.1.0.{i}") for i in range(8)], enable=True)
    other = bytes(IP(src="10.9.9.9", dst="10.2.0.1") / TCP(sport=40000, dport=443, flags="A"))
    assert fast.decide(other, address())[0] == PASS_OTHER
    fast.add_targets([row_key("10.1.0.8")])  # does not fit: an AI address the table cannot hold
    assert fast.targets_failed
    assert fast.decide(other, address())[0] == SLOW
    fast.add_targets([], enable=True)
    assert fast.decide(other, address())[0] == SLOW


def test_passes_the_proxys_own_upstream_unchanged():
    fast, own = fast_ring()
    addr = address()
    for flags in ("S", "FA", "R"):  # no flow state to keep for our own connections
        packet = bytes(IP(src="10.200.1.1", dst="10.200.1.2") / TCP(sport=OWN_PORT, dport=443, flags=flags))
        assert fast.decide(packet, addr) == (PASS, packet, addr)
    packet = bytes(IP(src="10.200.1.1", dst="10.200.1.2") / TCP(sport=OWN_PORT, dport=443, flags="PA") / b"x")
    assert fast.decide(packet, addr) == (PASS, packet, addr)
    own.unregister(OWN_PORT, socket.AF_INET)
    assert fast.decide(packet, addr)[0] == SLOW  # the ring reads the registry live
    # Still ours in IPv6 alone: an IPv4 socket on the same number is someone else's.
    v6 = bytes(IPv6(src=CLIENT[6], dst=SERVERS[6][0]) / TCP(sport=OWN_PORT, dport=443, flags="PA") / b"x")
    assert fast.decide(v6, address(v6=True))[0] == PASS
    own.register(OWN_PORT, socket.AF_INET)
    own.unregister(OWN_PORT, socket.AF_INET6)
    assert fast.decide(v6, address(v6=True))[0] == SLOW
    assert fast.decide(packet, addr)[0] == PASS


@pytest.mark.parametrize("seed", range(10))
def test_same_bytes_as_the_python_reflector(seed):
    """Random traffic over flows the Python reflector opened: every packet the fast path
    takes comes out byte for byte as the Python path makes it, address bits included."""
    rng = random.Random(seed)
    own = OwnPorts()
    own.register(OWN_PORT, socket.AF_INET)  # IPv4 alone: IPv6 packets from it are a client's
    python = Reflector(TargetSet([SERVERS[4][0], SERVERS[6][0]]), FlowTable(), own)
    fast = ReceiveRing(0, 0, 0, 0, nslots=2).enable_fast({443: 8443}, own.mask, 64)
    fast.add_targets(python.targets.keys(), enable=True)
    python.flows.on_open = lambda entry: fast.add(*entry.key)
    python.flows.on_remove = lambda entry: fast.remove(*entry.key)
    for family in (4, 6):  # open the flows the Python way: a SYN each
        for port in (40000, 40001):
            syn = layer(family)(src=CLIENT[family], dst=SERVERS[family][0]) / TCP(sport=port, dport=443, flags="S")
            python.process(Batch([bytes(syn)], [True]))
    assert len(python.flows) == 4
    assert fast.flows() == 4
    taken = 0
    for _ in range(400):
        family = rng.choice((4, 6))
        server = rng.choice(SERVERS[family])
        port = rng.choice((40000, 40001, 40002, OWN_PORT))
        flags = rng.choice(("A", "PA", "A", "PA", "FA", "R", "SA"))
        payload = b"y" * rng.randrange(0, 300)
        if rng.random() < 0.5:
            packet = layer(family)(src=CLIENT[family], dst=server) / TCP(sport=port, dport=443, flags=flags) / payload
        else:
            packet = layer(family)(src=CLIENT[family], dst=server) / TCP(sport=8443, dport=port, flags=flags) / payload
        raw, v6 = bytes(packet), family == 6
        action, fast_bytes, fast_addr = fast.decide(raw, address(v6=v6))
        if action == SLOW:
            continue
        taken += 1
        batch = Batch([raw], [True])
        batch.addresses["bits"] |= IPV6 if v6 else 0
        python.process(batch)
        assert fast_bytes == batch.data.tobytes()
        assert fast_addr == batch.addresses.tobytes()
    assert taken > 50  # the test exercised the fast path


def test_flow_table_is_a_set_under_collisions():
    """A small table (16 slots, 8 flows) with adds and removes in random order answers
    like a Python set; backward-shift deletion keeps every other member findable."""
    rng = random.Random(3)
    fast = ReceiveRing(0, 0, 0, 0, nslots=2).enable_fast({443: 8443}, np.zeros(65536, dtype=bool), 8)
    members: set = set()
    keys = [(row_key(f"10.0.0.{i}"), 40000 + j, 8443) for i in range(4) for j in range(6)]
    for _ in range(5000):
        key = rng.choice(keys)
        if rng.random() < 0.5:
            added = fast.add(*key)
            if key in members or len(members) < 8:
                assert added
                members.add(key)
            else:
                assert not added  # full: the flow stays with Python
        else:
            assert fast.remove(*key) == (key in members)
            members.discard(key)
        assert fast.flows() == len(members)
    for key in keys:  # membership as seen by a packet lookup
        server = ".".join(str(b) for b in key[0][:4])
        packet = bytes(IP(src="10.9.9.9", dst=server) / TCP(sport=key[1], dport=443, flags="A"))
        assert (fast.decide(packet, address())[0] == TO_PROXY) == (key in members)


def test_touched_flows_are_reported_once():
    fast, _ = fast_ring([("10.200.1.2", 40000), ("10.200.1.2", 40001)])
    assert fast.take_touched() == []
    packet = bytes(IP(src="10.200.1.1", dst="10.200.1.2") / TCP(sport=40001, dport=443, flags="A"))
    fast.decide(packet, address())
    assert fast.take_touched() == [((row_key("10.200.1.2"), 40001, 8443), 0)]
    assert fast.take_touched() == []


@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.booleans())
def test_any_bytes_are_decided_without_harm(data, v6):
    fast, _ = fast_ring([("10.200.1.2", 40000)])
    action, out, _ = fast.decide(data, address(v6=v6))
    assert action in (SLOW, PASS, TO_PROXY, TO_CLIENT)
    assert len(out) == len(data)
    if action == SLOW:
        assert out == data


def test_api_errors_are_clear():
    ring = ReceiveRing(0, 0, 0, 0, nslots=2)
    assert ring.fast is None
    with pytest.raises(ValueError, match="not enabled"):
        FastPath(ring)
    with pytest.raises(ValueError, match="65536"):
        ring.enable_fast({443: 8443}, np.zeros(10, dtype=bool), 8)
    with pytest.raises(ValueError, match="port pair"):
        ring.enable_fast({443: 0}, np.zeros(65536, dtype=bool), 8)
    fast = ring.enable_fast({443: 8443}, np.zeros(65536, dtype=bool), 8)
    with pytest.raises(ValueError, match="16 bytes"):
        fast.add(b"\1\2\3\4", 1, 8443)
    with pytest.raises(ValueError, match="already"):
        ring.enable_fast({443: 8443}, np.zeros(65536, dtype=bool), 8)
    # one table, however reached
    assert ring.fast.add(row_key("10.0.0.1"), 1, 8443)
    assert fast.flows() == 1


def test_the_fast_path_reads_the_address_bits_python_writes():
    """The C copy of the WINDIVERT_ADDRESS layout agrees with oisp.divert.address, and the
    own-port bits with OwnPorts (which takes them from FastPath)."""
    assert FastPath.OUTBOUND == OUTBOUND
    own = OwnPorts()
    own.register(OWN_PORT, socket.AF_INET6)
    assert own.mask[OWN_PORT] == FastPath.OWN_IPV6
    assert FastPath.OWN_IPV4 != FastPath.OWN_IPV6


def test_the_fast_path_keeps_its_ring_alive():
    """A FastPath is a view of its ring's table and lock: holding it must keep both."""
    fast = ReceiveRing(0, 0, 0, 0, nslots=2).enable_fast({443: 8443}, np.zeros(65536, dtype=bool), 8)
    gc.collect()
    assert fast.add(row_key("10.0.0.1"), 1, 8443)
    assert fast.flows() == 1
    assert fast.ring.fast.flows() == 1
