"""Refusing QUIC to AI addresses, so clients fall back to TCP, where they are recorded.

A client that tries HTTP/3 first (UDP 443) would otherwise go around the proxy.
While recording, a divert handle takes outbound UDP to port 443 of the AI
addresses only (its filter names them, like the reflector's, and follows the
target set), never re-injects it, and answers the client at once:

- a QUIC Version Negotiation packet from the server's address, listing only a
  reserved version: RFC 9000 §6.2 has a client abandon the attempt on it, which
  is what makes a client like aioquic fail at once (it ignores ICMP errors: its
  socket is not connected), and browsers then use TCP;
- an ICMP port unreachable (ICMPv6: port unreachable), which a client with a
  connected UDP socket sees as ECONNREFUSED on its next receive.

Measured (benchmarks/RESULTS.md, "QUIC refusal"): an aioquic client fails in
milliseconds with the Version Negotiation, and only at its own handshake timeout
when the Initial is dropped or answered with ICMP alone.

The handle is an Engine: a stop closes it, and on a kill the guardian removes its
filter (nothing is left blocking). QUIC to every other address never leaves the
kernel. Each refused flow (client address and port, server) is reported once to
`on_refused`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from oisp.redirect.targets import TargetSet

if TYPE_CHECKING:
    from oisp.divert.engine import Engine

log = logging.getLogger(__name__)

QUIC_PORT = 443
# A reserved version (RFC 9000 §15: 0x?a?a?a?a): no client speaks it, so none finds a common one.
RESERVED_VERSION = 0x1A2A3A4A
MAX_FILTER_ADDRESSES = 200
MAX_REPORTED = 4096  # refused flows remembered, so each is reported once


def quic_filter(addresses: list) -> str | None:
    """Outbound UDP to port 443 of these addresses (ipaddress objects); None: nothing to take."""
    if not addresses:
        return None
    to = " or ".join(f"{'ip' if a.version == 4 else 'ipv6'}.DstAddr == {a}" for a in addresses)
    return f"udp and outbound and udp.DstPort == {QUIC_PORT} and ({to})"


def _split(packet: bytes) -> tuple[int, bytes, bytes, int, int, bytes] | None:
    """(version, src, dst, sport, dport, UDP payload) of an IPv4/IPv6 UDP packet, or None."""
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != 17 or len(packet) < ihl + 8 or struct.unpack_from("!H", packet, 6)[0] & 0x3FFF:
            return None  # not UDP, or a fragment
        src, dst, udp = packet[12:16], packet[16:20], ihl
    elif version == 6:
        if len(packet) < 48 or packet[6] != 17:
            return None  # not UDP right after the fixed header
        src, dst, udp = packet[8:24], packet[24:40], 40
    else:
        return None
    sport, dport, length = struct.unpack_from("!HHH", packet, udp)
    return version, src, dst, sport, dport, packet[udp + 8:udp + max(8, length)]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(np.frombuffer(data, dtype=">u2").astype(np.uint32).tolist())
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip_packet(version: int, src: bytes, dst: bytes, protocol: int, body: bytes, checksum_at: int | None) -> bytes:
    """An IP packet from src to dst carrying `body`, whose checksum (at `checksum_at` in
    `body`, over the pseudo-header; None: none) is filled in."""
    if version == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, protocol, len(body))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(body), protocol)
    if checksum_at is not None:
        value = _checksum((b"" if protocol == 1 else pseudo) + body)  # ICMPv4 has no pseudo-header
        if protocol == 17 and value == 0:
            value = 0xFFFF
        body = body[:checksum_at] + struct.pack("!H", value) + body[checksum_at + 2:]
    if version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0x4000, 64, protocol, 0, src, dst)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return header + body
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), protocol, 64, src, dst) + body


def version_negotiation(packet: bytes) -> bytes | None:
    """The server's Version Negotiation answer to a client's long-header QUIC packet in
    `packet` (IP/UDP), as an IP packet to the client; None if it is not one."""
    parts = _split(packet)
    if parts is None:
        return None
    version, src, dst, sport, dport, payload = parts
    if len(payload) < 7 or not payload[0] & 0x80 or payload[1:5] == b"\0\0\0\0":
        return None  # a short header (no connection IDs to echo) or itself a VN
    dcid_len = payload[5]
    if dcid_len > 20 or len(payload) < 7 + dcid_len:
        return None
    dcid = payload[6:6 + dcid_len]
    scid_len = payload[6 + dcid_len]
    scid = payload[7 + dcid_len:7 + dcid_len + scid_len]
    if scid_len > 20 or len(scid) != scid_len:
        return None
    # The answer echoes the client's IDs swapped (RFC 9000 §17.2.1).
    vn = bytes([0x80 | (os.urandom(1)[0] & 0x7F)]) + b"\0\0\0\0" + bytes([scid_len]) + scid + \
        bytes([dcid_len]) + dcid + struct.pack("!I", RESERVED_VERSION)
    udp = struct.pack("!HHHH", dport, sport, 8 + len(vn), 0) + vn
    return _ip_packet(version, dst, src, 17, udp, 6)


def port_unreachable(packet: bytes) -> bytes | None:
    """An ICMP(v6) port unreachable from the server about `packet`, to the client."""
    parts = _split(packet)
    if parts is None:
        return None
    version, src, dst = parts[0], parts[1], parts[2]
    if version == 4:
        quoted = packet[:(packet[0] & 0x0F) * 4 + 8]  # the header and 8 bytes, as RFC 792 asks
        return _ip_packet(4, dst, src, 1, struct.pack("!BBHI", 3, 3, 0, 0) + quoted, 2)
    quoted = packet[:1232 - 48]  # as much as fits the minimum IPv6 MTU (RFC 4443)
    return _ip_packet(6, dst, src, 58, struct.pack("!BBHI", 1, 4, 0, 0) + quoted, 2)


def refusal(packet: bytes, how: str = "both") -> list[bytes]:
    """What answers a diverted QUIC packet: "vn", "icmp", "both", or "drop" (nothing)."""
    out = []
    if how in ("vn", "both"):
        out.append(version_negotiation(packet))
    if how in ("icmp", "both"):
        out.append(port_unreachable(packet))
    return [p for p in out if p is not None]


class QuicRefuser:
    """Takes QUIC to the AI addresses of `targets` and refuses it; follows the set's
    changes (a new filter per generation, the old handle closed after the new opens)."""

    def __init__(self, targets: TargetSet, *, how: str = "both", priority: int = 0,
                 on_refused: Callable[[dict], None] | None = None, watchdog: float | None = 5.0,
                 max_filter_addresses: int = MAX_FILTER_ADDRESSES):
        self.targets, self.how, self.priority, self.watchdog = targets, how, priority, watchdog
        self.on_refused = on_refused
        self.max_filter_addresses = max_filter_addresses
        self.counts = {"refused": 0, "flows": 0, "answers": 0, "answer_errors": 0, "handles": 0, "not_covered": 0}
        self.failure: BaseException | None = None
        self.engine: Engine | None = None
        self._covered = -1
        self._covered_changed = threading.Condition()
        self._reported: dict[tuple, None] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> QuicRefuser:
        self._follow()
        self._thread = threading.Thread(target=self._run, name="oisp-quic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self.engine is not None:
            self.engine.stop()
        if self._thread is not None:
            self._thread.join(3.0)
        with self._covered_changed:
            self._covered_changed.notify_all()

    def covers(self, generation: int) -> bool:
        return self._covered >= generation

    def wait_covered(self, generation: int, timeout: float = 1.0) -> bool:
        """Wait until the filter takes the addresses of `generation` (the DNS watcher holds
        an answer naming a new AI address until then, as for the reflector)."""
        with self._covered_changed:
            return self._covered_changed.wait_for(
                lambda: self.covers(generation) or self._stopping.is_set() or self.failure is not None, timeout) \
                and self.covers(generation)

    def _follow(self) -> None:
        """Open a handle for the current addresses, then close the previous one."""
        from oisp.divert.engine import Engine

        generation, addresses = self.targets.snapshot()
        if generation == self._covered:
            return
        if len(addresses) > self.max_filter_addresses:
            # Past a filter's budget: the newest are not refused (counted), never all UDP 443 taken.
            self.counts["not_covered"] = len(addresses) - self.max_filter_addresses
            addresses = addresses[:self.max_filter_addresses]
        filter = quic_filter(addresses)
        old = self.engine
        self.engine = Engine(filter, priority=self.priority, policy="drop", watchdog=self.watchdog) if filter else None
        self.counts["handles"] += self.engine is not None
        if old is not None:
            old.stop()  # what it still holds is dropped: refused all the same
        with self._covered_changed:
            self._covered = generation
            self._covered_changed.notify_all()

    def _run(self) -> None:
        from oisp.divert.engine import Verdict

        try:
            while not self._stopping.is_set():
                if self.targets.generation != self._covered:
                    self._follow()
                engine = self.engine
                if engine is None:
                    self._stopping.wait(0.2)
                    continue
                batch = engine.next_batch(timeout=0.2)
                if batch is None:
                    continue
                packets = [bytes(batch.packet(i)) for i in range(len(batch))]
                addresses = batch.addresses.copy()
                batch.verdicts[:] = Verdict.DROP
                engine.commit(batch)
                for packet, address in zip(packets, addresses):
                    self._refuse(engine, packet, address)
        except BaseException as e:  # the watchdog failed open, or something broke: nothing may stay blocking
            if not self._stopping.is_set():
                log.error("the QUIC refuser stopped (%s: %s); QUIC flows directly", type(e).__name__, e)
                self.failure = e
            if self.engine is not None:
                self.engine.stop()
        finally:
            with self._covered_changed:
                self._covered_changed.notify_all()

    def _refuse(self, engine, packet: bytes, address) -> None:
        from oisp.divert.address import OUTBOUND

        self.counts["refused"] += 1
        inbound = address.copy()
        inbound["bits"] = int(inbound["bits"]) & ~OUTBOUND & 0xFFFFFFFF
        for answer in refusal(packet, self.how):
            try:
                engine.handle.send(answer, inbound)
                self.counts["answers"] += 1
            except Exception as e:  # the client then waits for its own timeout: still refused
                self.counts["answer_errors"] += 1
                log.debug("QUIC refusal not sent: %s", e)
        parts = _split(packet)
        if parts is None:
            return
        version, src, dst, sport, dport, _ = parts
        key = (src, sport, dst)
        if key in self._reported:
            return
        if len(self._reported) >= MAX_REPORTED:
            self._reported.pop(next(iter(self._reported)))
        self._reported[key] = None
        self.counts["flows"] += 1
        if self.on_refused is not None:
            convert = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            try:
                self.on_refused({"client": (str(convert(src)), sport), "server": (str(convert(dst)), dport),
                                 "ts": time.time()})
            except Exception:
                log.exception("QUIC refusal report failed")
