"""Just enough DNS (RFC 1035) to learn addresses from answers seen on the wire.

`answer_addresses(message, wanted)` returns the A/AAAA addresses a response
gives for names `wanted(name)` accepts, following CNAME chains from those
names (api.openai.com → CNAME → A). Compressed names are followed, with a hop
limit so a pointer loop cannot spin. Anything malformed raises `DnsError`.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Callable

TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
CLASS_IN = 1
_MAX_POINTERS = 32


class DnsError(ValueError):
    """A DNS message that cannot be parsed."""


def read_name(message: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` and the offset just past it (past the first pointer, if any)."""
    labels: list[str] = []
    end = None
    for _ in range(_MAX_POINTERS):
        if offset >= len(message):
            raise DnsError("name runs past the message")
        length = message[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(message):
                raise DnsError("truncated name pointer")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | message[offset + 1]
            continue
        if length & 0xC0:
            raise DnsError("reserved label type")
        if length == 0:
            return ".".join(labels).lower(), (offset + 1 if end is None else end)
        label = message[offset + 1:offset + 1 + length]
        if len(label) != length:
            raise DnsError("label runs past the message")
        labels.append(label.decode("ascii", "replace"))
        offset += 1 + length
    raise DnsError("too many compression pointers")


def _records(message: bytes, offset: int, count: int):
    for _ in range(count):
        name, offset = read_name(message, offset)
        if offset + 10 > len(message):
            raise DnsError("truncated resource record")
        rtype, rclass, _ttl, rdlength = struct.unpack_from("!HHIH", message, offset)
        offset += 10
        if offset + rdlength > len(message):
            raise DnsError("record data runs past the message")
        yield name, rtype, rclass, offset, rdlength
        offset += rdlength


def answer_addresses(message: bytes, wanted: Callable[[str], bool]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if len(message) < 12:
        raise DnsError("shorter than a DNS header")
    flags, qdcount, ancount = struct.unpack_from("!HHH", message, 2)
    if not flags & 0x8000:
        return []  # a query, not a response
    offset = 12
    matched: set[str] = set()
    for _ in range(qdcount):
        name, offset = read_name(message, offset)
        offset += 4
        if offset > len(message):
            raise DnsError("truncated question")
        if wanted(name):
            matched.add(name)
    records = list(_records(message, offset, ancount))
    matched.update(name for name, *_ in records if wanted(name))
    cnames = [(name, read_name(message, start)[0]) for name, rtype, rclass, start, _ in records
              if rtype == TYPE_CNAME and rclass == CLASS_IN]
    for _ in cnames:  # a chain may be listed in any order; each pass follows one more link
        grown = {target for name, target in cnames if name in matched} - matched
        if not grown:
            break
        matched |= grown
    addresses = []
    for name, rtype, rclass, start, rdlength in records:
        if rclass != CLASS_IN or name not in matched:
            continue
        if rtype == TYPE_A and rdlength == 4:
            addresses.append(ipaddress.IPv4Address(message[start:start + 4]))
        elif rtype == TYPE_AAAA and rdlength == 16:
            addresses.append(ipaddress.IPv6Address(message[start:start + 16]))
    return addresses


def build_query(name: str, rtype: int, query_id: int = 0x1234) -> bytes:
    """A recursive query for `name` (used by tests and diagnostics)."""
    question = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split(".")) + b"\0"
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", rtype, CLASS_IN)
