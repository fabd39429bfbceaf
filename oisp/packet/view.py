"""`Packet`: one IP packet as a lazy view over a buffer, pydivert-style.

The headers are located once by the native parser; every attribute then
reads the bytes in place, and every setter writes them in place and updates
the checksums incrementally (RFC 1624), so a Packet over a batch buffer edits
the batch. For bulk work prefer the batch functions in `oisp.packet`: this
class costs a few Python calls per attribute.
"""

from __future__ import annotations

import ipaddress

from oisp._native.packet_core import (
    FIRST_PACKET_ERROR,
    OK,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    checksum_adjust,
    compute_checksums,
    parse_batch,
    rewrite,
    verify_checksums,
)

_TCP, _UDP = 6, 17
_FLAG_BITS = {"fin": TCP_FIN, "syn": TCP_SYN, "rst": TCP_RST, "psh": TCP_PSH, "ack": TCP_ACK, "urg": TCP_URG}


def _flag(name: str) -> property:
    bit = _FLAG_BITS[name]

    def get(self: Packet) -> bool | None:
        flags = self.tcp_flags
        return None if flags is None else bool(flags & bit)

    def set(self: Packet, on: bool) -> None:
        flags = self.tcp_flags
        if flags is None:
            raise AttributeError(f"not a TCP packet: cannot set {name}")
        self.tcp_flags = (flags | bit) if on else (flags & ~bit)

    return property(get, set, doc=f"TCP {name.upper()} flag (None if not TCP).")


