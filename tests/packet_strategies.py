"""Hypothesis strategies that build IP packets with scapy, the independent
reference for the packet-core tests (tests/test_packet_*.py).

Every packet comes back as scapy-computed bytes, checksums included. Two
things are deliberately not generated, because the pseudo-header then uses a
"final destination" that differs between originating node (scapy) and the
receiver/diverter view (oisp, WinDivert): IPv6 routing headers with
segments left, and IPv4 source-route options.
"""

from __future__ import annotations

from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.packet import Raw, raw

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ports = st.integers(1, 0xFFFF)
payloads = st.binary(max_size=200)  # includes empty and odd lengths
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


@st.composite
def ipv4_header(draw):
    options = draw(
        st.lists(
            st.one_of(
                st.just(IPOption_NOP()),
                st.lists(ipv4, max_size=3).map(lambda routers: IPOption_RR(routers=routers)),
            ),
            max_size=4,
        ).filter(lambda opts: sum(len(raw(o)) for o in opts) <= 40)  # IHL tops out at 60 bytes
    )
    return IP(
        src=draw(ipv4),
        dst=draw(ipv4),
        ttl=draw(u8),
        tos=draw(u8),
        id=draw(u16),
        flags=draw(st.sampled_from([0, "DF"])),
        options=options,
    )


def _ext_header(draw):
    kind = draw(st.sampled_from(["hbh", "dest", "routing", "atomic_fragment"]))
    if kind == "hbh":
        return IPv6ExtHdrHopByHop(options=[PadN(optdata=draw(st.binary(max_size=12)))])
    if kind == "dest":
        return IPv6ExtHdrDestOpt(options=[PadN(optdata=draw(st.binary(max_size=20)))])
    if kind == "routing":
        return IPv6ExtHdrRouting(addresses=draw(st.lists(ipv6, max_size=3)), segleft=0)
    return IPv6ExtHdrFragment(offset=0, m=0, id=draw(u32))


@st.composite
def ipv6_header(draw):
    header = IPv6(src=draw(ipv6), dst=draw(ipv6), hlim=draw(u8), tc=draw(u8), fl=draw(st.integers(0, 0xFFFFF)))
    for _ in range(draw(st.integers(0, 3))):
        header = header / _ext_header(draw)
    return header


@st.composite
def tcp_header(draw):
    options = draw(
        st.lists(
            st.sampled_from(
                [("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b""), ("Timestamp", (12345, 678))]
            ),
            max_size=4,
        )
    )
    return TCP(
        sport=draw(ports),
        dport=draw(ports),
        seq=draw(u32),
        ack=draw(u32),
        flags=draw(st.integers(0, 0xFF)),
        window=draw(u16),
        urgptr=draw(u16),
        options=options,
    )


@st.composite
def transport(draw, version: int):
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "other"]))
    if kind == "tcp":
        return draw(tcp_header())
    if kind == "udp":
        return UDP(sport=draw(ports), dport=draw(ports))
    if kind == "icmp" and version == 4:
        return ICMP(type=draw(u8), code=draw(u8), id=draw(u16), seq=draw(u16))
    if kind == "icmp":
        cls = draw(st.sampled_from([ICMPv6EchoRequest, ICMPv6EchoReply, ICMPv6DestUnreach]))
        return cls(code=draw(u8))
    return None  # an upper layer we do not parse (GRE, no-next-header, …)


@st.composite
def packets(draw, version: int | None = None):
    """A scapy packet object (IPv4 or IPv6), built but not yet serialised."""
    version = version or draw(st.sampled_from([4, 6]))
    header = draw(ipv4_header() if version == 4 else ipv6_header())
    upper = draw(transport(version))
    body = draw(payloads)
    if upper is None:
        proto = draw(st.sampled_from([47, 50, 132]))
        last = header.lastlayer()
        if version == 4:
            header.proto = proto
        else:
            last.nh = proto
        return header / Raw(body) if body else header
    packet = header / upper
    return packet / Raw(body) if body else packet
