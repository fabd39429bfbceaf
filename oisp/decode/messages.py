"""HTTP messages in protocol-neutral form: what HTTP/1.1 and HTTP/2 hand the exchange layer.

``stream`` names one request/response pair: its sequence number on an
HTTP/1.1 connection, its stream id on HTTP/2. Header names are lower-case.
"""

from __future__ import annotations

from dataclasses import dataclass

from oisp.decode.context import Direction

Headers = list[tuple[str, str]]


class ProtocolError(ValueError):
    """The bytes are not the protocol they claimed to be; the connection is no longer decoded."""


@dataclass(frozen=True)
class RequestHead:
    stream: int
    method: str
    target: str
    authority: str | None
    headers: Headers
    http_version: str
    ts: float


@dataclass(frozen=True)
class ResponseHead:
    stream: int
    status: int
    headers: Headers
    ts: float


@dataclass(frozen=True)
class Body:
    stream: int
    direction: Direction
    data: bytes  # as on the wire after transfer framing, still content-encoded
    ts: float


@dataclass(frozen=True)
class End:
    stream: int
    direction: Direction
    ts: float
    aborted: bool = False  # HTTP/2 RST_STREAM: the message stops here unfinished


HttpMessage = RequestHead | ResponseHead | Body | End


def header(headers: Headers, name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None
