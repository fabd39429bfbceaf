"""What the caller knows about a connection before any byte is decoded."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Direction(enum.Enum):
    REQUEST = "client_to_server"
    RESPONSE = "server_to_client"


@dataclass(frozen=True)
class FlowContext:
    """Flow metadata. Addresses are (ip, port); everything but the addresses is optional."""

    client: tuple[str, int]
    server: tuple[str, int]
    start_ts: float
    pid: int | None = None
    process_name: str | None = None
    sni: str | None = None
    alpn: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    flow_id: str | None = None  # a caller's own correlation id, copied into events

    @property
    def tls(self) -> bool:
        return self.tls_version is not None or self.sni is not None
