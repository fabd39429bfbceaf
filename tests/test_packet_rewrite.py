"""rewrite / reflect: incremental checksums must equal a full recomputation
(ours and scapy's), and the rows must follow the packets."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.packet import raw

from oisp.packet import (
    BAD_VERSION,
    compute_checksums,
    parse_batch,
    reflect,
    rewrite,
    verify_checksums,
)
from tests.packet_strategies import ipv4, ipv6, packets, ports
from tests.scapy_reference import scapy_rewritten


@st.composite
def rewrite_specs(draw, version: int):
    address = ipv4 if version == 4 else ipv6
    port = st.one_of(st.just(-1), ports)
    return {
        "swap_addresses": draw(st.booleans()),
        "src_addr": draw(st.none() | address),
        "dst_addr": draw(st.none() | address),
        "src_port": draw(port),
        "dst_port": draw(port),
    }


def assert_rows_follow_packets(buf, rows) -> None:
    fresh = parse_batch(bytes(buf))
    for name in rows.dtype.names:
        assert rows[name].tolist() == fresh[name].tolist(), name


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([4, 6]).flatmap(
    lambda v: st.tuples(st.lists(packets(v), min_size=1, max_size=5), rewrite_specs(v))
), st.data())
def test_rewrite_equals_full_recompute_and_scapy(case, data):
    pkts, spec = case
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=len(pkts), max_size=len(pkts))))
    buf = bytearray(b"".join(raw(p) for p in pkts))
    rows = parse_batch(buf)

    assert rewrite(buf, rows, mask, **spec) == mask.sum()

    expected = b"".join(scapy_rewritten(p, spec) if m else raw(p) for p, m in zip(pkts, mask))
    assert bytes(buf) == expected
    recomputed = bytearray(buf)
    compute_checksums(recomputed, parse_batch(recomputed, verify=False))
    assert recomputed == buf
    assert_rows_follow_packets(buf, rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(packets(), min_size=1, max_size=6), st.one_of(st.just(-1), ports), st.one_of(st.just(-1), ports))
def test_reflect_on_a_mixed_batch(pkts, src_port, dst_port):
    buf = bytearray(b"".join(raw(p) for p in pkts))
    rows = parse_batch(buf)
    select = np.flatnonzero(rows["protocol"] != 17)  # an index array this time
    reflect(buf, rows, select, src_port=src_port, dst_port=dst_port)
    spec = {"swap_addresses": True, "src_port": src_port, "dst_port": dst_port}
    expected = b"".join(
        scapy_rewritten(p, spec) if i in select else raw(p) for i, p in enumerate(pkts)
    )
    assert bytes(buf) == expected
    assert_rows_follow_packets(buf, rows)


def test_streamdump_reflection_both_directions():
    to_server = IP(src="10.200.0.1", dst="10.200.0.2") / TCP(sport=50000, dport=443, flags="S")
    from_proxy = IP(src="10.200.0.2", dst="10.200.0.1") / TCP(sport=8443, dport=50000, flags="SA")
    buf = bytearray(raw(to_server) + raw(from_proxy))
    rows = parse_batch(buf)
    reflect(buf, rows, rows["dst_port"] == 443, dst_port=8443)
    reflect(buf, rows, rows["src_port"] == 8443, src_port=443)
    first, second = IP(bytes(buf[: int(rows[1]["offset"])])), IP(bytes(buf[int(rows[1]["offset"]) :]))
    assert (first.src, first.dst, first[TCP].sport, first[TCP].dport) == ("10.200.0.2", "10.200.0.1", 50000, 8443)
    assert (second.src, second.dst, second[TCP].sport, second[TCP].dport) == ("10.200.0.1", "10.200.0.2", 443, 50000)
    verify_checksums(buf, rows)
    assert rows["ip_checksum_ok"].tolist() == [1, 1]
    assert rows["l4_checksum_ok"].tolist() == [1, 1]


def test_zero_udp_ipv4_checksum_stays_zero():
    buf = bytearray(raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2, chksum=0) / b"data"))
    rows = parse_batch(buf)
    rewrite(buf, rows, [0], src_addr="192.0.2.9", dst_port=99)
    assert buf[26:28] == b"\0\0"
    reference = IP(bytes(buf))
    del reference.chksum
    assert raw(reference)[10:12] == buf[10:12]  # the IP header checksum did change, correctly
    assert (int(rows[0]["dst_port"]), bytes(rows[0]["src_addr"][:4])) == (99, bytes([192, 0, 2, 9]))


def test_a_bad_checksum_stays_bad():
    buf = bytearray(raw(IPv6(src="::1", dst="::2") / TCP(sport=1, dport=2, chksum=0x1234)))
    rows = parse_batch(buf)
    assert int(rows[0]["l4_checksum_ok"]) == 0
    reflect(buf, rows, [0], dst_port=8443)
    verify_checksums(buf, rows)
    assert int(rows[0]["l4_checksum_ok"]) == 0


def test_ipv6_fragments_rewrite_like_refragmenting_the_rewritten_datagram():
    def datagram(src, dst, sport, dport):
        return IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=42) / TCP(sport=sport, dport=dport) / (b"p" * 2500)

    buf = bytearray(b"".join(raw(f) for f in fragment6(datagram("fd00::1", "fd00::2", 1000, 443), 1280)))
    rows = parse_batch(buf)
    assert len(rows) > 1
    reflect(buf, rows, None, dst_port=8443)
    expected = b"".join(raw(f) for f in fragment6(datagram("fd00::2", "fd00::1", 1000, 8443), 1280))
    assert bytes(buf) == expected


def test_address_family_mismatch_is_refused_before_any_change():
    original = raw(IP(src="10.0.0.1", dst="10.0.0.2") / TCP()) + raw(IPv6(src="::1", dst="::2") / TCP())
    buf = bytearray(original)
    rows = parse_batch(buf)
    with pytest.raises(ValueError, match="IPv4"):
        rewrite(buf, rows, None, dst_addr="192.0.2.1")
    assert bytes(buf) == original
    assert rewrite(buf, rows, [0], dst_addr=ipaddress.ip_address("192.0.2.1")) == 1
    assert rewrite(buf, rows, [1], dst_addr=bytes(16)) == 1


def test_bad_arguments_are_clear_errors():
    data = raw(IP(src="10.0.0.1", dst="10.0.0.2") / TCP())
    buf = bytearray(data * 3)
    rows = parse_batch(buf)
    with pytest.raises(ValueError, match="port"):
        rewrite(buf, rows, None, dst_port=70000)
    with pytest.raises(BufferError, match="not writable"):
        rewrite(data, parse_batch(data), None, dst_port=1)
    with pytest.raises(ValueError, match="contiguous"):
        rewrite(buf, rows[::2], None, dst_port=1)
    with pytest.raises(TypeError):
        rewrite(buf, np.zeros(2, np.uint8), None, dst_port=1)
    with pytest.raises(IndexError):
        rewrite(buf, rows, [5], dst_port=1)
    with pytest.raises(ValueError, match="4 or 16"):
        rewrite(buf, rows, None, src_addr=b"\1\2\3")


def test_invalid_rows_are_skipped_and_counted_out():
    good = raw(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5, dport=6))
    buf = bytearray(good + b"\x50" * 30)  # a version-5 "packet" ends the batch
    rows = parse_batch(buf)
    assert rows["status"].tolist() == [0, BAD_VERSION]
    assert reflect(buf, rows, None, dst_port=7) == 1
    assert bytes(buf[len(good) :]) == b"\x50" * 30
