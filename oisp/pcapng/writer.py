"""A pcapng writer fast enough for a live capture: whole batches in a few numpy calls.

    with PcapngWriter.open("out.pcapng") as writer:     # "-" writes to stdout
        lo = writer.add_interface("loopback")
        writer.write_packet(ip_bytes, interface=lo, timestamp_ns=time.time_ns(),
                            direction=OUTBOUND, comment="pid 1234 (curl)")

Blocks (pcapng, draft-ietf-opsawg-pcapng): one Section Header, one Interface
Description per interface (LINKTYPE_RAW by default: the packets are bare IP,
v4 or v6, as a divert handle returns them), then one Enhanced Packet Block per
packet with `epb_flags` carrying the direction and `opt_comment` the process.
Everything is written little-endian; readers follow the byte-order magic.
Each write is flushed, so `tail -f`/`tshark -r -` see packets as they come.
"""

from __future__ import annotations

import platform
import struct
import sys
from typing import BinaryIO, Sequence

import numpy as np

from oisp.safefile import open_private_file

LINKTYPE_RAW = 101  # raw IPv4 or IPv6, told apart by the version nibble
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229

# epb_flags bits 0-1: the direction of the packet.
DIRECTION_UNKNOWN, INBOUND, OUTBOUND = 0, 1, 2

_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_OS, _SHB_USERAPPL = 3, 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL = 2, 3, 9
_EPB_FLAGS = 2

_EPB_HEADER = np.dtype([("type", "<u4"), ("total", "<u4"), ("interface", "<u4"), ("ts_high", "<u4"),
                        ("ts_low", "<u4"), ("captured", "<u4"), ("original", "<u4")])
_SEGMENTS = 5  # per packet: header, data, padding, options, trailing length


def _pad4(n: int) -> int:
    return -n % 4


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * _pad4(len(value))


def _options(options: list[bytes]) -> bytes:
    return b"".join(options) + struct.pack("<HH", _OPT_END, 0) if options else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def _gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices that concatenate the ranges [start, start+length) in order."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)


