"""HTTP/1.1 in both directions, observed passively.

Each direction's bytes go to a :class:`~oisp.decode.http1_wire.WireReader`,
which cuts heads and body pieces out of them. This module decides what each
side may send next, from what both sides said (RFC 9112 §6, §9):

- one exchange at a time: a pipelined request is read once the previous
  request and its response are both complete, and a response belongs to the
  oldest unanswered request;
- a response to HEAD, a 204 and a 304 have no body; a response with neither
  Content-Length nor chunked framing runs to the close; 1xx responses are
  skipped, the final response follows;
- 101 Switching Protocols (after a request with Upgrade) and a 2xx to CONNECT
  turn the connection into a tunnel: nothing more is decoded on either side.
  A 101 is announced as :class:`Upgraded`, and the bytes each side sent after
  the switch are kept for :meth:`Http1Decoder.take_tunnel` (the WebSocket
  decoder takes over from there);
- a request or response with ``Connection: close``, or an HTTP/1.0 request,
  ends the connection after the exchange: a further request byte is an error,
  further response bytes are ignored.

These are the rules of the pair of h11 state machines this module replaced,
kept exactly (the tests check them against h11), so what comes out is the same
message for message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from oisp.decode.context import Direction
from oisp.decode.http1_wire import END, MAX_HEAD_BYTES, Head, WireReader, parse_request, parse_response
from oisp.decode.messages import Body, End, Headers, HttpMessage, ProtocolError, RequestHead, ResponseHead

__all__ = ["MAX_HEAD_BYTES", "Http1Decoder", "Upgraded"]


@dataclass(frozen=True)
class Upgraded:
    """The server answered ``stream``'s Upgrade request with 101: the connection speaks another protocol now."""

    stream: int
    headers: Headers  # the 101's header fields (Sec-WebSocket-Extensions, -Protocol …)
    ts: float

# What each side is doing. The request side moves IDLE → BODY → DONE → IDLE …;
# the response side IDLE (nothing to answer) → HEAD → BODY → IDLE ….
_IDLE = "idle"
_HEAD = "head"  # response side: waiting for the head of the answer to _resp_stream
_BODY = "body"
_DONE = "done"  # request side: sent in full, waiting for the response to end
_SWITCH_PENDING = "switch-pending"  # request side: sent in full, an Upgrade or CONNECT awaits its answer
_MUST_CLOSE = "must-close"  # request side: the connection ends after this exchange; more bytes are an error
_CLOSED = "closed"  # response side: the connection ends after this exchange; more bytes are ignored
_TUNNEL = "tunnel"  # the protocol was switched: nothing more is HTTP/1.1


