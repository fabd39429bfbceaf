"""What the decoder hands upward: finished requests, stream deltas, finished responses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from oisp.decode.messages import Headers
from oisp.decode.providers import AIRequestInfo, AIResponseInfo
from oisp.spec import EndpointMatch


@dataclass
class Exchange:
    """One HTTP request and its response, as far as they have been seen."""

    stream: int
    protocol: str
    method: str
    target: str
    authority: str | None
    request_headers: Headers
    request_ts: float
    request_end_ts: float | None = None
    request_body: bytes = b""  # content-decoded, at most MAX_BODY_BYTES
    request_wire_bytes: int = 0
    status: int | None = None
    response_headers: Headers = field(default_factory=list)
    response_ts: float | None = None
    response_end_ts: float | None = None
    response_wire_bytes: int = 0
    match: EndpointMatch | None = None
    ai_request: AIRequestInfo | None = None
    ai_response: AIResponseInfo | None = None
    complete: bool = False  # the response ended as its framing said it would
    problems: list[str] = field(default_factory=list)  # e.g. body_truncated, content_decoding_failed

    @property
    def path(self) -> str:
        return urlsplit(self.target).path or "/"

    @property
    def query(self) -> str:
        return urlsplit(self.target).query


@dataclass(frozen=True)
class RequestComplete:
    exchange: Exchange


@dataclass(frozen=True)
class StreamDelta:
    exchange: Exchange
    index: int  # 0, 1, 2 … within this response
    delta: dict[str, Any]  # {"delta": {...}, "finish_reason": ..., "index": choice}
    ts: float


@dataclass(frozen=True)
class ResponseComplete:
    exchange: Exchange


DecodeRecord = RequestComplete | StreamDelta | ResponseComplete
