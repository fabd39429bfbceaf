"""A small capture-file reader: pcapng (SHB, IDB, EPB, SPB, obsolete PB) and classic pcap.

Yields :class:`Frame` (timestamp in seconds, link type, frame bytes). Unknown
block types are skipped. Damage is handled so that nothing readable is lost:
a block whose length is sound but whose contents are not, and a truncated
last block or record, are skipped and counted in :class:`ReadStats`; framing
that cannot be trusted past some point (an impossible or mismatched length, a
bad magic) raises :class:`CaptureFormatError` after every packet before it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

SHB = 0x0A0D0D0A
IDB, PB, SPB, EPB = 1, 2, 3, 6
BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAP_MAGICS = {0xA1B2C3D4: ("<", 1e-6), 0xA1B23C4D: ("<", 1e-9), 0xD4C3B2A1: (">", 1e-6), 0x4D3CB2A1: (">", 1e-9)}
MAX_BLOCK_BYTES = 16 * 1024 * 1024  # larger blocks or records are taken as damage (Wireshark's bound too)
MAX_TS = 253402300799.0  # 9999-12-31T23:59:59Z, the last instant an event can carry: later is damage


class CaptureFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Frame:
    ts: float
    linktype: int
    data: bytes


@dataclass
class ReadStats:
    skipped: int = 0  # blocks or records passed over as unreadable
    problems: list[str] = field(default_factory=list)  # the first few, for the message

    def skip(self, what: str) -> None:
        self.skipped += 1
        if len(self.problems) < 8:
            self.problems.append(what)


@dataclass
class _Interface:
    linktype: int | None  # None: the interface block was unreadable; its packets are skipped
    ts_unit: float = 1e-6  # seconds per timestamp tick (if_tsresol, default microseconds)


def read_packets(path: str | Path, stats: ReadStats | None = None) -> Iterator[Frame]:
    stats = stats if stats is not None else ReadStats()
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        if len(head) < 4:
            if head:
                raise CaptureFormatError(f"{path}: too short to be a capture ({len(head)} bytes)")
            return
        magic = struct.unpack("<I", head)[0]
        if magic == SHB:
            yield from _pcapng(fh, stats)
        elif magic in PCAP_MAGICS:
            yield from _pcap(fh, stats)
        else:
            raise CaptureFormatError(f"{path}: neither pcapng nor pcap (magic {magic:#010x})")


def _pcap(fh: BinaryIO, stats: ReadStats) -> Iterator[Frame]:
    header = fh.read(24)
    if len(header) < 24:
        raise CaptureFormatError(f"pcap file header cut short ({len(header)} of 24 bytes)")
    endian, unit = PCAP_MAGICS[struct.unpack("<I", header[:4])[0]]
    linktype = struct.unpack(endian + "I", header[20:24])[0] & 0x0FFFFFFF
    offset = 24
    while True:
        rec = fh.read(16)
        if not rec:
            return
        if len(rec) < 16:
            stats.skip(f"pcap record at byte {offset} cut short by the end of the file")
            return
        sec, frac, incl, _orig = struct.unpack(endian + "IIII", rec)
        if incl > MAX_BLOCK_BYTES:
            raise CaptureFormatError(f"pcap record at byte {offset} claims {incl} bytes: the file is damaged from there")
        data = fh.read(incl)
        if len(data) < incl:
            stats.skip(f"pcap record at byte {offset} cut short by the end of the file")
            return
        yield Frame(sec + frac * unit, linktype, data)
        offset += 16 + incl


def _tsresol(value: int) -> float:
    return 2.0 ** -(value & 0x7F) if value & 0x80 else 10.0 ** -value


def _options(body: bytes, endian: str) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(body):
        code, length = struct.unpack_from(endian + "HH", body, pos)
        if code == 0:
            return
        yield code, body[pos + 4 : pos + 4 + length]
        pos += 4 + ((length + 3) & ~3)


def _pcapng(fh: BinaryIO, stats: ReadStats) -> Iterator[Frame]:
    endian = "<"
    interfaces: list[_Interface] = []
    offset = 0
    while True:
        head = fh.read(8)
        if not head:
            return
        if len(head) < 8:
            stats.skip(f"pcapng block at byte {offset} cut short by the end of the file")
            return
        btype = struct.unpack("<I", head[:4])[0]
        if btype == SHB:
            # The byte-order magic decides how to read this section, its own length included.
            bom = fh.read(4)
            if len(bom) < 4:
                stats.skip(f"pcapng section header at byte {offset} cut short by the end of the file")
                return
            if bom == BYTE_ORDER_MAGIC.to_bytes(4, "little"):
                endian = "<"
            elif bom == BYTE_ORDER_MAGIC.to_bytes(4, "big"):
                endian = ">"
            else:
                raise CaptureFormatError(f"pcapng section header at byte {offset} has no byte-order magic: "
                                         "the file is damaged from there")
            interfaces = []
        total = struct.unpack(endian + "I", head[4:8])[0]
        if not 12 <= total <= MAX_BLOCK_BYTES or (btype == SHB and total < 28):
            raise CaptureFormatError(f"pcapng block at byte {offset} of impossible length {total}: "
                                     "the file is damaged from there")
        rest = fh.read(total - (12 if btype == SHB else 8))
        if len(rest) < total - (12 if btype == SHB else 8):
            stats.skip(f"pcapng block at byte {offset} cut short by the end of the file")
            return
        if struct.unpack(endian + "I", rest[-4:])[0] != total:
            raise CaptureFormatError(f"pcapng block at byte {offset}: its two lengths differ: the file is damaged from there")
        if btype != SHB:
            btype = struct.unpack(endian + "I", head[:4])[0]
            try:
                packet = _block(btype, rest[:-4], endian, interfaces)
            except (struct.error, IndexError, ValueError) as e:
                # The block's length is sound, so what follows can still be read.
                stats.skip(f"pcapng block type {btype:#x} at byte {offset}: {e}")
                packet = None
            if packet is not None:
                yield packet
        offset += total


def _block(btype: int, body: bytes, endian: str, interfaces: list[_Interface]) -> Frame | None:
    if btype == IDB:
        if len(body) < 8:
            interfaces.append(_Interface(None))  # keeps the numbering of the interfaces after it
            raise ValueError("interface description too short")
        iface = _Interface(struct.unpack_from(endian + "H", body, 0)[0])
        for code, value in _options(body[8:], endian):
            if code == 9 and value:
                iface.ts_unit = _tsresol(value[0])
        interfaces.append(iface)
    elif btype == EPB:
        if_id, ts_hi, ts_lo, cap_len, _orig = struct.unpack_from(endian + "IIIII", body, 0)
        return _packet(interfaces, if_id, (ts_hi << 32) | ts_lo, body[20 : 20 + cap_len])
    elif btype == SPB and interfaces:
        orig = struct.unpack_from(endian + "I", body, 0)[0]
        return _packet(interfaces, 0, None, body[4 : 4 + orig])
    elif btype == PB:
        if_id, _drops, ts_hi, ts_lo, cap_len, _orig = struct.unpack_from(endian + "HHIIII", body, 0)
        return _packet(interfaces, if_id, (ts_hi << 32) | ts_lo, body[20 : 20 + cap_len])
    return None


def _packet(interfaces: list[_Interface], if_id: int, ticks: int | None, data: bytes) -> Frame:
    if if_id >= len(interfaces):
        raise ValueError(f"packet on interface {if_id}, which was not described")
    iface = interfaces[if_id]
    if iface.linktype is None:
        raise ValueError(f"packet on interface {if_id}, whose description was unreadable")
    ts = ticks * iface.ts_unit if ticks is not None else 0.0
    if ts > MAX_TS:
        raise ValueError("timestamp after the year 9999")
    return Frame(ts, iface.linktype, data)
