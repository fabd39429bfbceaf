"""parse_batch / split_batch against scapy's own dissection of the same bytes."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, _IPv6ExtHdr, fragment6
from scapy.packet import Raw, raw

from oisp.packet import OK, PACKET_DTYPE, parse_batch, split_batch
from tests.packet_strategies import packets


def scapy_expectations(data: bytes) -> dict:
    """The row fields scapy's dissection implies for one packet's bytes."""
    pkt = IP(data) if data[0] >> 4 == 4 else IPv6(data)
    header = pkt
    while isinstance(header.payload, _IPv6ExtHdr):
        header = header.payload
    upper = header.payload
    expected = {
        "length": len(data),
        "status": OK,
        "ip_version": pkt.version,
        "ip_header_len": len(data) - len(raw(upper)),
        "src_addr": ipaddress.ip_address(pkt.src).packed.ljust(16, b"\0"),
        "dst_addr": ipaddress.ip_address(pkt.dst).packed.ljust(16, b"\0"),
        "src_port": 0,
        "dst_port": 0,
        "tcp_flags": 0,
        "seq": 0,
        "ack": 0,
        "window": 0,
        "icmp_type": 0,
        "icmp_code": 0,
        "is_fragment": 0,
    }
    if pkt.version == 4:
        expected.update(protocol=pkt.proto, ttl=pkt.ttl, tos=pkt.tos, ip_id=pkt.id, ip_checksum=pkt.chksum)
    else:
        expected.update(protocol=header.nh, ttl=pkt.hlim, tos=pkt.tc, flow_label=pkt.fl)
    expected["l4_offset"] = expected["ip_header_len"]
    if isinstance(upper, TCP):
        expected.update(
            src_port=upper.sport, dst_port=upper.dport, seq=upper.seq, ack=upper.ack,
            tcp_flags=int(upper.flags), window=upper.window, l4_header_len=upper.dataofs * 4,
            l4_checksum=upper.chksum,
        )
    elif isinstance(upper, UDP):
        expected.update(src_port=upper.sport, dst_port=upper.dport, l4_header_len=8, l4_checksum=upper.chksum)
    elif expected["protocol"] in (1, 58):
        expected.update(icmp_type=data[expected["l4_offset"]], icmp_code=data[expected["l4_offset"] + 1], l4_header_len=8)
        if isinstance(upper, ICMP):
            expected.update(icmp_type=upper.type, icmp_code=upper.code, l4_checksum=upper.chksum)
    else:
        expected["l4_header_len"] = 0
    expected["payload_offset"] = expected["l4_offset"] + expected["l4_header_len"]
    expected["payload_len"] = len(data) - expected["payload_offset"]
    return expected


def assert_row_matches(row, expected: dict) -> None:
    for name, value in expected.items():
        got = bytes(row[name]) if name.endswith("_addr") else int(row[name])
        assert got == value, f"{name}: parsed {got!r}, scapy says {value!r}"


@settings(max_examples=300, deadline=None)
@given(st.lists(packets(), min_size=1, max_size=6))
def test_batch_fields_equal_scapy(pkts):
    datas = [raw(p) for p in pkts]
    batch = np.frombuffer(b"".join(datas), np.uint8)  # exactly sized, read-only
    rows = parse_batch(batch)
    assert len(rows) == len(datas)
    offset = 0
    for row, data in zip(rows, datas):
        assert int(row["offset"]) == offset
        assert_row_matches(row, scapy_expectations(data))
        offset += len(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(packets(), min_size=1, max_size=6))
def test_split_batch_gives_the_packet_boundaries(pkts):
    datas = [raw(p) for p in pkts]
    offsets, lengths = split_batch(bytearray(b"".join(datas)))
    assert lengths.tolist() == [len(d) for d in datas]
    assert offsets.tolist() == np.cumsum([0] + [len(d) for d in datas[:-1]]).tolist()


def test_accepts_every_buffer_kind_and_reuses_out():
    data = raw(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1000, dport=443) / (b"x" * 7)) * 3
    out = np.zeros(8, PACKET_DTYPE)
    views = [data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)]
    results = [parse_batch(v) for v in views] + [parse_batch(data, out=out)]
    for rows in results:
        assert rows["dst_port"].tolist() == [443, 443, 443]
        assert rows["offset"].tolist() == [0, 47, 94]
    assert np.shares_memory(results[-1], out)


def test_max_packets_and_out_capacity_bound_the_rows():
    data = raw(IPv6(src="::1", dst="::2") / UDP(sport=1, dport=2)) * 300
    assert len(parse_batch(data)) == 255
    assert len(parse_batch(data, max_packets=300)) == 300
    assert len(parse_batch(data, max_packets=300, out=np.empty(10, PACKET_DTYPE))) == 10
    assert len(parse_batch(data, max_packets=0)) == 0
    assert len(split_batch(data)[0]) == 255


def test_ipv4_fragments_carry_fragment_fields():
    original = IP(src="1.1.1.1", dst="2.2.2.2", id=777) / UDP(sport=53, dport=5353) / (b"z" * 3000)
    frags = fragment(original, fragsize=1000)
    rows = parse_batch(b"".join(raw(f) for f in frags))
    assert len(rows) == len(frags) > 1
    for row, frag in zip(rows, frags):
        assert int(row["status"]) == OK
        assert int(row["is_fragment"]) == 1
        assert int(row["ip_id"]) == 777
        assert int(row["frag_offset"]) == frag.frag * 8
        assert int(row["more_fragments"]) == int(frag.flags.MF)
        assert int(row["l4_checksum_ok"]) == -1  # covers bytes this fragment lacks
        assert int(row["ip_checksum_ok"]) == 1
    assert (int(rows[0]["src_port"]), int(rows[0]["dst_port"])) == (53, 5353)
    assert int(rows[1]["l4_header_len"]) == 0
    assert int(rows[1]["src_port"]) == 0
    assert int(rows[1]["payload_offset"]) == 20


def test_ipv6_fragments_carry_fragment_fields():
    original = IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(id=0xABCDEF) / TCP(sport=7, dport=8) / (b"q" * 3000)
    frags = fragment6(original, 1280)
    rows = parse_batch(b"".join(raw(f) for f in frags))
    assert len(rows) == len(frags) > 1
    for row, frag in zip(rows, frags):
        header = frag[IPv6ExtHdrFragment]
        assert int(row["status"]) == OK
        assert int(row["is_fragment"]) == 1
        assert int(row["protocol"]) == 6
        assert int(row["ip_id"]) == 0xABCDEF
        assert int(row["frag_offset"]) == header.offset * 8
        assert int(row["more_fragments"]) == header.m
        assert int(row["ip_header_len"]) == 48
    assert (int(rows[0]["src_port"]), int(rows[0]["dst_port"])) == (7, 8)
    assert int(rows[-1]["l4_header_len"]) == 0


def test_udp_payload_ends_at_the_udp_length_not_at_link_padding():
    data = raw(IP(src="1.2.3.4", dst="5.6.7.8") / UDP(sport=1, dport=2) / b"abc")
    padded = bytearray(data + b"\0\0\0")
    padded[2:4] = len(padded).to_bytes(2, "big")  # IP length now covers 3 pad bytes
    row = parse_batch(padded, verify=False)[0]
    assert int(row["length"]) == len(padded)
    assert int(row["payload_len"]) == 3


@pytest.mark.parametrize("nh", [59, 50])
def test_ipv6_upper_layers_we_do_not_parse(nh):
    data = raw(IPv6(src="::1", dst="::2", nh=nh) / Raw(b"\x01" * 9))
    row = parse_batch(data)[0]
    assert int(row["status"]) == OK
    assert (int(row["protocol"]), int(row["l4_header_len"]), int(row["payload_len"])) == (nh, 0, 9)
    assert int(row["l4_checksum_ok"]) == -1


def test_ipv6_authentication_header_length_counts_4_octet_units():
    # RFC 4302: AH length is in 4-octet units minus 2 (unlike the other extension headers).
    udp = raw(UDP(sport=500, dport=4500, len=8, chksum=0))
    ah = bytes([17, 4, 0, 0]) + b"\x11" * 4 + b"\x22" * 4 + b"\x33" * 12  # (4 + 2) * 4 = 24 bytes
    data = raw(IPv6(src="::1", dst="::2", nh=51, plen=len(ah) + len(udp))) + ah + udp
    row = parse_batch(data)[0]
    assert int(row["status"]) == OK
    assert (int(row["protocol"]), int(row["ip_header_len"])) == (17, 64)
    assert (int(row["src_port"]), int(row["dst_port"])) == (500, 4500)
