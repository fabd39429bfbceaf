"""A small capture-file reader: pcapng (SHB, IDB, EPB, SPB, obsolete PB) and classic pcap.

Yields :class:`Packet` (timestamp in seconds, link type, frame bytes). Unknown
block types are skipped; a truncated last block ends the iteration.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

SHB = 0x0A0D0D0A
IDB, PB, SPB, EPB = 1, 2, 3, 6
BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAP_MAGICS = {0xA1B2C3D4: ("<", 1e-6), 0xA1B23C4D: ("<", 1e-9), 0xD4C3B2A1: (">", 1e-6), 0x4D3CB2A1: (">", 1e-9)}


class CaptureFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Packet:
    ts: float
    linktype: int
    data: bytes


@dataclass
class _Interface:
    linktype: int
    ts_unit: float = 1e-6  # seconds per timestamp tick (if_tsresol, default microseconds)


def read_packets(path: str | Path) -> Iterator[Packet]:
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        if len(head) < 4:
            return
        magic = struct.unpack("<I", head)[0]
        if magic == SHB:
            yield from _pcapng(fh)
        elif magic in PCAP_MAGICS:
            yield from _pcap(fh)
        else:
            raise CaptureFormatError(f"{path}: neither pcapng nor pcap (magic {magic:#010x})")


def _pcap(fh: BinaryIO) -> Iterator[Packet]:
    header = fh.read(24)
    endian, unit = PCAP_MAGICS[struct.unpack("<I", header[:4])[0]]
    linktype = struct.unpack(endian + "I", header[20:24])[0] & 0x0FFFFFFF
    while True:
        rec = fh.read(16)
        if len(rec) < 16:
            return
        sec, frac, incl, _orig = struct.unpack(endian + "IIII", rec)
        data = fh.read(incl)
        if len(data) < incl:
            return
        yield Packet(sec + frac * unit, linktype, data)


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


def _pcapng(fh: BinaryIO) -> Iterator[Packet]:
    endian = "<"
    interfaces: list[_Interface] = []
    while True:
        head = fh.read(8)
        if len(head) < 8:
            return
        btype = struct.unpack("<I", head[:4])[0]
        if btype == SHB:
            # The byte-order magic decides how to read this section, its own length included.
            bom = fh.read(4)
            endian = "<" if struct.unpack("<I", bom)[0] == BYTE_ORDER_MAGIC else ">"
            total = struct.unpack(endian + "I", head[4:8])[0]
            body = bom + fh.read(total - 12)
            interfaces = []
            continue
        btype, total = struct.unpack(endian + "II", head)
        if total < 12:
            raise CaptureFormatError(f"pcapng block of impossible length {total}")
        body = fh.read(total - 8)
        if len(body) < total - 8:
            return
        body = body[:-4]  # the trailing copy of the length
        if btype == IDB:
            linktype = struct.unpack_from(endian + "H", body, 0)[0]
            iface = _Interface(linktype)
            for code, value in _options(body[8:], endian):
                if code == 9 and value:
                    iface.ts_unit = _tsresol(value[0])
            interfaces.append(iface)
        elif btype == EPB:
            if_id, ts_hi, ts_lo, cap_len, _orig = struct.unpack_from(endian + "IIIII", body, 0)
            iface = interfaces[if_id]
            yield Packet(((ts_hi << 32) | ts_lo) * iface.ts_unit, iface.linktype, body[20 : 20 + cap_len])
        elif btype == SPB and interfaces:
            orig = struct.unpack_from(endian + "I", body, 0)[0]
            yield Packet(0.0, interfaces[0].linktype, body[4 : 4 + orig])
        elif btype == PB:
            if_id, _drops, ts_hi, ts_lo, cap_len, _orig = struct.unpack_from(endian + "HHIIII", body, 0)
            iface = interfaces[if_id]
            yield Packet(((ts_hi << 32) | ts_lo) * iface.ts_unit, iface.linktype, body[20 : 20 + cap_len])
