"""The QUIC refusal's packets and filter: a Version Negotiation that echoes the
client's connection IDs (RFC 9000 §17.2.1) and an ICMP(v6) port unreachable, both
with checksums scapy agrees with; anything else yields nothing and never raises;
the filter takes UDP 443 to the AI addresses only (the backend's own evaluator)."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.packet import Raw

from oisp.divert.address import IPV6, OUTBOUND, new_addresses
from oisp.redirect.quic import RESERVED_VERSION, port_unreachable, quic_filter, refusal, version_negotiation

CLIENT = {4: "10.0.0.1", 6: "fd00::1"}
SERVER = {4: "192.0.2.4", 6: "2001:db8::4"}


def initial(family: int, dcid: bytes, scid: bytes, sport: int = 5555) -> bytes:
    layer = IP if family == 4 else IPv6
    payload = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid + bytes(1100)
    return bytes(layer(src=CLIENT[family], dst=SERVER[family]) / UDP(sport=sport, dport=443) / Raw(payload))


def checksums_agree(packet: bytes, family: int) -> bool:
    parsed = IP(packet) if family == 4 else IPv6(packet)
    if family == 4:
        del parsed.chksum
    for layer in (UDP, ICMP, ICMPv6DestUnreach):
        if layer in parsed:
            del parsed[layer].fields["chksum" if layer is not ICMPv6DestUnreach else "cksum"]
            break
    rebuilt = IP(bytes(parsed)) if family == 4 else IPv6(bytes(parsed))
    return bytes(rebuilt) == packet


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("dcid_len, scid_len", [(8, 8), (20, 0), (0, 20), (16, 5)])
def test_version_negotiation_echoes_the_ids_swapped(family, dcid_len, scid_len):
    dcid, scid = os.urandom(dcid_len), os.urandom(scid_len)
    answer = version_negotiation(initial(family, dcid, scid))
    parsed = IP(answer) if family == 4 else IPv6(answer)
    assert (parsed.src, parsed.dst) == (SERVER[family], CLIENT[family])
    assert (parsed[UDP].sport, parsed[UDP].dport) == (443, 5555)
    vn = bytes(parsed[UDP].payload)
    assert vn[0] & 0x80
    assert vn[1:5] == bytes(4)
    assert vn[5] == scid_len
    assert vn[6:6 + scid_len] == scid
    assert vn[6 + scid_len] == dcid_len
    assert vn[7 + scid_len:7 + scid_len + dcid_len] == dcid
    assert int.from_bytes(vn[7 + scid_len + dcid_len:], "big") == RESERVED_VERSION
    assert checksums_agree(answer, family)


@pytest.mark.parametrize("family", [4, 6])
def test_port_unreachable_quotes_the_datagram(family):
    sent = initial(family, os.urandom(8), os.urandom(8))
    answer = port_unreachable(sent)
    parsed = IP(answer) if family == 4 else IPv6(answer)
    assert (parsed.src, parsed.dst) == (SERVER[family], CLIENT[family])
    if family == 4:
        assert (parsed[ICMP].type, parsed[ICMP].code) == (3, 3)
        assert len(answer) == 20 + 8 + 20 + 8
    else:
        assert (parsed[ICMPv6DestUnreach].type, parsed[ICMPv6DestUnreach].code) == (1, 4)
        assert len(answer) <= 1232
    assert checksums_agree(answer, family)
    assert len(refusal(sent, "both")) == 2
    assert refusal(sent, "drop") == []


@pytest.mark.parametrize("family", [4, 6])
def test_a_short_header_or_a_version_negotiation_gets_no_version_negotiation(family):
    layer = IP if family == 4 else IPv6
    short = bytes(layer(src=CLIENT[family], dst=SERVER[family]) / UDP(sport=1, dport=443) / Raw(b"\x40" + bytes(30)))
    assert version_negotiation(short) is None
    vn = bytes(layer(src=CLIENT[family], dst=SERVER[family]) / UDP(sport=1, dport=443) / Raw(b"\x80" + bytes(10)))
    assert version_negotiation(vn) is None
    assert port_unreachable(short) is not None  # ICMP still says no


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), family=st.sampled_from([4, 6]), raw_ip=st.booleans())
def test_any_bytes_are_answered_without_harm(data, family, raw_ip):
    packet = data if raw_ip else initial(family, b"", b"")[:28 if family == 4 else 48] + data
    for answer in refusal(packet, "both"):
        assert isinstance(answer, bytes)


def test_the_filter_takes_udp_443_to_ai_addresses_only():
    from oisp.divert.backend import get_backend

    try:
        backend = get_backend()
    except Exception as e:
        pytest.skip(f"no divert backend: {e}")
    assert quic_filter([]) is None
    filter = quic_filter([ipaddress.ip_address(SERVER[4]), ipaddress.ip_address(SERVER[6])])

    def taken(family, dst, dport=443, tcp=False):
        from scapy.layers.inet import TCP

        layer = IP if family == 4 else IPv6
        transport = TCP(sport=5555, dport=dport) if tcp else UDP(sport=5555, dport=dport)
        packet = bytes(layer(src=CLIENT[family], dst=dst) / transport / Raw(b"x" * 20))
        address = new_addresses(1)
        address["bits"] = OUTBOUND | (IPV6 if family == 6 else 0)
        return backend.eval_filter(filter, packet, len(packet), address)

    for family in (4, 6):
        assert taken(family, SERVER[family])
        assert not taken(family, SERVER[family], dport=8443)
        assert not taken(family, SERVER[family], tcp=True)
        assert not taken(family, "192.0.2.5" if family == 4 else "2001:db8::5")