class Packet:
    """One IP packet at `buf[offset:offset+length]` (length defaults to the IP header's)."""

    __slots__ = ("_view", "_rows")

    def __init__(self, buf, offset: int = 0, length: int | None = None) -> None:
        whole = memoryview(buf).cast("B")
        end = len(whole) if length is None else offset + length
        if offset < 0 or end > len(whole) or end < offset:
            raise ValueError(f"packet [{offset}:{end}] is outside a buffer of {len(whole)} bytes")
        rows = parse_batch(whole[offset:end], max_packets=1, verify=False)
        if len(rows) == 0:
            raise ValueError("empty buffer: no packet")
        from oisp.packet import STATUS_NAMES  # the package imports this module

        status = int(rows["status"][0])
        if status != OK and status < FIRST_PACKET_ERROR:
            raise ValueError(f"not a parseable IP packet: {STATUS_NAMES[status]}")
        self._view = whole[offset : offset + int(rows["length"][0])]
        self._rows = rows

    @classmethod
    def from_row(cls, buf, row) -> Packet:
        """The packet a `parse_batch` row describes, over the same buffer."""
        return cls(buf, int(row["offset"]), int(row["length"]))

    # ------------------------------------------------------------ layout

    def _field(self, name: str) -> int:
        return int(self._rows[name][0])

    @property
    def raw(self) -> memoryview:
        """The packet's bytes, in place."""
        return self._view

    @property
    def status(self) -> int:
        """0 (OK) or a per-packet error code from `oisp.packet`."""
        return self._field("status")

    @property
    def ip_version(self) -> int:
        return self._field("ip_version")

    @property
    def protocol(self) -> int:
        """Upper-layer protocol number (after IPv6 extension headers)."""
        return self._field("protocol")

    @property
    def is_fragment(self) -> bool:
        return bool(self._field("is_fragment"))

    def _has_l4(self, *protocols: int) -> bool:
        return self.status == OK and self._field("l4_header_len") > 0 and self.protocol in protocols

    def _l4(self, at: int, size: int) -> int | None:
        if not self._has_l4(_TCP, _UDP) or (size == 4 and self.protocol != _TCP):
            return None
        start = self._field("l4_offset") + at
        return int.from_bytes(self._view[start : start + size], "big")

    # ------------------------------------------------------------ IP

    @property
    def _address_at(self) -> int:
        return 12 if self.ip_version == 4 else 8

    def _address(self, index: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        size = 4 if self.ip_version == 4 else 16
        start = self._address_at + index * size
        return ipaddress.ip_address(bytes(self._view[start : start + size]))

    @property
    def src_addr(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self._address(0)

    @src_addr.setter
    def src_addr(self, value) -> None:
        rewrite(self._view, self._rows, [0], src_addr=_as_address(value))

    @property
    def dst_addr(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self._address(1)

    @dst_addr.setter
    def dst_addr(self, value) -> None:
        rewrite(self._view, self._rows, [0], dst_addr=_as_address(value))

    @property
    def ttl(self) -> int:
        """TTL (IPv4) or hop limit (IPv6)."""
        return self._view[8 if self.ip_version == 4 else 7]

    @ttl.setter
    def ttl(self, value: int) -> None:
        if self.ip_version == 6:
            self._view[7] = value
            return
        old = bytes(self._view[8:10])
        self._view[8] = value
        self._adjust(10, old, bytes(self._view[8:10]), udp=False)

    # ------------------------------------------------------------ TCP / UDP

    @property
    def src_port(self) -> int | None:
        return self._l4(0, 2)

    @src_port.setter
    def src_port(self, value: int) -> None:
        self._require_ports()
        rewrite(self._view, self._rows, [0], src_port=value)

    @property
    def dst_port(self) -> int | None:
        return self._l4(2, 2)

    @dst_port.setter
    def dst_port(self, value: int) -> None:
        self._require_ports()
        rewrite(self._view, self._rows, [0], dst_port=value)

    def _require_ports(self) -> None:
        if not self._has_l4(_TCP, _UDP):
            raise AttributeError("only a TCP or UDP packet with its header has ports")

    @property
    def seq_num(self) -> int | None:
        return self._l4(4, 4)

    @property
    def ack_num(self) -> int | None:
        return self._l4(8, 4)

    @property
    def tcp_flags(self) -> int | None:
        """The TCP flags byte (FIN=1 … CWR=0x80), None if not TCP."""
        if not self._has_l4(_TCP):
            return None
        return self._view[self._field("l4_offset") + 13]

    @tcp_flags.setter
    def tcp_flags(self, value: int) -> None:
        if not self._has_l4(_TCP):
            raise AttributeError("not a TCP packet: it has no flags")
        at = self._field("l4_offset")
        old = bytes(self._view[at + 12 : at + 14])
        self._view[at + 13] = value
        self._adjust(at + 16, old, bytes(self._view[at + 12 : at + 14]), udp=False)

    fin = _flag("fin")
    syn = _flag("syn")
    rst = _flag("rst")
    psh = _flag("psh")
    ack = _flag("ack")
    urg = _flag("urg")

    # ------------------------------------------------------------ ICMP

    @property
    def icmp_type(self) -> int | None:
        return self._view[self._field("l4_offset")] if self._has_l4(1, 58) else None

    @property
    def icmp_code(self) -> int | None:
        return self._view[self._field("l4_offset") + 1] if self._has_l4(1, 58) else None

    # ------------------------------------------------------------ payload, checksums

    @property
    def payload(self) -> memoryview:
        start = self._field("payload_offset")
        return self._view[start : start + self._field("payload_len")]

    def _adjust(self, checksum_at: int, old: bytes, new: bytes, *, udp: bool) -> None:
        """Incremental update of the checksum at `checksum_at` after `old` became `new`."""
        current = int.from_bytes(self._view[checksum_at : checksum_at + 2], "big")
        if udp and current == 0:
            return
        updated = checksum_adjust(current, old, new)
        if not udp and updated == 0xFFFF:
            updated = 0  # the form a full computation gives
        self._view[checksum_at : checksum_at + 2] = updated.to_bytes(2, "big")

    def recalculate_checksums(self) -> None:
        """Recompute the IPv4 header and TCP/UDP/ICMP/ICMPv6 checksums in full."""
        compute_checksums(self._view, self._rows)

    @property
    def checksums_valid(self) -> bool:
        """False if any checksum that can be checked is wrong."""
        verify_checksums(self._view, self._rows)
        return self._field("ip_checksum_ok") != 0 and self._field("l4_checksum_ok") != 0

    def __len__(self) -> int:
        return len(self._view)

    def __repr__(self) -> str:
        names = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}
        proto = names.get(self.protocol, f"proto={self.protocol}")
        src, dst = str(self.src_addr), str(self.dst_addr)
        if self.src_port is not None:
            wrap = "[{}]" if self.ip_version == 6 else "{}"
            src = f"{wrap.format(src)}:{self.src_port}"
            dst = f"{wrap.format(dst)}:{self.dst_port}"
        extra = ""
        if self.tcp_flags is not None:
            extra = " flags=" + "".join(c for c, b in zip("FSRPAU", _FLAG_BITS.values()) if self.tcp_flags & b)
        elif self.icmp_type is not None:
            extra = f" type={self.icmp_type} code={self.icmp_code}"
        return f"<Packet IPv{self.ip_version} {proto} {src} -> {dst}{extra} len={len(self)}>"


def _as_address(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return ipaddress.ip_address(value).packed