class PcapngWriter:
    """Writes one pcapng section to a binary stream."""

    def __init__(self, stream: BinaryIO, *, application: str | None = None, flush: bool = True,
                 close_stream: bool = False):
        self.stream = stream
        self.flush_each = flush
        self.close_stream = close_stream
        self.packets = 0
        self.bytes = 0
        self._interfaces = 0
        self._option_blobs: dict[tuple[int, str | None], bytes] = {}
        if application is None:
            from oisp import __version__

            application = f"oisp {__version__}"
        options = [_option(_SHB_OS, f"{platform.system()} {platform.release()}".encode()),
                   _option(_SHB_USERAPPL, application.encode())]
        body = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + _options(options)  # section length unknown
        self._write(_block(_SHB, body))

    @classmethod
    def open(cls, path: str, **kw) -> PcapngWriter:
        """A writer on a file path, or on stdout for "-"."""
        if path == "-":
            return cls(sys.stdout.buffer, **kw)
        # Packets carry whatever crossed the wire: 0600, and never written through a link (under sudo).
        return cls(open_private_file(path, "wb"), close_stream=True, **kw)

    def add_interface(self, name: str, *, description: str | None = None, linktype: int = LINKTYPE_RAW,
                      snaplen: int = 0, tsresol: int = 9) -> int:
        """Write an Interface Description Block; returns its interface id for packets.
        Timestamps are in units of 10**-tsresol seconds (9: nanoseconds)."""
        options = [_option(_IF_NAME, name.encode())]
        if description:
            options.append(_option(_IF_DESCRIPTION, description.encode()))
        options.append(_option(_IF_TSRESOL, bytes([tsresol])))
        self._write(_block(_IDB, struct.pack("<HHI", linktype, 0, snaplen) + _options(options)))
        self._interfaces += 1
        return self._interfaces - 1

    def write_packet(self, packet, *, interface: int, timestamp_ns: int, direction: int = DIRECTION_UNKNOWN,
                     comment: str | None = None) -> None:
        data = np.frombuffer(packet, dtype=np.uint8)
        self.write_batch(data, np.array([0]), np.array([len(data)]), interfaces=np.array([interface]),
                         timestamps=np.array([timestamp_ns], dtype=np.uint64), directions=np.array([direction]),
                         comments=[comment], comment_ids=np.array([0]))

    def write_batch(self, data, offsets, lengths, *, interfaces, timestamps, directions=None,
                    comments: Sequence[str | None] = (), comment_ids=None) -> None:
        """Write len(offsets) packets found at data[offsets[i]:offsets[i]+lengths[i]].

        `interfaces`, `timestamps` (in the interface's resolution), `directions`
        (DIRECTION_UNKNOWN/INBOUND/OUTBOUND) and `comment_ids` are per-packet
        arrays; comment_ids index `comments`, -1 for none.
        """
        n = len(offsets)
        if n == 0:
            return
        data = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        directions = np.zeros(n, np.int64) if directions is None else np.asarray(directions, dtype=np.int64)
        comment_ids = np.full(n, -1, np.int64) if comment_ids is None else np.asarray(comment_ids, dtype=np.int64)

        # Options: one blob per distinct (direction, comment) in the batch.
        keys = directions * (len(comments) + 1) + (comment_ids + 1)
        unique_keys, which = np.unique(keys, return_inverse=True)
        blobs = [self._option_blob(int(k) // (len(comments) + 1), int(k) % (len(comments) + 1) - 1, comments)
                 for k in unique_keys]
        blob_lengths = np.array([len(b) for b in blobs], dtype=np.int64)
        blob_starts = np.concatenate(([0], np.cumsum(blob_lengths)[:-1]))

        padding = -lengths % 4
        option_lengths = blob_lengths[which]
        totals = 28 + lengths + padding + option_lengths + 4

        headers = np.empty(n, dtype=_EPB_HEADER)
        headers["type"] = _EPB
        headers["total"] = totals
        headers["interface"] = interfaces
        timestamps = np.asarray(timestamps, dtype=np.uint64)
        headers["ts_high"] = timestamps >> np.uint64(32)
        headers["ts_low"] = timestamps & np.uint64(0xFFFFFFFF)
        headers["captured"] = lengths
        headers["original"] = lengths
        trailers = totals.astype("<u4")

        # One source buffer, one gather: header, packet, padding, options, trailer per packet.
        header_bytes = headers.view(np.uint8)
        zeros_at = len(header_bytes) + len(data)
        blobs_at = zeros_at + 3
        trailers_at = blobs_at + int(blob_lengths.sum())
        source = np.concatenate((header_bytes, data, np.zeros(3, np.uint8),
                                 np.frombuffer(b"".join(blobs), np.uint8), trailers.view(np.uint8)))
        index = np.arange(n, dtype=np.int64)
        starts = np.empty((n, _SEGMENTS), np.int64)
        sizes = np.empty((n, _SEGMENTS), np.int64)
        starts[:, 0], sizes[:, 0] = index * 28, 28
        starts[:, 1], sizes[:, 1] = len(header_bytes) + offsets, lengths
        starts[:, 2], sizes[:, 2] = zeros_at, padding
        starts[:, 3], sizes[:, 3] = blobs_at + blob_starts[which], option_lengths
        starts[:, 4], sizes[:, 4] = trailers_at + index * 4, 4
        self._write(source[_gather_ranges(starts.ravel(), sizes.ravel())])
        self.packets += n
        self.bytes += int(lengths.sum())

    def _option_blob(self, direction: int, comment_id: int, comments) -> bytes:
        comment = comments[comment_id] if comment_id >= 0 else None
        key = (direction, comment)
        blob = self._option_blobs.get(key)
        if blob is None:
            options = []
            if direction:
                options.append(_option(_EPB_FLAGS, struct.pack("<I", direction)))
            if comment:
                options.append(_option(_OPT_COMMENT, comment.encode()))
            blob = self._option_blobs[key] = _options(options)
        return blob

    def _write(self, data) -> None:
        self.stream.write(data)
        if self.flush_each:
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        try:
            self.stream.flush()
        finally:
            if self.close_stream:
                self.stream.close()

    def __enter__(self) -> PcapngWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
