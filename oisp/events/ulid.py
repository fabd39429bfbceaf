"""ULIDs: 48-bit millisecond time + 80 random bits, Crockford base32, sortable by time."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid(ts: float | None = None) -> str:
    ms = int((time.time() if ts is None else ts) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))
