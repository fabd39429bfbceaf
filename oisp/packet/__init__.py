"""Batch packet core: split, parse, checksum and rewrite IP packets in place.

A WinDivert batch is IP packets packed back to back. `parse_batch` turns one
into a numpy array of `PACKET_DTYPE` rows (one per packet, no copy of packet
data); the other functions work on a buffer plus those rows, in one GIL-free
C loop per call:

    rows = parse_batch(buf, nbytes)                    # verify=True fills *_checksum_ok
    mine = (rows["status"] == OK) & (rows["dst_port"] == 443)
    reflect(buf, rows, mine, dst_port=8443)            # swap addresses, set a port
    compute_checksums(buf, rows)                       # full recompute, if ever needed

Row status: 0 (`OK`) or the reason a packet is invalid. Framing errors
(`TRUNCATED`, `BAD_VERSION`, `BAD_HEADER_LENGTH`, `BAD_TOTAL_LENGTH`) end the
batch at that row, whose `length` then spans the rest of the buffer; the
per-packet errors (`BAD_EXTENSION_HEADER`, `L4_TRUNCATED`, `BAD_L4_HEADER`)
mark one packet and parsing goes on. Checksum and rewrite functions only
touch rows whose status is `OK` (IPv4 header checksums are still verified for
per-packet errors).

Checksum conventions: `*_checksum_ok` is 1 good, 0 bad, -1 not checked or not
applicable (IPv6 has no header checksum; a zero UDP/IPv4 checksum means
"none"; a fragment's L4 checksum covers bytes the fragment lacks). Rewrites
update checksums incrementally (RFC 1624 eqn 3), so a packet that arrived with
a bad checksum keeps a bad one, and a zero UDP/IPv4 checksum stays zero.

For one packet at a time with pydivert-like attributes, see `Packet`.
"""

from __future__ import annotations

from oisp._native.packet_core import (
    BAD_EXTENSION_HEADER,
    BAD_HEADER_LENGTH,
    BAD_L4_HEADER,
    BAD_TOTAL_LENGTH,
    BAD_VERSION,
    FIRST_PACKET_ERROR,
    L4_TRUNCATED,
    OK,
    PACKET_DTYPE,
    TCP_ACK,
    TCP_CWR,
    TCP_ECE,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    TRUNCATED,
    checksum_adjust,
    compute_checksums,
    parse_batch,
    reflect,
    rewrite,
    split_batch,
    verify_checksums,
)
from oisp.packet.view import Packet

STATUS_NAMES = {
    OK: "ok",
    TRUNCATED: "truncated",
    BAD_VERSION: "bad IP version",
    BAD_HEADER_LENGTH: "bad IP header length",
    BAD_TOTAL_LENGTH: "bad IP total length",
    BAD_EXTENSION_HEADER: "bad IPv6 extension header",
    L4_TRUNCATED: "transport header truncated",
    BAD_L4_HEADER: "bad transport header",
}

__all__ = [
    "BAD_EXTENSION_HEADER",
    "BAD_HEADER_LENGTH",
    "BAD_L4_HEADER",
    "BAD_TOTAL_LENGTH",
    "BAD_VERSION",
    "FIRST_PACKET_ERROR",
    "L4_TRUNCATED",
    "OK",
    "PACKET_DTYPE",
    "STATUS_NAMES",
    "TCP_ACK",
    "TCP_CWR",
    "TCP_ECE",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "TCP_URG",
    "TRUNCATED",
    "Packet",
    "checksum_adjust",
    "compute_checksums",
    "parse_batch",
    "reflect",
    "rewrite",
    "split_batch",
    "verify_checksums",
]
