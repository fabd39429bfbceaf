"""verify_checksums / compute_checksums / checksum_adjust against scapy and RFC 1624."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.packet import raw
from scapy.utils import checksum as scapy_checksum

from oisp.packet import checksum_adjust, compute_checksums, parse_batch, verify_checksums
from tests.packet_strategies import packets

CHECKED_L4 = {(4, 6), (4, 17), (4, 1), (6, 6), (6, 17), (6, 58)}


def expected_oks(row) -> tuple[int, int]:
    version, proto = int(row["ip_version"]), int(row["protocol"])
    return (1 if version == 4 else -1), (1 if (version, proto) in CHECKED_L4 else -1)


def l4_checksum_at(row) -> int | None:
    field = {6: 16, 17: 6, 1: 2, 58: 2}.get(int(row["protocol"]))
    key = (int(row["ip_version"]), int(row["protocol"]))
    return None if field is None or key not in CHECKED_L4 else int(row["offset"]) + int(row["l4_offset"]) + field


@settings(max_examples=200, deadline=None)
@given(st.lists(packets(), min_size=1, max_size=6))
def test_scapy_checksums_verify_and_recompute_identically(pkts):
    reference = b"".join(raw(p) for p in pkts)  # checksums computed by scapy
    rows = parse_batch(reference)
    for row in rows:
        assert (int(row["ip_checksum_ok"]), int(row["l4_checksum_ok"])) == expected_oks(row)

    blanked = bytearray(reference)
    for row in rows:
        if int(row["ip_version"]) == 4:
            blanked[int(row["offset"]) + 10 : int(row["offset"]) + 12] = b"\0\0"
        at = l4_checksum_at(row)
        if at is not None:
            blanked[at : at + 2] = b"\0\0"
    rows = parse_batch(blanked, verify=False)
    compute_checksums(blanked, rows)
    assert bytes(blanked) == reference
    assert rows["ip_checksum"].tolist() == parse_batch(reference)["ip_checksum"].tolist()


@settings(max_examples=200, deadline=None)
@given(packets(), st.data())
def test_a_flipped_covered_byte_is_detected(pkt, data):
    original = raw(pkt)
    buf = bytearray(original)
    row = parse_batch(buf)[0]
    ip_ok, l4_ok = expected_oks(row)
    if ip_ok == 1:
        buf[8] ^= 1 << data.draw(st.integers(0, 7))  # TTL: covered, changes no framing
        assert int(parse_batch(buf)[0]["ip_checksum_ok"]) == 0
        buf[8] = original[8]
    start = int(row["payload_offset"])
    if l4_ok == 1 and int(row["payload_len"]) > 0:
        at = data.draw(st.integers(start, start + int(row["payload_len"]) - 1))
        buf[at] ^= 1 << data.draw(st.integers(0, 7))
        rows = parse_batch(buf, verify=False)
        verify_checksums(buf, rows)
        assert int(rows[0]["l4_checksum_ok"]) == 0


def _udp_whose_checksum_computes_to_zero() -> bytes:
    """UDP/IPv4 whose last payload word is chosen so the one's-complement sum is 0xFFFF."""
    pkt = IP(src="192.0.2.1", dst="198.51.100.7") / UDP(sport=4000, dport=5000, chksum=0) / b"ab\0\0"
    data = bytearray(raw(pkt))
    pseudo = data[12:20] + bytes([0, 17]) + data[24:26]
    partial = ~scapy_checksum(bytes(pseudo + data[20:])) & 0xFFFF  # folded sum so far
    data[-2:] = (0xFFFF - partial).to_bytes(2, "big")
    return bytes(data)


def test_udp_computed_zero_is_sent_as_all_ones_like_scapy():
    data = bytearray(_udp_whose_checksum_computes_to_zero())
    reparsed = IP(bytes(data))
    del reparsed[UDP].chksum
    expected = raw(reparsed)
    assert expected[26:28] == b"\xff\xff"  # scapy's RFC 768 rule, so the case is really hit
    rows = parse_batch(data, verify=False)
    compute_checksums(data, rows)
    assert bytes(data) == expected
    assert int(parse_batch(data)[0]["l4_checksum_ok"]) == 1


def test_zero_udp_ipv4_checksum_means_none():
    data = raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2, chksum=0) / b"hello")
    row = parse_batch(data)[0]
    assert int(row["l4_checksum_ok"]) == -1
    assert int(row["ip_checksum_ok"]) == 1


def test_compute_respects_select():
    one = raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2, chksum=0x1234) / b"x")
    buf = bytearray(one * 3)
    rows = parse_batch(buf)
    compute_checksums(buf, rows, np.array([False, True, False]))
    assert rows["l4_checksum_ok"].tolist() == [0, 1, 0]
    verify_checksums(buf, rows)
    assert rows["l4_checksum_ok"].tolist() == [0, 1, 0]
    assert bytes(buf[: len(one)]) == one


def test_rfc1624_worked_example():
    # RFC 1624 section 4: HC 0xDD2F, field 0x5555 -> 0x3285 gives 0x0000.
    assert checksum_adjust(0xDD2F, b"\x55\x55", b"\x32\x85") == 0x0000


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=2, max_size=64).filter(lambda b: len(b) % 2 == 0), st.data())
def test_checksum_adjust_equals_full_recompute(message, data):
    start = data.draw(st.integers(0, len(message) // 2 - 1)) * 2
    end = data.draw(st.integers(start // 2 + 1, len(message) // 2)) * 2
    replacement = data.draw(st.binary(min_size=end - start, max_size=end - start))
    changed = message[:start] + replacement + message[end:]
    adjusted = checksum_adjust(scapy_checksum(message), message[start:end], replacement)
    full = scapy_checksum(changed)
    # 0x0000 and 0xFFFF are the two one's-complement zeros; eqn 3 may give either.
    assert adjusted == full or {adjusted, full} == {0, 0xFFFF}
