"""The lean provider's WebSocket side: the Responses API's WebSocket mode (wss://…/v1/responses).

lean_provider.py hands a connection here when its request is an HTTP/1.1
``Upgrade: websocket``. wsproto (sans-IO, so it fits the provider's selectors
loop) answers the handshake — Sec-WebSocket-Accept, and permessage-deflate only
when the client offered it — and does the framing (unmasking the client's
frames, compressing ours with the connection's deflate context).

Each client ``response.create`` is answered with the Responses API's documented
server events, one JSON text message each: ``response.created``, one
``response.output_text.delta`` per piece (metadata ``stream_chunks``, 500 by
default: the pieces of lean_provider.py's SSE ``ttfc`` stream, "w0 ", "w1 ", …),
and ``response.completed`` with the whole text and USAGE. The provider paces them like its SSE events (one
message per TLS record, --stream-gap apart). The replies are deterministic so
the client can check each message as text (lean_ws_client.py) and the benchmark
can check what oisp recorded.
"""

from __future__ import annotations

import functools
import json
from collections import deque

from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, Request,
                            TextMessage)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

PATH = "/v1/responses"
MODEL = "gpt-4.1-mini-2025-04-14"
ITEM = "msg_lean0001"
STREAM_PIECES = 500
MAX_PIECES = 100_000
MAX_MESSAGE = 1024 * 1024  # a response.create larger than this closes the socket (1009)
# Numbers unlike the SSE stream's (11/9/20), so a recorded usage cannot pass for the other workload's.
USAGE = {"input_tokens": 13, "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 500,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 513}


def stream_pieces(body: dict) -> int:
    """The delta count a response.create asks for: metadata.stream_chunks (metadata values are
    strings in the Responses API), STREAM_PIECES by default, at most MAX_PIECES."""
    meta = body.get("metadata")
    try:
        n = int(meta.get("stream_chunks", STREAM_PIECES)) if isinstance(meta, dict) else STREAM_PIECES
    except (TypeError, ValueError):
        n = STREAM_PIECES
    return min(max(n, 0), MAX_PIECES)


def is_upgrade(buf: bytearray) -> bool:
    """Whether the request at the head of buf (headers complete) asks for a WebSocket."""
    end = buf.find(b"\r\n\r\n")
    return end >= 0 and b"\r\nupgrade: websocket" in bytes(buf[:end]).lower()


def pieces(n: int) -> list[str]:
    """The answer's text deltas: the SSE stream's content pieces."""
    return [f"w{i} " for i in range(n)]


@functools.lru_cache(maxsize=4)
def _deltas(n: int) -> tuple[str, ...]:
    """The delta messages, made once per count: building 500 of them takes milliseconds, which
    would otherwise come before every answer's first message."""
    return tuple(json.dumps({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": ITEM,
                             "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []})
                 for i, piece in enumerate(pieces(n)))


def answer(number: int, n: int) -> list[str]:
    """The server messages answering a socket's response.create number `number` (1, 2, …)."""
    rid = f"resp_lean{number:04d}"
    head = {"id": rid, "object": "response", "created_at": 1763769600, "status": "in_progress", "model": MODEL,
            "output": [], "usage": None}
    text = "".join(pieces(n))
    done = {**head, "status": "completed", "usage": USAGE,
            "output": [{"id": ITEM, "type": "message", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]}
    return [json.dumps({"type": "response.created", "sequence_number": 0, "response": head}), *_deltas(n),
            json.dumps({"type": "response.completed", "sequence_number": n + 1, "response": done})]


class ServerSocket:
    """One WebSocket, server side: bytes in, bytes to send and the response.create bodies out."""

    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.pending: deque[dict] = deque()  # response.create bodies not answered yet
        self.answered = 0
        self.closed = False  # a close frame or a rejection went out: the socket ends after the flush
        self._text: list[str] = []

    def receive(self, data: bytes) -> bytes:
        """Take the peer's bytes; return what to send back now (the 101, pongs, a close)."""
        self.ws.receive_data(data)
        out = bytearray()
        for event in self.ws.events():
            if isinstance(event, Request):
                if event.target.split("?", 1)[0] != PATH:
                    out += self.ws.send(RejectConnection(status_code=404))
                    self.closed = True
                else:
                    out += self.ws.send(AcceptConnection(extensions=[PerMessageDeflate()]))
            elif isinstance(event, TextMessage):
                self._text.append(event.data)
                if sum(map(len, self._text)) > MAX_MESSAGE:
                    out += self._close(CloseReason.MESSAGE_TOO_BIG)
                elif event.message_finished:
                    self._message("".join(self._text))
                    self._text = []
            elif isinstance(event, BytesMessage):
                out += self._close(CloseReason.UNSUPPORTED_DATA)
            elif isinstance(event, Ping):
                out += self.ws.send(event.response())
            elif isinstance(event, CloseConnection):
                out += self.ws.send(event.response())
                self.closed = True
        return bytes(out)

    def _message(self, text: str) -> None:
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("type") == "response.create":
            self.pending.append(body)

    def _close(self, code: CloseReason) -> bytes:
        self.closed = True
        return self.ws.send(CloseConnection(code=code))

    def next_answer(self) -> list[str] | None:
        """The messages of the oldest unanswered response.create, or None."""
        if not self.pending or self.closed:
            return None
        body = self.pending.popleft()
        self.answered += 1
        return answer(self.answered, stream_pieces(body))

    def frame(self, message: str) -> bytes:
        """One server message as its frame (compressed when deflate was negotiated)."""
        return self.ws.send(TextMessage(data=message))
