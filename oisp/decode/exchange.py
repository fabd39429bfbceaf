"""Protocol-neutral exchange layer: HTTP messages in, decoded AI requests and responses out.

Undoes Content-Encoding, classifies each request with the spec, parses its body
with the provider's request parser, and feeds the response body — framed as
SSE, NDJSON, a streamed JSON array or one JSON document — to the provider's
assembler as it arrives, so time to first token is the arrival time of the
first content delta.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from oisp.decode.content_encoding import BodyDecoder, ContentDecodingError
from oisp.decode.context import Direction, FlowContext
from oisp.decode.framing import JSONArraySplitter, NDJSONSplitter
from oisp.decode.messages import Body, End, HttpMessage, RequestHead, ResponseHead, header
from oisp.decode.providers import FORMATS, ResponseAssembler
from oisp.decode.records import DecodeRecord, Exchange, RequestComplete, ResponseComplete, StreamDelta
from oisp.decode.sse import SSEParser
from oisp.spec import EndpointMatch, Spec

MAX_BODY_BYTES = 32 * 1024 * 1024  # decoded bytes of one message body that are kept or parsed; the rest is not decoded
_PIECE = 256 * 1024  # decoded bytes handed on at a time, so a framed body is parsed as it inflates


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


class _BodyIn:
    """One message body's content decoding, within MAX_BODY_BYTES of output.

    Past the budget the body is marked truncated and nothing more of it is
    decoded: a small compressed body can expand without end, and what is not
    decoded costs neither memory nor time. Decoding problems are counted once
    and stop the body's decoding too; the connection itself is unaffected.
    """

    def __init__(self, headers: list[tuple[str, str]], exchange: Exchange, on_error: Callable[[str], None],
                 on_truncated: Callable[[], None]) -> None:
        self._ex = exchange
        self._on_error = on_error
        self._on_truncated = on_truncated
        self._left = MAX_BODY_BYTES
        self.truncated = False
        self._decoder: BodyDecoder | None
        try:
            self._decoder = BodyDecoder(header(headers, "content-encoding"))
        except ContentDecodingError:
            exchange.problems.append("content_decoding_failed")
            self._decoder = None

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes ``data`` adds, at most _PIECE at a time."""
        decoder = self._decoder
        if decoder is None:
            return
        decoder.feed(data)
        while True:
            try:
                piece = decoder.read(min(_PIECE, self._left + 1))
            except ContentDecodingError:
                self._ex.problems.append("content_decoding_failed")
                self._on_error("content decoding failed")
                self._decoder = None
                return
            if not piece:
                return
            if len(piece) > self._left:
                self.truncated, self._decoder = True, None
                self._ex.problems.append("body_truncated")
                self._on_truncated()
                if self._left:
                    yield piece[: self._left]
                return
            self._left -= len(piece)
            yield piece


@dataclass
class _Live:
    exchange: Exchange
    req_in: _BodyIn
    req_body: bytearray = field(default_factory=bytearray)
    request_done: bool = False
    resp_in: _BodyIn | None = None
    resp_body: bytearray = field(default_factory=bytearray)
    assembler: ResponseAssembler | None = None
    # Turns decoded response bytes into assembler calls; None until the response can be parsed.
    framer: Callable[[bytes, float], list[dict[str, Any]]] | None = None
    closer: Callable[[bytes, float], list[dict[str, Any]]] | None = None
    whole_body: bool = False
    chunks: int = 0
    upgrade_match: EndpointMatch | None = None  # a WebSocket upgrade's endpoint: the socket's, not an AI exchange


