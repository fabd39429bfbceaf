"""OpenAI's Responses API in WebSocket mode (``wss://api.openai.com/v1/responses``).

Each client ``response.create`` message carries the fields of a POST
/v1/responses body and is one exchange; the server answers with the events of
the SSE stream, one JSON message each, so the SSE stream's
:class:`~oisp.decode.providers.openai.ResponsesAssembler` assembles them. The
responses of one socket run one after another: server events belong to the
oldest unanswered ``response.create``, which ends at ``response.completed`` /
``.failed`` / ``.incomplete`` or an ``error`` event.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Mapping

from oisp.decode.providers.openai import ResponsesAssembler, parse_responses_request
from oisp.decode.records import DecodeRecord, Exchange, RequestComplete, ResponseComplete, StreamDelta

_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


class ResponsesSocket:
    """One socket's ``response.create`` messages and the events answering them, as exchanges."""

    def __init__(self, open_exchange: Callable[[float], Exchange]) -> None:
        self._open = open_exchange
        self._pending: deque[tuple[Exchange, ResponsesAssembler, list[int]]] = deque()

    def client(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        if obj.get("type") != "response.create":
            return []  # response.steer, response.cancel …: no new exchange
        body = obj["response"] if isinstance(obj.get("response"), Mapping) else obj
        ex = self._open(ts)
        ex.request_wire_bytes = size
        info = parse_responses_request(body)
        info.streaming = True  # the answer always comes as events
        if body.get("generate") is False:
            info.parameters["generate"] = False  # a warm-up: prepares state, generates nothing
        ex.ai_request = info
        self._pending.append((ex, ResponsesAssembler(), [0]))
        return [RequestComplete(ex)]

    def server(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        if not self._pending:
            return []  # e.g. an error about a message that was no response.create
        ex, asm, chunks = self._pending[0]
        ex.response_wire_bytes += size
        out: list[DecodeRecord] = []
        for d in asm.on_json(obj, ts):
            out.append(StreamDelta(ex, chunks[0], d, ts))
            chunks[0] += 1
        if obj.get("type") in _TERMINAL:
            self._pending.popleft()
            ex.complete = True
            ex.response_end_ts = ts
            ex.ai_response = asm.finish()
            out.append(ResponseComplete(ex))
        return out

    def close(self, ts: float) -> list[DecodeRecord]:
        out: list[DecodeRecord] = []
        while self._pending:
            ex, asm, _ = self._pending.popleft()
            ex.problems.append("response_incomplete")
            ex.response_end_ts = ts
            ex.ai_response = asm.finish()
            out.append(ResponseComplete(ex))
        return out