class Http1Decoder:
    protocol = "HTTP/1.1"

    def __init__(self) -> None:
        self._requests = WireReader()
        self._responses = WireReader()
        self._req_state = _IDLE
        self._resp_state = _IDLE
        self._next_stream = 0
        self._req_stream = -1
        self._unanswered: deque[tuple[int, Head]] = deque()  # parsed requests awaiting a response
        self._resp_stream = -1  # the request the response side is currently answering
        self._req_keep_alive = True  # may another request follow the current one?
        self._resp_keep_alive = True  # may another response follow the current one?
        self._switch_proposed = False  # the current request asked for a new protocol (Upgrade, CONNECT)
        self._switched = False
        self._upgraded = False  # switched by a 101: the tunnel's first bytes are kept for take_tunnel
        self._response_over = False  # the current request's response has ended

    def feed(self, direction: Direction, data: bytes, ts: float) -> list[HttpMessage]:
        """Bytes one side sent; ``b""`` means that side closed."""
        if direction is Direction.REQUEST:
            if self._req_state is not _TUNNEL or not data:
                self._requests.receive(data)
        elif self._resp_state is not _TUNNEL and self._resp_state is not _CLOSED or not data:
            self._responses.receive(data)
        out: list[HttpMessage] = []
        progressed = True
        while progressed:
            progressed = self._pump_requests(ts, out) | self._pump_responses(ts, out)
        return out

    def close(self, ts: float) -> list[HttpMessage]:
        return self.feed(Direction.REQUEST, b"", ts) + self.feed(Direction.RESPONSE, b"", ts)

    # -- requests ---------------------------------------------------------------------------
    def _pump_requests(self, ts: float, out: list[HttpMessage]) -> bool:
        progressed = False
        wire = self._requests
        while True:
            state = self._req_state
            if state is _BODY:
                piece = wire.read_body()
                if piece is None:
                    break
                progressed = True
                if piece is END:
                    out.append(End(self._req_stream, Direction.REQUEST, ts))
                    self._req_state = _DONE
                    self._settle_requests()
                else:
                    out.append(Body(self._req_stream, Direction.REQUEST, piece, ts))  # type: ignore[arg-type]
            elif state is _IDLE:
                text = wire.read_head()
                if text is None:
                    if wire.eof and wire.pending():
                        raise ProtocolError("HTTP/1.1: connection closed inside a request head")
                    break
                progressed = True
                self._on_request(parse_request(text), ts, out)
            elif state is _MUST_CLOSE and wire.pending():
                raise ProtocolError("HTTP/1.1: request data after the connection was declared closing")
            else:
                break  # waiting for the response, or no longer HTTP/1.1
        started = self._start_next_response()
        return progressed or started

    def _on_request(self, head: Head, ts: float, out: list[HttpMessage]) -> None:
        self._req_stream = self._next_stream
        self._next_stream += 1
        self._unanswered.append((self._req_stream, head))
        if head.close or head.version < "1.1":
            self._req_keep_alive = False
        self._switch_proposed = head.method == "CONNECT" or head.upgrade
        self._response_over = False
        out.append(RequestHead(self._req_stream, head.method, head.target, head.host, head.headers, head.version, ts))
        # A request's body is chunked, Content-Length long, or absent (RFC 9112 §6.3): never to the close.
        self._requests.start_body(head.content_length or 0, head.chunked)
        self._req_state = _BODY

    def _settle_requests(self) -> None:
        """Once a request is complete: wait, read the next one, or expect nothing more."""
        if self._req_state is not _DONE and self._req_state is not _SWITCH_PENDING:
            return
        if self._switch_proposed:
            # Until the response says whether the protocol changes, the bytes that follow are not ours to parse.
            self._req_state = _TUNNEL if self._switched else _SWITCH_PENDING
            if self._switched and not self._upgraded:
                self._requests.discard()
        elif not self._req_keep_alive:
            self._req_state = _MUST_CLOSE
        elif self._response_over:
            self._req_state = _IDLE
        else:
            self._req_state = _DONE

    # -- responses --------------------------------------------------------------------------
    def _start_next_response(self) -> bool:
        """Start reading the answer to the oldest unanswered request, once the response side is free."""
        if self._resp_state is not _IDLE or not self._unanswered:
            return False
        stream, req = self._unanswered[0]
        self._resp_stream = stream
        # h11 keeps an HTTP/1.0 exchange open only if the request asked for keep-alive.
        if req.close or (req.version == "1.0" and not req.keep_alive_named):
            self._resp_keep_alive = False
        self._resp_state = _HEAD
        return True

    def _pump_responses(self, ts: float, out: list[HttpMessage]) -> bool:
        progressed = False
        wire = self._responses
        while True:
            state = self._resp_state
            if state is _BODY:
                piece = wire.read_body()
                if piece is None:
                    break
                progressed = True
                if piece is END:
                    out.append(End(self._resp_stream, Direction.RESPONSE, ts))
                    self._finish_exchange()
                else:
                    out.append(Body(self._resp_stream, Direction.RESPONSE, piece, ts))  # type: ignore[arg-type]
            elif state is _HEAD:
                text = wire.read_head()
                if text is None:
                    if wire.eof:
                        raise ProtocolError("HTTP/1.1: connection closed before the response ended its head")
                    break
                progressed = True
                self._on_response(parse_response(text), ts, out)
            else:
                break
        return progressed

    def _on_response(self, head: Head, ts: float, out: list[HttpMessage]) -> None:
        stream, req = self._unanswered[0]
        status = head.status
        if status < 200:
            if status == 101:
                if not req.upgrade:
                    raise ProtocolError("HTTP/1.1: 101 Switching Protocols without an Upgrade request")
                self._upgraded = True
                # HTTP/1.1's own message: FlowDecoder looks for it
                out.append(Upgraded(stream, head.headers, ts))  # type: ignore[arg-type]
                self._switch_protocols()
            return  # 100 Continue, 103 Early Hints: the final response follows
        out.append(ResponseHead(stream, status, head.headers, ts))
        if req.method == "CONNECT" and status < 300:
            self._switch_protocols()
            return
        self._switch_proposed = False  # an Upgrade not taken up: the request side carries on
        if head.close:
            self._req_keep_alive = self._resp_keep_alive = False
        elif head.version < "1.1":
            self._resp_keep_alive = False
        self._settle_requests()
        if status == 204 or status == 304 or req.method == "HEAD":
            self._responses.start_body(0, False)
        else:
            self._responses.start_body(head.content_length, head.chunked)
        self._resp_state = _BODY

    def _finish_exchange(self) -> None:
        self._unanswered.popleft()
        self._resp_stream = -1
        self._response_over = True
        if self._resp_keep_alive:
            self._resp_state = _IDLE
        else:
            self._resp_state = _CLOSED
            self._responses.discard()
        self._settle_requests()

    def _switch_protocols(self) -> None:
        self._switched = True
        self._resp_state = _TUNNEL
        if not self._upgraded:
            self._responses.discard()
        self._settle_requests()  # a request still sending its body finishes it first

    def take_tunnel(self, direction: Direction) -> bytes:
        """After :class:`Upgraded`: what that side sent after the switch so far (once; later bytes are the caller's)."""
        if not self._upgraded or (self._req_state if direction is Direction.REQUEST else self._resp_state) is not _TUNNEL:
            return b""
        wire = self._requests if direction is Direction.REQUEST else self._responses
        data = bytes(wire.buf[wire.pos:])
        wire.discard()
        return data