class ExchangeTracker:
    def __init__(self, ctx: FlowContext, spec: Spec, protocol: str, on_error: Callable[[str], None],
                 on_truncated: Callable[[], None]) -> None:
        self._ctx = ctx
        self._spec = spec
        self._protocol = protocol
        self._on_error = on_error
        self._on_truncated = on_truncated  # a body reached MAX_BODY_BYTES
        self._live: dict[int, _Live] = {}

    def handle(self, msg: HttpMessage) -> list[DecodeRecord]:
        out: list[DecodeRecord] = []
        if isinstance(msg, RequestHead):
            ex = Exchange(msg.stream, self._protocol, msg.method, msg.target, msg.authority or self._ctx.sni, msg.headers, msg.ts)
            self._live[msg.stream] = _Live(ex, self._body_in(msg.headers, ex))
            return out
        live = self._live.get(msg.stream)
        if live is None:
            return out  # e.g. a server-initiated stream, or the tail of a message we did not see begin
        ex = live.exchange
        if isinstance(msg, ResponseHead):
            ex.status, ex.response_headers, ex.response_ts = msg.status, msg.headers, msg.ts
            live.resp_in = self._body_in(msg.headers, ex)
            if live.request_done:
                self._start_response(live, out, msg.ts)
        elif isinstance(msg, Body):
            if msg.direction is Direction.REQUEST:
                ex.request_wire_bytes += len(msg.data)
                for piece in live.req_in.pieces(msg.data):
                    live.req_body += piece
            else:
                ex.response_wire_bytes += len(msg.data)
                for piece in live.resp_in.pieces(msg.data) if live.resp_in is not None else ():
                    if live.framer is not None:
                        self._deltas(live, live.framer, piece, msg.ts, out)
                    else:
                        live.resp_body += piece
        elif isinstance(msg, End):
            if msg.direction is Direction.REQUEST and not live.request_done:
                self._finish_request(live, msg.ts, out)
            elif msg.direction is Direction.RESPONSE and ex.response_end_ts is None:
                if not live.request_done:
                    self._finish_request(live, msg.ts, out)
                ex.complete = not msg.aborted and ex.status is not None
                self._finish_response(live, msg.ts, out)
        return out

    def close(self, ts: float) -> list[DecodeRecord]:
        """The connection ended: report every answered-in-part exchange as it stands."""
        out: list[DecodeRecord] = []
        for live in list(self._live.values()):
            if live.request_done:
                live.exchange.problems.append("response_incomplete")
                self._finish_response(live, ts, out)
        return out

    # -- request ---------------------------------------------------------------------------
    def _finish_request(self, live: _Live, ts: float, out: list[DecodeRecord]) -> None:
        ex = live.exchange
        live.request_done = True
        ex.request_end_ts = ts
        ex.request_body = bytes(live.req_body)
        body = _json(ex.request_body) if ex.request_body and not live.req_in.truncated else None
        body = body if isinstance(body, dict) else None
        ex.match = self._spec.match(ex.authority, ex.target, port=self._ctx.server[1], body=body)
        if ex.match is not None and (header(ex.request_headers, "upgrade") or "").lower() == "websocket":
            # The upgrade GET asks for nothing: the AI requests come over the socket it opens.
            live.upgrade_match, ex.match = ex.match, None
        if ex.match is not None:
            fmt = FORMATS.get(ex.match.api, FORMATS["generic"])
            info = self._guard(lambda: fmt.parse_request(body or {}))
            if info is not None:
                info.model = info.model or ex.match.params.get("model")
                info.streaming = info.streaming or ex.match.streaming_path
                ex.ai_request = info
            live.assembler = fmt.assembler()
        out.append(RequestComplete(ex))
        if ex.status is not None:
            self._start_response(live, out, ts)

    def take_upgrade(self, stream: int, headers: list[tuple[str, str]],
                     ts: float) -> tuple[Exchange, EndpointMatch | None] | None:
        """A 101 answering ``stream``'s WebSocket upgrade: that exchange leaves this tracker, with
        the endpoint its socket speaks."""
        live = self._live.get(stream)
        if live is None or (header(live.exchange.request_headers, "upgrade") or "").lower() != "websocket":
            return None
        del self._live[stream]
        ex = live.exchange
        ex.status, ex.response_headers, ex.response_ts, ex.complete = 101, headers, ts, True
        return ex, live.upgrade_match

    # -- response --------------------------------------------------------------------------
    def _start_response(self, live: _Live, out: list[DecodeRecord], ts: float) -> None:
        ex, asm = live.exchange, live.assembler
        if asm is None:
            return
        ctype = (header(ex.response_headers, "content-type") or "").lower()
        api = ex.match.api if ex.match else ""
        if "text/event-stream" in ctype:
            sse = SSEParser(self._on_error)
            live.framer = lambda data, t: [d for ev in sse.feed(data) for d in asm.on_sse(ev, t)]
        elif "ndjson" in ctype or "jsonl" in ctype or api.startswith("ollama."):
            nd = NDJSONSplitter(self._on_error)
            live.framer = lambda data, t: [d for line in nd.feed(data) for d in self._on_json(asm, line, t)]
            live.closer = lambda _unused, t: [d for line in nd.close() for d in self._on_json(asm, line, t)]
        elif api == "gemini.generate" and ex.match is not None and ex.match.streaming_path:
            arr = JSONArraySplitter(self._on_error)
            live.framer = lambda data, t: [d for el in arr.feed(data) for d in self._on_json(asm, el, t)]
        else:
            live.whole_body = True
            return
        if live.resp_body:
            buffered, live.resp_body = bytes(live.resp_body), bytearray()
            self._deltas(live, live.framer, buffered, ts, out)

    def _on_json(self, asm: ResponseAssembler, raw: bytes, ts: float) -> list[dict[str, Any]]:
        obj = _json(raw)
        if obj is None:
            self._on_error("stream element is not JSON")
            return []
        return asm.on_json(obj, ts)

    def _deltas(self, live: _Live, fn: Callable[..., list[dict[str, Any]]], data: Any, ts: float,
                out: list[DecodeRecord]) -> None:
        deltas = self._guard(lambda: fn(data, ts)) if data or fn is live.closer else None
        for d in deltas or ():
            out.append(StreamDelta(live.exchange, live.chunks, d, ts))
            live.chunks += 1

    def _finish_response(self, live: _Live, ts: float, out: list[DecodeRecord]) -> None:
        ex = live.exchange
        del self._live[ex.stream]
        ex.response_end_ts = ts
        if live.assembler is not None:
            if live.framer is None and ex.status is not None:
                self._start_response(live, out, ts)
            truncated = live.resp_in is not None and live.resp_in.truncated
            if live.closer is not None and not truncated:  # a truncated stream's last piece is cut short
                self._deltas(live, live.closer, b"", ts, out)
            if live.whole_body and live.resp_body and not truncated:
                obj = _json(bytes(live.resp_body))
                if obj is None:
                    ex.problems.append("response_body_not_json")
                else:
                    asm = live.assembler
                    self._guard(lambda: asm.on_body(obj, ts))
            ex.ai_response = live.assembler.finish()
        out.append(ResponseComplete(ex))

    # -- helpers ---------------------------------------------------------------------------
    def _body_in(self, headers: list[tuple[str, str]], ex: Exchange) -> _BodyIn:
        return _BodyIn(headers, ex, self._on_error, self._on_truncated)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        # A provider parser meeting a body it did not expect must cost one count, not the flow.
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - counted and reported, see DecodeStats
            self._on_error(f"{type(e).__name__}: {e}")
            return None
