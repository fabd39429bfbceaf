"""Read a TLS ClientHello's SNI and ALPN offer without consuming it.

The proxy must know, before any handshake, whether to decrypt (the SNI names
an AI host) and what ALPN to offer upstream (what the client offered). It
peeks at the socket and parses the handshake here; the bytes stay in the
socket for whichever TLS layer — ours or the real server's — reads them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

HANDSHAKE = 22
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
MAX_HELLO = 1 << 16  # a ClientHello never legitimately needs more (post-quantum keys included)


class NotTLS(ValueError):
    """The bytes are not the start of a TLS ClientHello."""


@dataclass(frozen=True)
class ClientHello:
    sni: str | None
    alpn: list[str] = field(default_factory=list)


def hello_complete(data: bytes) -> int | None:
    """How many bytes hold the whole ClientHello handshake message, or None if
    more are needed. Raises NotTLS when this cannot be TLS."""
    body = bytearray()
    offset = 0
    while True:
        if len(data) < offset + 5:
            return None
        content_type, major, _, length = data[offset], data[offset + 1], data[offset + 2], \
            struct.unpack_from("!H", data, offset + 3)[0]
        if content_type != HANDSHAKE or major != 3 or length == 0:
            raise NotTLS("not a TLS handshake record")
        if len(data) < offset + 5 + length:
            return None
        body += data[offset + 5: offset + 5 + length]
        offset += 5 + length
        if len(body) >= 4:
            if body[0] != CLIENT_HELLO:
                raise NotTLS("the first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(body[1:4], "big")
            if needed > MAX_HELLO:
                raise NotTLS("ClientHello too large")
            if len(body) >= needed:
                return offset
        if offset > MAX_HELLO:
            raise NotTLS("ClientHello too large")


def parse_client_hello(data: bytes) -> ClientHello:
    """SNI and ALPN from a complete ClientHello (see hello_complete). Raises NotTLS."""
    body = bytearray()
    offset = 0
    while offset + 5 <= len(data):
        length = struct.unpack_from("!H", data, offset + 3)[0]
        body += data[offset + 5: offset + 5 + length]
        offset += 5 + length
    try:
        return _parse_body(bytes(body))
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise NotTLS(f"malformed ClientHello: {exc}") from exc


def _parse_body(body: bytes) -> ClientHello:
    if not body or body[0] != CLIENT_HELLO:
        raise NotTLS("not a ClientHello")
    end = 4 + int.from_bytes(body[1:4], "big")
    pos = 4 + 2 + 32  # version, random
    pos += 1 + body[pos]  # session id
    pos += 2 + struct.unpack_from("!H", body, pos)[0]  # cipher suites
    pos += 1 + body[pos]  # compression methods
    if pos >= end:
        return ClientHello(None)
    extensions_end = pos + 2 + struct.unpack_from("!H", body, pos)[0]
    pos += 2
    sni, alpn = None, []
    while pos + 4 <= min(extensions_end, end):
        kind, length = struct.unpack_from("!HH", body, pos)
        ext = body[pos + 4: pos + 4 + length]
        pos += 4 + length
        if kind == EXT_SERVER_NAME:
            sni = _server_name(ext)
        elif kind == EXT_ALPN:
            alpn = _protocols(ext)
    return ClientHello(sni, alpn)


def _server_name(ext: bytes) -> str | None:
    pos, end = 2, 2 + struct.unpack_from("!H", ext, 0)[0]
    while pos + 3 <= end:
        name_type, length = ext[pos], struct.unpack_from("!H", ext, pos + 1)[0]
        if name_type == 0:  # host_name
            return ext[pos + 3: pos + 3 + length].decode("ascii").rstrip(".").lower()
        pos += 3 + length
    return None


def _protocols(ext: bytes) -> list[str]:
    pos, end, out = 2, 2 + struct.unpack_from("!H", ext, 0)[0], []
    while pos < end:
        length = ext[pos]
        out.append(ext[pos + 1: pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    return out
