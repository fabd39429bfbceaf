"""A WebSocket connection after its upgrade: messages in, AI exchanges and one session record out.

The upgrade (GET + 101) is not an AI exchange itself. Its spec match picks the
provider protocol spoken over the socket (by the match's ``api``); each AI
request made over the socket becomes an :class:`Exchange` of protocol
``"WebSocket"`` sharing the upgrade's target, headers (for auth) and match, and
yields the same records as an HTTP exchange. A socket whose endpoint is no AI
protocol is only counted. The session itself ends in one
:class:`SessionComplete` — when both sides have sent a close frame, or when the
connection ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable
from urllib.parse import parse_qsl

from oisp.decode.context import Direction
from oisp.decode.providers.gemini_live import LiveSocket
from oisp.decode.providers.openai_ws import RealtimeSocket, ResponsesSocket
from oisp.decode.records import DecodeRecord, Exchange
from oisp.decode.websocket import SessionStats, WebSocketSession, WSMessage
from oisp.spec import EndpointMatch

PROTOCOL = "WebSocket"

# The spec's api name of an upgrade → the protocol its socket speaks.
SOCKET_PROTOCOLS: dict[str, Callable[[Callable[[float], Exchange], str | None], Any]] = {
    "openai.responses": lambda open_exchange, _model: ResponsesSocket(open_exchange),
    "openai.realtime": RealtimeSocket,
    "gemini.live": LiveSocket,
}


@dataclass(frozen=True)
class SessionComplete:
    exchange: Exchange  # the upgrade: request line and headers, the 101's headers
    session: WebSocketSession
    ts: float  # when the session ended

    @property
    def stats(self) -> SessionStats:
        return self.session.stats


class WebSocketTracker:
    def __init__(self, upgrade: Exchange, match: EndpointMatch | None, on_error: Callable[[str], None], **limits: int) -> None:
        self.upgrade = upgrade
        self.session = WebSocketSession(upgrade.response_headers, on_error, **limits)
        self._on_error = on_error
        self._match = match
        self._streams = 0
        make = SOCKET_PROTOCOLS.get(match.api) if match is not None else None
        model = dict(parse_qsl(upgrade.query)).get("model")  # Realtime names its model in the URL
        self._protocol = make(self._open, model) if make is not None else None
        self._ended = False

    def feed(self, direction: Direction, data: bytes, ts: float) -> list[DecodeRecord]:
        out: list[DecodeRecord] = []
        for msg in self.session.feed(direction, data, ts):
            out += self._message(msg)
        if not self._ended and self.session.finished:
            out += self._end(ts)
        return out

    def close(self, ts: float) -> list[DecodeRecord]:
        return [] if self._ended else self._end(ts)

    def _end(self, ts: float) -> list[DecodeRecord]:
        self._ended = True
        out = self._protocol.close(ts) if self._protocol is not None else []
        audio = getattr(self._protocol, "audio_bytes", None)
        if audio:
            self.session.stats.client.audio_bytes, self.session.stats.server.audio_bytes = audio["client"], audio["server"]
        return [*out, SessionComplete(self.upgrade, self.session, ts)]

    def _message(self, msg: WSMessage) -> list[DecodeRecord]:
        if self._protocol is None or self._ended or not (msg.text or msg.data[:1] == b"{"):
            return []  # binary messages count only when they hold JSON (Gemini Live sends its answers so)
        if msg.truncated:
            self._on_error(f"WebSocket message of {msg.size} bytes truncated, not decoded")
            return []
        try:
            obj = json.loads(msg.data)
        except ValueError:
            self._on_error("WebSocket text message is not JSON")
            return []
        if not isinstance(obj, dict):
            return []
        try:
            if msg.direction is Direction.REQUEST:
                return self._protocol.client(obj, msg.size, msg.ts)
            return self._protocol.server(obj, msg.size, msg.ts)
        except Exception as e:  # noqa: BLE001 - a message the provider parser did not expect costs a count
            self._on_error(f"{type(e).__name__}: {e}")
            return []

    def _open(self, ts: float) -> Exchange:
        """A new exchange over this socket: the upgrade's target, headers and match; streams -1, -2 …."""
        self._streams += 1
        up = self.upgrade
        return replace(
            up, stream=-self._streams, protocol=PROTOCOL, request_ts=ts, request_end_ts=ts, request_body=b"",
            request_wire_bytes=0, response_ts=ts, response_end_ts=None, response_wire_bytes=0, match=self._match,
            ai_request=None, ai_response=None, complete=False, problems=[],
        )
