"""Just enough DNS (RFC 1035) to learn addresses from answers seen on the wire.

`question(message)` reads the header and the one question of a query or a
response; `chain_addresses(message, q)` returns the A/AAAA addresses a response
gives along the CNAME chain that starts at its question's name (api.openai.com
→ CNAME → A), and nothing for other names it may carry. Which answers may be
believed at all is dns_match.py's job. Compressed names are followed, with a
hop limit so a pointer loop cannot spin. Anything malformed raises `DnsError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
CLASS_IN = 1
_MAX_POINTERS = 32
_MAX_CHAIN = 16  # names in one CNAME chain (resolvers give up near 8-16 links)


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


@dataclass(frozen=True)
class Question:
    """A message's header fields that matter here and its one question."""

    id: int
    response: bool
    name: str  # lower-cased
    rtype: int
    rclass: int
    end: int  # the offset just past the question
    answers: int  # the answer section's record count


def question(message: bytes) -> Question:
    """The header and the question of a message with exactly one (every resolver sends
    one; a response to it repeats it)."""
    if len(message) < 12:
        raise DnsError("shorter than a DNS header")
    query_id, flags, qdcount, ancount = struct.unpack_from("!HHHH", message, 0)
    if qdcount != 1:
        raise DnsError(f"{qdcount} questions, not one")
    name, offset = read_name(message, 12)
    if offset + 4 > len(message):
        raise DnsError("truncated question")
    rtype, rclass = struct.unpack_from("!HH", message, offset)
    return Question(query_id, bool(flags & 0x8000), name, rtype, rclass, offset + 4, ancount)


def chain_addresses(message: bytes, q: Question) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The A/AAAA addresses response `message` gives along its question's chain:
    the chain is the question's name and the CNAME targets followed from it, one link
    per name, at most _MAX_CHAIN long. A record for any other name is no answer to the
    question, whoever put it there."""
    records = list(_records(message, q.end, q.answers))
    aliases: dict[str, str] = {}
    for name, rtype, rclass, start, _ in records:
        if rtype == TYPE_CNAME and rclass == CLASS_IN:
            aliases.setdefault(name, read_name(message, start)[0])  # a name has one CNAME (RFC 1034 3.6.2)
    chain = [q.name]
    while chain[-1] in aliases and len(chain) < _MAX_CHAIN:
        target = aliases[chain[-1]]
        if target in chain:
            break  # a loop: the chain ends where it would repeat
        chain.append(target)
    names = set(chain)
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for name, rtype, rclass, start, rdlength in records:
        if rclass != CLASS_IN or name not in names:
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
