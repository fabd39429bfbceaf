"""From captured frames to ordered TCP byte streams, one per connection and direction.

Handles Ethernet, Linux cooked (SLL, SLL2), BSD loopback (NULL/LOOP) and raw IP;
IPv4 and IPv6; out-of-order and retransmitted segments; SYN to tell client from
server (or, for a capture that starts mid-connection, the lower port is the server).

Out-of-order bytes wait for the gap before them to fill, up to
MAX_PENDING_BYTES a direction; past that the capture lost the gap's bytes, so
the stream goes on from the earliest held segment and ``gaps`` counts it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from oisp.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from oisp.pcapng.reader import Frame

LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LOOP = 0, 1, 101, 108
LINKTYPE_LINUX_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2 = 113, 228, 229, 276
_RAW_ALIASES = {12, 14, LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6}

Endpoint = tuple[str, int]
MAX_PENDING_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Segment:
    ts: float
    src: Endpoint
    dst: Endpoint
    seq: int
    flags: int
    payload: bytes


def _ip_packet(pkt: Frame) -> bytes | None:
    d, lt = pkt.data, pkt.linktype
    if lt == LINKTYPE_ETHERNET:
        if len(d) < 14:
            return None
        ethertype, off = struct.unpack_from("!H", d, 12)[0], 14
        while ethertype in (0x8100, 0x88A8) and len(d) >= off + 4:  # VLAN tags
            ethertype, off = struct.unpack_from("!H", d, off + 2)[0], off + 4
        return d[off:] if ethertype in (0x0800, 0x86DD) else None
    if lt in (LINKTYPE_NULL, LINKTYPE_LOOP):
        return d[4:]
    if lt == LINKTYPE_LINUX_SLL:
        return d[16:]
    if lt == LINKTYPE_LINUX_SLL2:
        return d[20:]
    if lt in _RAW_ALIASES:
        return d
    return None


def parse_segment(pkt: Frame) -> Segment | None:
    ip = _ip_packet(pkt)
    if not ip:
        return None
    version = ip[0] >> 4
    if version == 4 and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if ip[9] != 6 or struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:  # not TCP, or a fragment
            return None
        src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
        tcp = ip[ihl : total if total >= ihl else len(ip)]
    elif version == 6 and len(ip) >= 40:
        if ip[6] != 6:  # extension headers are not followed here
            return None
        src, dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
        tcp = ip[40 : 40 + struct.unpack_from("!H", ip, 4)[0]]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
    offset = (tcp[12] >> 4) * 4
    return Segment(pkt.ts, (src, sport), (dst, dport), seq, tcp[13], bytes(tcp[offset:]))


@dataclass
class _Half:
    next_seq: int | None = None
    pending: dict[int, tuple[bytes, float]] = field(default_factory=dict)
    pending_bytes: int = 0
    fin: bool = False

    def hold(self, seq: int, payload: bytes, ts: float) -> None:
        if seq not in self.pending:
            self.pending[seq] = (payload, ts)
            self.pending_bytes += len(payload)

    def take(self, seq: int) -> tuple[bytes, float]:
        payload, ts = self.pending.pop(seq)
        self.pending_bytes -= len(payload)
        return payload, ts

    def earliest(self) -> int:
        """The held segment that starts first, counted from next_seq (one already passed comes first)."""
        assert self.next_seq is not None
        nxt = self.next_seq
        return min(self.pending, key=lambda s: (s - nxt + 0x80000000) & 0xFFFFFFFF)


@dataclass
class TcpFlow:
    client: Endpoint
    server: Endpoint
    start_ts: float
    halves: dict[bool, _Half] = field(default_factory=lambda: {True: _Half(), False: _Half()})  # key: from client?
    closed: bool = False


@dataclass(frozen=True)
class FlowData:
    flow: TcpFlow
    from_client: bool
    data: bytes
    ts: float


@dataclass(frozen=True)
class FlowClosed:
    flow: TcpFlow
    ts: float


def _seq_lt(a: int, b: int) -> bool:
    return ((a - b) & 0xFFFFFFFF) > 0x7FFFFFFF


class TcpReassembler:
    def __init__(self) -> None:
        self.flows: dict[frozenset[Endpoint], TcpFlow] = {}
        self.last_ts = 0.0
        self.gaps = 0  # holes in a stream the capture never filled

    def segments(self, segs: Iterable[Segment]) -> Iterator[FlowData | FlowClosed]:
        for seg in segs:
            yield from self.add(seg)
        for flow in list(self.flows.values()):
            if not flow.closed:
                flow.closed = True
                yield FlowClosed(flow, self.last_ts)

    def add(self, seg: Segment) -> Iterator[FlowData | FlowClosed]:
        self.last_ts = max(self.last_ts, seg.ts)
        key = frozenset((seg.src, seg.dst))
        flow = self.flows.get(key)
        if flow is None or (flow.closed and seg.flags & TCP_SYN):
            if seg.flags & TCP_SYN and seg.flags & TCP_ACK:
                client, server = seg.dst, seg.src
            elif seg.flags & TCP_SYN:
                client, server = seg.src, seg.dst
            else:
                client, server = (seg.src, seg.dst) if seg.src[1] > seg.dst[1] else (seg.dst, seg.src)
            flow = self.flows[key] = TcpFlow(client, server, seg.ts)
        if flow.closed:
            return
        half = flow.halves[seg.src == flow.client]
        if seg.flags & TCP_SYN:
            half.next_seq = (seg.seq + 1) & 0xFFFFFFFF
        elif half.next_seq is None:
            half.next_seq = seg.seq
        if seg.payload:
            yield from self._deliver(flow, seg.src == flow.client, half, seg.seq, seg.payload, seg.ts)
        if seg.flags & TCP_FIN:
            half.fin = True
        if seg.flags & TCP_RST or all(h.fin for h in flow.halves.values()):
            flow.closed = True
            yield FlowClosed(flow, seg.ts)

    def _deliver(self, flow: TcpFlow, from_client: bool, half: _Half, seq: int, payload: bytes, ts: float) -> Iterator[FlowData]:
        assert half.next_seq is not None
        if _seq_lt(seq, half.next_seq):  # retransmission, maybe with some new bytes at the end
            skip = (half.next_seq - seq) & 0xFFFFFFFF
            if skip >= len(payload):
                return
            payload, seq = payload[skip:], half.next_seq
        if seq != half.next_seq:
            half.hold(seq, payload, ts)
            if half.pending_bytes <= MAX_PENDING_BYTES:
                return
            self.gaps += 1  # the gap's bytes are not in the capture: go on from the first segment after it
            half.next_seq = min((s for s in half.pending if _seq_lt(half.next_seq, s)), key=lambda s: (s - half.next_seq) & 0xFFFFFFFF)  # type: ignore[operator]
            nxt = self._next_pending(half)
            assert nxt is not None  # the segment next_seq now points at
            seq, (payload, ts) = nxt
        while True:
            yield FlowData(flow, from_client, payload, ts)
            half.next_seq = (seq + len(payload)) & 0xFFFFFFFF
            nxt = self._next_pending(half)
            if nxt is None:
                return
            seq, (payload, ts) = nxt

    @staticmethod
    def _next_pending(half: _Half) -> tuple[int, tuple[bytes, float]] | None:
        assert half.next_seq is not None
        while half.pending:
            # The next segment usually starts exactly where the stream is; else look for an overlap.
            seq = half.next_seq if half.next_seq in half.pending else half.earliest()
            if not (_seq_lt(seq, half.next_seq) or seq == half.next_seq):
                return None  # a gap remains before every held segment
            payload, ts = half.take(seq)
            skip = (half.next_seq - seq) & 0xFFFFFFFF
            if skip < len(payload):
                return half.next_seq, (payload[skip:], ts)
        return None
