"""WINDIVERT_ADDRESS as a numpy dtype, so a batch's addresses are one array.

Layout (80 bytes, WinDivert 2.2 and eBPFDivert alike): Timestamp i64 at 0; a
u32 of bitfields at 8 (Layer 0–7, Event 8–15, then the flag bits below); the
layer's union at 16. The union's views overlap, as in C.
"""

from __future__ import annotations

import ipaddress

import numpy as np

from oisp.divert.constants import ADDRESS_SIZE

SNIFFED = 1 << 16
OUTBOUND = 1 << 17
LOOPBACK = 1 << 18
IMPOSTOR = 1 << 19
IPV6 = 1 << 20
IP_CHECKSUM = 1 << 21
TCP_CHECKSUM = 1 << 22
UDP_CHECKSUM = 1 << 23

_FIELDS = {
    "timestamp": ("<i8", 0),
    "bits": ("<u4", 8),
    # NETWORK / NETWORK_FORWARD
    "if_idx": ("<u4", 16),
    "sub_if_idx": ("<u4", 20),
    # FLOW / SOCKET
    "endpoint_id": ("<u8", 16),
    "parent_endpoint_id": ("<u8", 24),
    "process_id": ("<u4", 32),
    "local_addr": (("<u4", 4), 36),
    "remote_addr": (("<u4", 4), 52),
    "local_port": ("<u2", 68),
    "remote_port": ("<u2", 70),
    "protocol": ("u1", 72),
    # REFLECT
    "reflect_timestamp": ("<i8", 16),
    "reflect_process_id": ("<u4", 24),
    "reflect_layer": ("<u4", 28),
    "reflect_flags": ("<u8", 32),
    "reflect_priority": ("<i2", 40),
}

ADDRESS_DTYPE = np.dtype({
    "names": list(_FIELDS),
    "formats": [fmt for fmt, _ in _FIELDS.values()],
    "offsets": [off for _, off in _FIELDS.values()],
    "itemsize": ADDRESS_SIZE,
})


def new_addresses(count: int) -> np.ndarray:
    """A zeroed array of `count` addresses, ready to pass to recv/send."""
    return np.zeros(count, dtype=ADDRESS_DTYPE)


def layer_of(bits):
    return bits & 0xFF


def event_of(bits):
    return (bits >> 8) & 0xFF


def set_flag(addresses: np.ndarray, flag: int, on) -> None:
    """Set or clear one flag bit on all (or, with a boolean array `on`, some) addresses."""
    bits = addresses["bits"]
    on = np.asarray(on, dtype=bool)
    addresses["bits"] = np.where(on, bits | np.uint32(flag), bits & np.uint32(~flag & 0xFFFFFFFF))


def row_key(address) -> bytes:
    """An address as the 16 bytes of a parsed packet row: IPv4 in the first 4, the rest
    zero. Takes 4- or 16-byte keys, strings and ipaddress objects; an IPv4-mapped IPv6
    address (a dual-stack socket's view of an IPv4 peer) counts as IPv4."""
    if isinstance(address, (bytes, bytearray)):
        return bytes(address).ljust(16, b"\0")
    return unmapped(address).packed.ljust(16, b"\0")


def unmapped(address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address (text, with or without a %zone, or an ipaddress object) as an ipaddress
    object, with an IPv4-mapped IPv6 address (::ffff:a.b.c.d: how a dual-stack socket or
    the FLOW/SOCKET layers show an IPv4 peer) as the IPv4 address it stands for. The one
    home of that rule."""
    parsed = ipaddress.ip_address(address.split("%")[0] if isinstance(address, str) else address)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
        return parsed.ipv4_mapped
    return parsed


def flow_address(words) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A FLOW/SOCKET address: a host-order IPv6 address as u32[4], least significant
    word first; IPv4 comes IPv4-mapped (::ffff:a.b.c.d) and is returned as IPv4."""
    value = 0
    for i, word in enumerate(words):
        value |= int(word) << (32 * i)
    return unmapped(ipaddress.IPv6Address(value))
