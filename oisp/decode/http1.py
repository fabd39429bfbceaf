"""HTTP/1.1 in both directions, observed passively with two h11 state machines.

h11 parses one side of a conversation it takes part in, so we run a SERVER-role
machine over the client's bytes (it parses requests) and a CLIENT-role machine
over the server's bytes (it parses responses), and mirror each parsed message
into the other machine as if we had sent it. That keeps both in step: the
response parser knows a response to HEAD has no body, the request parser
releases the next pipelined request once the previous response is done.
"""

from __future__ import annotations

from collections import deque

import h11

from oisp.decode.context import Direction
from oisp.decode.messages import Body, End, HttpMessage, ProtocolError, RequestHead, ResponseHead

MAX_HEAD_BYTES = 256 * 1024
_FRAMING = {b"content-length", b"transfer-encoding"}


def _strip_framing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # A mirrored message carries no body, so its own framing headers would be a lie to h11.
    return [(k, v) for k, v in headers if k not in _FRAMING]


class Http1Decoder:
    protocol = "HTTP/1.1"

    def __init__(self) -> None:
        self._requests = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._responses = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._next_stream = 0
        self._req_stream = -1
        self._unanswered: deque[tuple[int, h11.Request]] = deque()  # parsed requests awaiting a response
        self._resp_stream = -1  # the request the response machine is currently answering

    def feed(self, direction: Direction, data: bytes, ts: float) -> list[HttpMessage]:
        out: list[HttpMessage] = []
        try:
            if direction is Direction.REQUEST:
                self._requests.receive_data(data)
            else:
                self._responses.receive_data(data)
            self._pump(ts, out)
        except (h11.ProtocolError, ValueError) as e:
            raise ProtocolError(f"HTTP/1.1: {e}") from e
        return out

    def close(self, ts: float) -> list[HttpMessage]:
        return self.feed(Direction.REQUEST, b"", ts) + self.feed(Direction.RESPONSE, b"", ts)

    def _pump(self, ts: float, out: list[HttpMessage]) -> None:
        progressed = True
        while progressed:
            progressed = self._pump_requests(ts, out) | self._pump_responses(ts, out)

    def _pump_requests(self, ts: float, out: list[HttpMessage]) -> bool:
        progressed = False
        conn = self._requests
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                break
            progressed = True
            if isinstance(ev, h11.Request):
                self._req_stream = self._next_stream
                self._next_stream += 1
                self._unanswered.append((self._req_stream, ev))
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
                host = next((v for k, v in headers if k == "host"), None)
                out.append(RequestHead(self._req_stream, ev.method.decode("latin-1"), ev.target.decode("latin-1"), host, headers, ev.http_version.decode(), ts))
            elif isinstance(ev, h11.Data):
                out.append(Body(self._req_stream, Direction.REQUEST, bytes(ev.data), ts))
            elif isinstance(ev, h11.EndOfMessage):
                out.append(End(self._req_stream, Direction.REQUEST, ts))
                self._next_cycle(conn)
        return progressed | self._start_next_response()

    def _start_next_response(self) -> bool:
        """Tell the response machine about the oldest unanswered request, once it is free."""
        conn = self._responses
        if self._resp_stream >= 0 or not self._unanswered or conn.our_state is not h11.IDLE:
            return False
        stream, req = self._unanswered[0]
        headers = _strip_framing(list(req.headers))
        if not any(k == b"host" for k, _ in headers):
            headers.append((b"host", b"unknown"))
        if req.http_version == b"1.0" and not any(k == b"connection" and b"keep-alive" in v.lower() for k, v in req.headers):
            headers.append((b"connection", b"close"))
        conn.send(h11.Request(method=req.method, target=req.target, headers=headers))
        conn.send(h11.EndOfMessage())
        self._resp_stream = stream
        return True

    def _pump_responses(self, ts: float, out: list[HttpMessage]) -> bool:
        progressed = False
        conn = self._responses
        while self._resp_stream >= 0:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                break
            progressed = True
            if isinstance(ev, h11.InformationalResponse):
                continue  # 100 Continue, 103 Early Hints: the final response follows
            if isinstance(ev, h11.Response):
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
                out.append(ResponseHead(self._resp_stream, ev.status_code, headers, ts))
                self._mirror_response(ev)
            elif isinstance(ev, h11.Data):
                out.append(Body(self._resp_stream, Direction.RESPONSE, bytes(ev.data), ts))
            elif isinstance(ev, h11.EndOfMessage):
                out.append(End(self._resp_stream, Direction.RESPONSE, ts))
                self._finish_cycle()
        return progressed

    def _mirror_response(self, resp: h11.Response) -> None:
        if self._requests.our_state is h11.SEND_RESPONSE:
            self._requests.send(h11.Response(status_code=resp.status_code, headers=_strip_framing(list(resp.headers)), reason=resp.reason))

    def _finish_cycle(self) -> None:
        self._unanswered.popleft()
        self._resp_stream = -1
        if self._requests.our_state is h11.SEND_BODY:
            self._requests.send(h11.EndOfMessage())
        self._next_cycle(self._responses)
        self._next_cycle(self._requests)

    @staticmethod
    def _next_cycle(conn: h11.Connection) -> None:
        # Keep-alive: both sides done means the next exchange may start on this connection.
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
