"""A lean fake OpenAI upstream for the interception benchmark's --lean mode.

    python lean_provider.py --host 10.200.1.2 --port 443 --cert leaf.pem --key leaf.key [--stream-gap 0.001]

The default benchmark's upstream (tests/fakeprovider.py, hypercorn) spends about as
much CPU per request as the proxies under test, so on a 2-core machine it, not the
proxy, sets the pace. This one is a single-threaded selectors loop over non-blocking
stdlib `ssl` sockets with every reply prebuilt as bytes: the least Python per request
that still speaks real TLS and real HTTP/1.1 (keep-alive, Content-Length requests,
chunked SSE replies).

It answers `POST /v1/chat/completions` only:
  - without "stream": true, a fixed chat.completion (CHAT_BODY) with Content-Length;
  - with "stream": true, `text/event-stream`, chunked: a role chunk, "stream_chunks"
    content chunks (the knob fakeprovider and client.py use), a last chunk with
    finish_reason and usage, then `data: [DONE]`; every event is its own HTTP chunk
    and its own TLS record, written --stream-gap seconds apart (fakeprovider sleeps
    1 ms between events too; real streams are paced, so a proxy sees one event per read).
  - `GET /v1/responses` with `Upgrade: websocket`: the Responses API's WebSocket mode
    (lean_ws.py), each response.create answered with the same pieces as a stream, one
    message per event, paced the same way.
Anything else gets a 400 (or 404 for another path) and the connection is closed.
Pipelining is not supported: the next request is read once the reply is queued.
"""

from __future__ import annotations

import argparse
import heapq
import json
import selectors
import socket
import ssl
import sys
import time

from lean_ws import ServerSocket, is_upgrade

MODEL = "gpt-4o-mini-2024-07-18"
CREATED = 1763769600
USAGE = {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}
CHAT_BODY = json.dumps({
    "id": "chatcmpl-lean0001", "object": "chat.completion", "created": CREATED, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?",
                                         "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": USAGE, "system_fingerprint": "fp_lean01",
}).encode()
CHAT_REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_lean\r\n"
              b"content-length: %d\r\n\r\n" % len(CHAT_BODY)) + CHAT_BODY
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: req_lean\r\n"
               b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
STREAM_END = b"0\r\n\r\n"
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
MAX_CHUNKS = 100_000


def stream_events(n: int) -> list[bytes]:
    """The SSE events of a stream with n content chunks (n + 3 `data:` events in all)."""
    base = {"id": "chatcmpl-lean0001", "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
            "system_fingerprint": "fp_lean01"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "logprobs": None,
                                     "finish_reason": None}]} for i in range(n)]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                   "usage": USAGE})
    return [b"data: %s\n\n" % json.dumps(c).encode() for c in chunks] + [b"data: [DONE]\n\n"]


