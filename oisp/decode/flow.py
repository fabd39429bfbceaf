"""One connection's decoder: picks HTTP/1.1 or HTTP/2, survives malformed input."""

from __future__ import annotations

from dataclasses import dataclass, field

from oisp.decode.context import Direction, FlowContext
from oisp.decode.exchange import ExchangeTracker
from oisp.decode.http1 import Http1Decoder, Upgraded
from oisp.decode.http2 import PREFACE, Http2Decoder
from oisp.decode.messages import ProtocolError
from oisp.decode.records import DecodeRecord
from oisp.decode.ws_exchange import WebSocketTracker
from oisp.spec import Spec, default_spec


@dataclass
class DecodeStats:
    bytes_request: int = 0
    bytes_response: int = 0
    decode_errors: int = 0
    last_error: str | None = None
    protocol: str | None = None
    abandoned: bool = False  # a protocol error stopped decoding this connection
    bodies_truncated: int = 0  # message bodies decoded only up to MAX_BODY_BYTES
    errors: list[str] = field(default_factory=list)  # the first few messages, for diagnostics


class FlowDecoder:
    """Sans-IO decoder of one TCP connection's plaintext.

    ``feed`` and ``close`` return the records completed by that call, in order.
    Malformed HTTP never raises: it increments ``stats.decode_errors`` and the
    rest of the connection is skipped (HTTP/1.1 cannot be resynchronised safely).
    """

    def __init__(self, ctx: FlowContext, spec: Spec | None = None, **ws_limits: int) -> None:
        """``ws_limits``: ``max_message`` / ``max_inflate`` of a WebSocket (see oisp.decode.websocket)."""
        self.ctx = ctx
        self._ws_limits = ws_limits
        self.stats = DecodeStats()
        self._spec = spec or default_spec()
        self._http: Http1Decoder | Http2Decoder | None = None
        self._tracker: ExchangeTracker | None = None
        self._held: list[tuple[Direction, bytes, float]] = []  # bytes seen before the protocol is known
        self._ws: WebSocketTracker | None = None  # after a 101 to a WebSocket upgrade
        self._closed = False
        alpn = (ctx.alpn or "").lower()
        if alpn == "h2":
            self._choose(Http2Decoder())
        elif alpn.startswith("http/1"):
            self._choose(Http1Decoder())

    def feed(self, direction: Direction, data: bytes, ts: float) -> list[DecodeRecord]:
        if direction is Direction.REQUEST:
            self.stats.bytes_request += len(data)
        else:
            self.stats.bytes_response += len(data)
        if self.stats.abandoned or self._closed or not data:
            return []
        if self._ws is not None:
            return self._run(lambda: self._ws.feed(direction, data, ts))
        if self._http is None:
            self._held.append((direction, bytes(data), ts))
            if not self._sniff():
                return []
            held, self._held = self._held, []
            out: list[DecodeRecord] = []
            for d, b, t in held:
                out += self._run(lambda: self._http_feed(d, b, t))
            return out
        return self._run(lambda: self._http_feed(direction, data, ts))

    def close(self, ts: float) -> list[DecodeRecord]:
        if self._closed:
            return []
        self._closed = True
        out: list[DecodeRecord] = []
        if self._ws is not None:
            out += self._run(lambda: self._ws.close(ts))
        elif self._http is not None and not self.stats.abandoned:
            out += self._run(lambda: self._track(self._http.close(ts)))
        if self._tracker is not None:
            out += self._run(lambda: self._tracker.close(ts))
        return out

    # -------------------------------------------------------------------------------------
    def _sniff(self) -> bool:
        sent = b"".join(b for d, b, _ in self._held if d is Direction.REQUEST)
        if sent.startswith(PREFACE):
            self._choose(Http2Decoder())
        elif len(sent) >= len(PREFACE) or (sent and not PREFACE.startswith(sent)):
            self._choose(Http1Decoder())
        return self._http is not None

    def _choose(self, http: Http1Decoder | Http2Decoder) -> None:
        self._http = http
        self.stats.protocol = http.protocol
        self._tracker = ExchangeTracker(self.ctx, self._spec, http.protocol, self._count_error, self._count_truncated)

    def _http_feed(self, direction: Direction, data: bytes, ts: float) -> list[DecodeRecord]:
        return self._track(self._http.feed(direction, data, ts))  # type: ignore[union-attr]

    def _track(self, messages: list) -> list[DecodeRecord]:
        out: list[DecodeRecord] = []
        for m in messages:
            if isinstance(m, Upgraded):
                out += self._upgrade(m)
            else:
                out += self._tracker.handle(m)  # type: ignore[union-attr]
        return out

    def _upgrade(self, m: Upgraded) -> list[DecodeRecord]:
        """A 101: a WebSocket takes the connection over, starting with what each side sent after the switch."""
        taken = self._tracker.take_upgrade(m.stream, m.headers, m.ts)  # type: ignore[union-attr]
        if taken is None:
            return []  # another protocol (h2c …): not decoded, as before
        self.stats.protocol = "WebSocket"
        upgrade, match = taken
        self._ws = WebSocketTracker(upgrade, match, self._count_error, **self._ws_limits)
        out: list[DecodeRecord] = []
        for d in Direction:
            out += self._ws.feed(d, self._http.take_tunnel(d), m.ts)  # type: ignore[union-attr]
        return out

    def _run(self, step) -> list[DecodeRecord]:
        try:
            return step()
        except ProtocolError as e:
            self._count_error(str(e))
        except Exception as e:  # noqa: BLE001 - a decoder bug must not stop capture; it is counted
            self._count_error(f"{type(e).__name__}: {e}")
        self.stats.abandoned = True
        return []

    def _count_truncated(self) -> None:
        self.stats.bodies_truncated += 1

    def _count_error(self, message: str) -> None:
        self.stats.decode_errors += 1
        self.stats.last_error = message
        if len(self.stats.errors) < 8:
            self.stats.errors.append(message)
