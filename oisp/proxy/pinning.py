"""Which clients are shown the real server instead of our certificate.

A client that pins its server's certificate (or one that does not trust our CA)
refuses our leaf, and will refuse it again: its later connections to that name
are better passed through undecrypted than broken. But a pin blinds the
sensor, so it must be earned and stay local:

- it is per client program and user, and SNI: one program that refuses us
  says nothing about the others talking to the same host;
- only a refusal of the certificate counts (the client sent a TLS alert about
  it: unknown CA, bad certificate, handshake failure, ...), and only
  `rejections` of them within `ttl`: a client that merely closed, timed out or
  sent nothing never pins;
- a pin lasts `ttl` seconds, and at most `limit` pins and as many pending
  rejection counts are kept (least recently touched go first).

Decisions only: no I/O, the caller passes the time, so tests drive it directly.
"""

from __future__ import annotations

import ssl
from collections import Counter, OrderedDict

REJECTIONS = 2
PIN_TTL = 600.0
LIMIT = 4096

# TLS alerts a client sends about our certificate (OpenSSL's reason names end so), and
# handshake_failure, which some clients send for the same. All of them come after the
# server's first flight, which holds the certificate.
CERTIFICATE_ALERTS = ("ALERT_BAD_CERTIFICATE", "ALERT_UNSUPPORTED_CERTIFICATE", "ALERT_CERTIFICATE_REVOKED",
                      "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_UNKNOWN", "ALERT_UNKNOWN_CA",
                      "ALERT_ACCESS_DENIED", "ALERT_HANDSHAKE_FAILURE")

Client = tuple  # (program: exe path or name, user): who the client is, as far as known


def rejects_certificate(exc: BaseException) -> bool:
    """Whether a failed client-side handshake means the client refused our certificate."""
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    return bool(reason) and reason.endswith(CERTIFICATE_ALERTS)  # type: ignore[union-attr]  # bool(reason): not None


class PinningPolicy:
    """`pinned(client, sni, now)` before intercepting; `rejected(...)` after a client
    refused our certificate (True when that made the pin)."""

    def __init__(self, rejections: int = REJECTIONS, ttl: float = PIN_TTL, limit: int = LIMIT):
        self.rejections, self.ttl, self.limit = rejections, ttl, limit
        self._pins: OrderedDict[tuple, float] = OrderedDict()  # (client, sni) → expiry
        self._strikes: OrderedDict[tuple, tuple[int, float]] = OrderedDict()  # → (count, first seen)
        self._per_sni: Counter[str] = Counter()  # pins per SNI: most connections need no client lookup

    def may_be_pinned(self, sni: str) -> bool:
        """False when no client has a pin for `sni` (then nobody need be named to decide)."""
        return self._per_sni[sni] > 0

    def pinned(self, client: Client, sni: str, now: float) -> bool:
        key = (client, sni)
        expires = self._pins.get(key)
        if expires is None:
            return False
        if expires <= now:
            self._unpin(key)
            return False
        return True

    def rejected(self, client: Client, sni: str, now: float) -> bool:
        key = (client, sni)
        if key in self._pins:
            return False
        count, first = self._strikes.pop(key, (0, now))
        if now - first > self.ttl:  # rejections that long ago no longer count
            count, first = 0, now
        count += 1
        if count < self.rejections:
            self._strikes[key] = (count, first)
            while len(self._strikes) > self.limit:
                self._strikes.popitem(last=False)
            return False
        self._pins[key] = now + self.ttl
        self._per_sni[sni] += 1
        while len(self._pins) > self.limit:
            self._unpin(next(iter(self._pins)))
        return True

    def active(self, now: float) -> int:
        """Pins in force (the expired ones are let go)."""
        for key in [k for k, expires in self._pins.items() if expires <= now]:
            self._unpin(key)
        return len(self._pins)

    def pins(self, now: float) -> list[tuple[str, str, str]]:
        """The pins in force as (program, user, sni), for a status view."""
        self.active(now)
        return [(str(client[0]), str(client[1]), sni) for client, sni in self._pins]

    def _unpin(self, key: tuple) -> None:
        del self._pins[key]
        sni = key[1]
        self._per_sni[sni] -= 1
        if not self._per_sni[sni]:
            del self._per_sni[sni]