def chunked(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


def error_reply(status: int, reason: str) -> bytes:
    body = json.dumps({"error": {"message": reason, "type": "invalid_request_error"}}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason.encode(), len(body))) + body


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_request(buf: bytearray) -> tuple[int, bool, int] | None:
    """(bytes consumed, keep-alive, stream chunks or -1 if not streamed), or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest(431, "Request Header Fields Too Large")
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(400, "Bad Request")
    method, target, version = parts
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "Bad Request")
        headers[name.lower()] = value.strip()
    if b"transfer-encoding" in headers:
        raise BadRequest(400, "Bad Request")  # chunked request bodies: not needed, so refused
    try:
        length = int(headers.get(b"content-length", b"0"))
    except ValueError:
        raise BadRequest(400, "Bad Request") from None
    if not 0 <= length <= MAX_BODY:
        raise BadRequest(400, "Bad Request")
    if len(buf) < end + 4 + length:
        return None
    if method != b"POST" or target.split(b"?", 1)[0] != b"/v1/chat/completions":
        raise BadRequest(404, "Not Found")
    try:
        body = json.loads(bytes(buf[end + 4:end + 4 + length]))
        stream = body.get("stream") is True
        chunks = int(body.get("stream_chunks", 20)) if stream else -1
    except (ValueError, TypeError, AttributeError):
        raise BadRequest(400, "Bad Request") from None
    if chunks > MAX_CHUNKS:
        raise BadRequest(400, "Bad Request")
    connection = headers.get(b"connection", b"").lower()
    keep_alive = connection != b"close" and (version == b"HTTP/1.1" or connection == b"keep-alive")
    return end + 4 + length, keep_alive, chunks


class Conn:
    __slots__ = ("sock", "inbuf", "out", "handshaken", "busy", "close_after", "events", "keep_alive", "ws")

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock
        self.inbuf = bytearray()
        self.out: list[bytes] = []  # pending writes, each its own TLS record
        self.handshaken = False
        self.busy = False  # a reply is still being streamed: read no further requests yet
        self.close_after = False
        self.events: list[bytes] = []  # remaining stream events, newest last popped first
        self.keep_alive = True
        self.ws: ServerSocket | None = None  # set once the connection is upgraded to a WebSocket


class Server:
    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, gap: float):
        self.lsock, self.ctx, self.gap = sock, ctx, gap
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.timers: list[tuple[float, int, Conn]] = []  # (due, tie-break, conn) for paced streams
        self.streams: dict[int, list[bytes]] = {}  # prebuilt events by chunk count

    def serve_forever(self) -> None:
        while True:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    self.accept()
                else:
                    self.step(key.data, mask)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, conn = heapq.heappop(self.timers)
                if conn.busy and conn.sock.fileno() >= 0:
                    self.guarded(conn, self.next_event)

    def accept(self) -> None:
        while True:
            try:
                raw, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: keep serving the connections we have
                print(f"accept: {e}", file=sys.stderr)
                return
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            conn = Conn(sock)
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def guarded(self, conn: Conn, fn, *args) -> None:
        """Run one step of a connection; any failure closes that connection, never the server."""
        try:
            fn(conn, *args)
        except OSError:  # ssl.SSLError included: a reset, a bad handshake
            self.close(conn)
        except Exception as e:  # a bug must not take the other connections down
            print(f"connection error: {e!r}", file=sys.stderr)
            self.close(conn)

    def step(self, conn: Conn, mask: int) -> None:
        self.guarded(conn, self._step)

    def _step(self, conn: Conn) -> None:
        if not conn.handshaken:
            try:
                conn.sock.do_handshake()
            except ssl.SSLWantReadError:
                return self.want(conn, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                return self.want(conn, selectors.EVENT_WRITE)
            conn.handshaken = True
        if conn.out:
            self.flush(conn)
            if conn.out or conn.close_after:
                return
        # Read even while a stream is being sent: a peer that hangs up mid-stream must be
        # noticed, or its readable socket would wake the loop again and again.
        if self.read(conn) and not conn.busy:
            self.handle(conn)

    def read(self, conn: Conn) -> bool:
        """Take what the socket has into inbuf; False if the connection is gone."""
        while True:
            try:
                data = conn.sock.recv(65536)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLWantWriteError:
                self.want(conn, selectors.EVENT_WRITE)
                return True
            if not data or len(conn.inbuf) > MAX_HEAD + MAX_BODY:
                self.close(conn)
                return False
            conn.inbuf += data

    def handle(self, conn: Conn) -> None:
        # Requests already buffered are answered in turn; replies go out in order since each
        # is queued whole (a stream blocks the next until its last event is queued).
        while conn.inbuf and not conn.busy and not conn.close_after and conn.sock.fileno() >= 0:
            if not self.handle_one(conn):
                return

    def handle_one(self, conn: Conn) -> bool:
        """Answer the request at the head of inbuf; False if it is not all there yet."""
        if conn.ws is None and is_upgrade(conn.inbuf):
            conn.ws = ServerSocket()
        if conn.ws is not None:
            return self.handle_ws(conn)
        try:
            parsed = parse_request(conn.inbuf)
        except BadRequest as e:
            conn.inbuf.clear()
            conn.close_after = True
            self.send(conn, error_reply(e.status, e.reason))
            return True
        if parsed is None:
            return False
        consumed, conn.keep_alive, chunks = parsed
        del conn.inbuf[:consumed]
        if chunks < 0:
            conn.close_after = not conn.keep_alive
            self.send(conn, CHAT_REPLY)
            return True
        events = self.streams.get(chunks)
        if events is None:
            # Prebuilt once per chunk count (the benchmark asks for one count), reversed to pop().
            events = self.streams.setdefault(chunks, [chunked(e) for e in reversed(stream_events(chunks))])
        conn.busy = True
        conn.events = list(events)
        self.send(conn, STREAM_HEAD)
        self.next_event(conn)
        return True

    def handle_ws(self, conn: Conn) -> bool:
        """Feed all of inbuf to the WebSocket; start answering its oldest response.create."""
        if conn.inbuf:  # (wsproto would read empty bytes as the end of the connection)
            reply = conn.ws.receive(bytes(conn.inbuf))
            conn.inbuf.clear()
            conn.close_after = conn.ws.closed
            if reply:
                self.send(conn, reply)
        answer = conn.ws.next_answer()
        if answer is not None:
            conn.busy = True
            conn.events = answer[::-1]
            self.next_event(conn)
        return False  # inbuf is used up

    def next_event(self, conn: Conn) -> None:
        """Write the stream's next event; with no gap, all of them, still one record each."""
        while conn.events:
            event = conn.events.pop()
            self.send(conn, conn.ws.frame(event) if conn.ws is not None else event)
            if self.gap > 0 and conn.events:
                heapq.heappush(self.timers, (time.monotonic() + self.gap, id(conn), conn))
                return
        conn.busy = False
        if conn.ws is not None:  # a WebSocket answer has no end marker; on to the next response.create
            return self.handle_ws(conn)
        conn.close_after = not conn.keep_alive  # before the last send, whose flush closes
        self.send(conn, STREAM_END)
        self.handle(conn)

    def send(self, conn: Conn, data: bytes) -> None:
        if conn.sock.fileno() < 0:
            return
        conn.out.append(data)
        if len(conn.out) == 1:
            self.flush(conn)

    def flush(self, conn: Conn) -> None:
        while conn.out:
            head = conn.out[0]
            try:
                sent = conn.sock.send(head)
            except ssl.SSLWantWriteError:
                return self.want(conn, selectors.EVENT_WRITE)
            except ssl.SSLWantReadError:
                return self.want(conn, selectors.EVENT_READ)
            if sent < len(head):
                conn.out[0] = head[sent:]  # partial writes are on in CPython's ssl module
                return self.want(conn, selectors.EVENT_WRITE)
            conn.out.pop(0)
        if conn.close_after:
            return self.close(conn)
        self.want(conn, selectors.EVENT_READ)

    def want(self, conn: Conn, events: int) -> None:
        if conn.sock.fileno() < 0:
            return
        key = self.sel.get_key(conn.sock)
        if key.events != events:
            self.sel.modify(conn.sock, events, conn)

    def close(self, conn: Conn) -> None:
        if conn.sock.fileno() >= 0:
            self.sel.unregister(conn.sock)
            conn.sock.close()
        conn.events = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--stream-gap", type=float, default=0.001, help="seconds between SSE events (0: unpaced)")
    args = parser.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["http/1.1"])  # HTTP/1.1 only, so no proxy negotiates h2 upstream
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family, backlog=1024)
    sock.setblocking(False)
    print("ready", flush=True)
    try:
        Server(sock, ctx, args.stream_gap).serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
