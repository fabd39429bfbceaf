"""The `Packet` view: attributes read and write the buffer in place; scapy is the reference."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from oisp.packet import Packet, parse_batch
from tests.packet_strategies import packets
from tests.scapy_reference import scapy_rewritten


@settings(max_examples=150, deadline=None)
@given(packets())
def test_reads_equal_scapy(pkt):
    data = raw(pkt)
    view = Packet(data)
    ref = IP(data) if view.ip_version == 4 else IPv6(data)
    assert view.src_addr == ipaddress.ip_address(ref.src)
    assert view.dst_addr == ipaddress.ip_address(ref.dst)
    assert view.ttl == (ref.ttl if view.ip_version == 4 else ref.hlim)
    assert view.checksums_valid
    assert len(view) == len(data)
    tcp, udp = ref.getlayer(TCP), ref.getlayer(UDP)
    if tcp is not None:
        assert (view.src_port, view.dst_port, view.seq_num, view.ack_num) == (tcp.sport, tcp.dport, tcp.seq, tcp.ack)
        assert view.tcp_flags == int(tcp.flags)
        assert (view.syn, view.ack, view.fin, view.rst, view.psh) == tuple(
            bool(int(tcp.flags) & bit) for bit in (0x02, 0x10, 0x01, 0x04, 0x08)
        )
        assert bytes(view.payload) == bytes(tcp.payload)
    elif udp is not None:
        assert (view.src_port, view.dst_port, view.tcp_flags, view.syn) == (udp.sport, udp.dport, None, None)
        assert bytes(view.payload) == bytes(udp.payload)
    else:
        assert view.src_port is None
        assert view.seq_num is None


@settings(max_examples=150, deadline=None)
@given(packets(), st.integers(1, 0xFFFF), st.integers(0, 0xFF))
def test_writes_update_checksums_like_scapy(pkt, port, ttl):
    buf = bytearray(raw(pkt))
    view = Packet(buf)
    spec = {"swap_addresses": True}
    view.src_addr, view.dst_addr = view.dst_addr, view.src_addr
    if view.src_port is not None:
        view.dst_port = port
        spec["dst_port"] = port
    view.ttl = ttl
    ref = pkt.copy()
    if view.ip_version == 4:
        ref.ttl = ttl
    else:
        ref.hlim = ttl
    assert bytes(buf) == scapy_rewritten(ref, spec)
    assert view.checksums_valid


def test_tcp_flag_setters_keep_the_checksum_right():
    pkt = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="S") / b"hi"
    buf = bytearray(raw(pkt))
    view = Packet(buf)
    view.syn, view.ack, view.fin = False, True, True
    pkt[TCP].flags = "FA"
    assert bytes(buf) == raw(pkt)
    with pytest.raises(AttributeError):
        Packet(bytearray(raw(IP() / UDP()))).syn = True


def test_a_view_over_a_batch_edits_the_batch():
    first = raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    second = raw(IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=3, dport=443))
    buf = bytearray(first + second)
    rows = parse_batch(buf)
    view = Packet.from_row(buf, rows[1])
    view.dst_port = 8443
    assert parse_batch(buf)[1]["dst_port"] == 8443
    assert bytes(buf[: len(first)]) == first
    assert Packet(buf, offset=len(first)).dst_port == 8443


def test_recalculate_checksums_and_checksums_valid():
    buf = bytearray(raw(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(chksum=1) / b"x"))
    view = Packet(buf)
    assert not view.checksums_valid
    view.recalculate_checksums()
    assert view.checksums_valid
    assert view.icmp_type == 8
    assert view.icmp_code == 0


def test_repr_names_the_flow():
    view = Packet(raw(IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=5, dport=443, flags="SA")))
    assert repr(view) == "<Packet IPv6 TCP [fd00::1]:5 -> [fd00::2]:443 flags=SA len=60>"
    view = Packet(raw(IP(src="1.2.3.4", dst="5.6.7.8") / ICMP(type=3, code=1)))
    assert repr(view) == "<Packet IPv4 ICMP 1.2.3.4 -> 5.6.7.8 type=3 code=1 len=28>"


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="not a parseable IP packet"):
        Packet(b"\x45" + b"\0" * 5)
    with pytest.raises(ValueError, match="empty"):
        Packet(b"")
    with pytest.raises(ValueError, match="outside"):
        Packet(b"\0" * 10, offset=5, length=10)
    view = Packet(raw(IP(src="1.1.1.1", dst="2.2.2.2") / TCP()))  # bytes: read-only
    with pytest.raises(BufferError):
        view.dst_port = 1
