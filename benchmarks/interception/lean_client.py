"""The --lean benchmark client: client.py's interface and output on stdlib socket + ssl.

    python lean_client.py WORKLOAD --base https://api.openai.com --ca FILE [--proxy URL] [--seconds S] [--n N]

httpx costs about as much CPU per request as the proxies under test, so with it the
benchmark measures the client as much as the proxy. Here every request is one
prebuilt bytes object written with sendall(), and a reply is read by a minimal
HTTP/1.1 reader (status line, headers, Content-Length or chunked body).

Workloads and the JSON line printed are client.py's (seq, newconn, conc, ttfc), plus
"failures". Every reply is checked against what lean_provider.py sends (status 200
and the body byte for byte; a stream must end with `data: [DONE]`); a failed request
is counted, its connection dropped, and the client exits 1 after printing its result,
so a broken path fails loudly. Latencies run from before the request is written to
the body fully read. TLS is verified as client.py does it: the --ca file alone,
server_hostname from --base; --proxy http://HOST:PORT tunnels with CONNECT.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lean_provider import CHAT_BODY, stream_events  # the replies to expect

KEY = "sk-proj-BENCHKEY0123456789abcdefghijklmnopqrstuv"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
WARMUP = 20
STREAM_CHUNKS = 500


def build_request(host: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {KEY}\r\nUser-Agent: lean-client\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


class Failure(Exception):
    pass


def parse_response(buf: bytearray) -> tuple[int, int, bool, bytes] | None:
    """(bytes consumed, status, keep-alive, body) of the reply at the head of buf, or None
    if it is not all there. Content-Length or chunked bodies (a reply without either would
    be delimited by the close, which the providers here never do)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise Failure(f"bad status line {lines[0][:80]!r}") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep_alive = headers.get(b"connection") != b"close"
    start = end + 4
    if headers.get(b"transfer-encoding") == b"chunked":
        parts, pos = [], start
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            if len(buf) < eol + 2 + size + 2:
                return None
            if size == 0:  # no trailers from these providers
                return eol + 4, status, keep_alive, b"".join(parts)
            parts.append(bytes(buf[eol + 2:eol + 2 + size]))
            pos = eol + 2 + size + 2
    if b"content-length" not in headers:
        raise Failure("reply without Content-Length or chunked body")
    length = int(headers[b"content-length"])
    if len(buf) < start + length:
        return None
    return start + length, status, keep_alive, bytes(buf[start:start + length])


class Endpoint:
    """Where to connect and how: the resolved address (once, not per connection), the
    TLS context, and the CONNECT tunnel when there is a proxy."""

    def __init__(self, args):
        url = urlsplit(args.base)
        self.host, self.port = url.hostname, url.port or 443
        self.ctx = ssl.create_default_context(cafile=args.ca)  # exactly client.py's context()
        self.ctx.set_alpn_protocols(["http/1.1"])  # what httpx offers over HTTP/1.1
        if args.proxy:
            proxy = urlsplit(args.proxy)
            dial = (proxy.hostname, proxy.port or 8080)
            self.connect_request = (f"CONNECT {self.host}:{self.port} HTTP/1.1\r\n"
                                    f"Host: {self.host}:{self.port}\r\n\r\n").encode()
        else:
            dial = (self.host, self.port)
            self.connect_request = None
        family, _, _, _, self.addr = socket.getaddrinfo(*dial, type=socket.SOCK_STREAM)[0]
        self.family = family

    def connect(self) -> ssl.SSLSocket:
        raw = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            raw.settimeout(30)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.connect(self.addr)
            if self.connect_request:
                raw.sendall(self.connect_request)
                reply = b""
                while b"\r\n\r\n" not in reply:
                    data = raw.recv(4096)
                    if not data:
                        raise Failure("proxy closed during CONNECT")
                    reply += data
                if reply.split(b" ", 2)[1:2] != [b"200"]:
                    raise Failure(f"CONNECT refused: {reply[:80]!r}")
            return self.ctx.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class Connection:
    """One TLS connection and its read buffer (t0: when its request in flight was sent)."""

    __slots__ = ("sock", "buf", "t0")

    def __init__(self, endpoint: Endpoint):
        self.sock = endpoint.connect()
        self.buf = bytearray()
        self.t0 = 0.0

    def fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise Failure("connection closed by the peer")
        self.buf += data

    def exchange(self, request: bytes) -> tuple[int, bool, bytes]:
        self.sock.sendall(request)
        while (reply := parse_response(self.buf)) is None:
            self.fill()
        del self.buf[:reply[0]]
        return reply[1:]

    def stream(self, request: bytes, t0: float) -> tuple[float, bytes]:
        """Send a streamed request; (seconds from t0 to the first `data:`, whole SSE body)."""
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self.fill()
        head = bytes(self.buf[:end]).lower()
        del self.buf[:end + 4]
        if not head.startswith((b"http/1.1 200", b"http/1.0 200")) or b"transfer-encoding: chunked" not in head:
            raise Failure(f"bad stream reply {head[:200]!r}")
        first, parts, pos = None, [], 0
        while True:  # chunk by chunk as they arrive, to time the first event
            while (eol := self.buf.find(b"\r\n", pos)) < 0:
                self.fill()
            size = int(bytes(self.buf[pos:eol]).split(b";", 1)[0], 16)
            while len(self.buf) < eol + 2 + size + 2:
                self.fill()
            if size == 0:
                del self.buf[:eol + 4]
                return first, b"".join(parts)
            parts.append(bytes(self.buf[eol + 2:eol + 2 + size]))
            pos = eol + 2 + size + 2
            if first is None and b"data:" in b"".join(parts):
                first = time.perf_counter() - t0
            if pos > 65536:  # keep the buffer short without moving it per chunk
                del self.buf[:pos]
                pos = 0

    def close(self) -> None:
        self.sock.close()


def check(status: int, body: bytes) -> None:
    if status != 200 or body != CHAT_BODY:
        raise Failure(f"bad reply {status}: {body[:200]!r}")


class Tally:
    """Failures, counted; the first one kept to be shown."""

    def __init__(self):
        self.failures = 0
        self.first = ""

    def fail(self, error: BaseException) -> None:
        self.failures += 1
        if not self.first:
            self.first = f"{type(error).__name__}: {error}"


def run_requests(endpoint: Endpoint, request: bytes, deadline: float, limit: int, keepalive: bool,
                 latencies: list[float], tally: Tally, conn: Connection | None = None) -> Connection | None:
    """Sequential requests until the deadline or `limit` good replies, on one kept-alive
    connection (returned, still open) or a new one each."""
    while time.perf_counter() < deadline and len(latencies) < limit:
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = Connection(endpoint)
            status, keep_alive, body = conn.exchange(request)
            check(status, body)
            latencies.append(time.perf_counter() - t0)
        except (OSError, Failure, ValueError) as e:
            tally.fail(e)
            keep_alive = False  # the connection's state is unknown: start afresh
        if not (keepalive and keep_alive) and conn is not None:
            conn.close()
            conn = None
    return conn


def result(latencies: list[float], start: float, cpu0: float, warmup: int, tally: Tally) -> dict:
    return {"requests": len(latencies), "elapsed": time.perf_counter() - start, "latencies": latencies,
            "client_cpu": time.process_time() - cpu0, "warmup": warmup, "failures": tally.failures,
            "first_failure": tally.first}


def sequential(args, endpoint: Endpoint, request: bytes, keepalive: bool) -> dict:
    tally = Tally()
    conn = run_requests(endpoint, request, time.perf_counter() + 60, WARMUP, keepalive, [], tally)
    latencies: list[float] = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    conn = run_requests(endpoint, request, start + args.seconds, args.max, keepalive, latencies, tally, conn)
    out = result(latencies, start, cpu0, WARMUP, tally)
    if conn is not None:
        conn.close()
    return out


def concurrent(args, endpoint: Endpoint, request: bytes) -> dict:
    """All connections in this one thread: a selectors loop over non-blocking TLS sockets.

    Chosen over a thread per connection by measurement (direct to lean_provider, 16
    connections, 3 s, two runs each): 0.022-0.032 ms of client CPU per request in the
    loop, 0.036-0.038 ms with threads (GIL hand-offs), and a higher rate too."""
    tally = Tally()
    sel = selectors.DefaultSelector()

    def adopt(conn: Connection) -> Connection:
        """A connection made (and warmed) blocking, handed to the loop."""
        conn.sock.setblocking(False)
        sel.register(conn.sock, selectors.EVENT_READ, conn)
        return conn

    def send(conn: Connection) -> None:
        conn.t0 = time.perf_counter()
        try:
            conn.sock.send(request)  # a few hundred bytes into an empty socket buffer: all taken
        except ssl.SSLWantWriteError:  # should not happen; if it does, wait for room
            conn.sock.setblocking(True)
            conn.sock.sendall(request)
            conn.sock.setblocking(False)

    def drop(conn: Connection) -> None:
        sel.unregister(conn.sock)
        conn.close()

    conns = []
    for _ in range(args.concurrency):  # warm-up as client.py: two requests per connection
        conn = Connection(endpoint)
        for _ in range(2):
            status, _, body = conn.exchange(request)
            check(status, body)
        conns.append(adopt(conn))
    latencies: list[float] = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + args.seconds
    for conn in conns:
        send(conn)
    active = len(conns)
    while active:
        ready = sel.select(30)
        if not ready:
            tally.fail(Failure(f"no reply in 30 s on {active} connections"))
            break
        for key, _ in ready:
            conn = key.data
            try:
                while True:
                    try:
                        data = conn.sock.recv(65536)
                    except ssl.SSLWantReadError:
                        break
                    if not data:
                        raise Failure("connection closed by the peer")
                    conn.buf += data
                reply = parse_response(conn.buf)
                if reply is None:
                    continue
                del conn.buf[:reply[0]]
                check(reply[1], reply[3])
                now = time.perf_counter()
                latencies.append(now - conn.t0)
                if not reply[2]:
                    raise Failure("the server closed a kept-alive connection")
            except (OSError, Failure, ValueError) as e:
                tally.fail(e)
                drop(conn)
                if time.perf_counter() >= deadline:
                    active -= 1
                    continue
                try:
                    conn = adopt(Connection(endpoint))
                except (OSError, Failure) as e2:
                    tally.fail(e2)
                    active -= 1
                    continue
                now = 0.0
            if now >= deadline:
                drop(conn)
                active -= 1
            else:
                send(conn)
    return result(latencies, start, cpu0, args.concurrency * 2, tally)


def streams(args, endpoint: Endpoint) -> dict:
    request = build_request(endpoint.host, {**BODY, "stream": True, "stream_chunks": STREAM_CHUNKS})
    expected = b"".join(stream_events(STREAM_CHUNKS))
    tally = Tally()
    firsts, totals = [], []
    conn = run_requests(endpoint, build_request(endpoint.host, BODY), time.perf_counter() + 60, 1, True, [], tally)
    for _ in range(args.n):
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = Connection(endpoint)
            first, body = conn.stream(request, t0)
            total = time.perf_counter() - t0
            if body != expected:  # so also: it ends with data: [DONE]
                raise Failure(f"stream not as sent ({len(body)} bytes, ends {body[-40:]!r})")
        except (OSError, Failure, ValueError) as e:
            tally.fail(e)
            if conn is not None:
                conn.close()
                conn = None
            continue
        firsts.append(first)
        totals.append(total)
    if conn is not None:
        conn.close()
    return {"requests": len(firsts), "ttfc": firsts, "totals": totals, "warmup": 1, "failures": tally.failures,
            "first_failure": tally.first}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["seq", "newconn", "conc", "ttfc"])
    parser.add_argument("--base", default="https://api.openai.com")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--proxy")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max", type=int, default=100000)
    parser.add_argument("--n", type=int, default=17)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    endpoint = Endpoint(args)
    request = build_request(endpoint.host, BODY)
    if args.workload == "seq":
        out = sequential(args, endpoint, request, keepalive=True)
    elif args.workload == "newconn":
        out = sequential(args, endpoint, request, keepalive=False)
    elif args.workload == "conc":
        out = concurrent(args, endpoint, request)
    else:
        out = streams(args, endpoint)
    json.dump(out, sys.stdout)
    print()
    if out["failures"]:
        sys.exit(f"{out['failures']} failed requests; first: {out['first_failure']}")


if __name__ == "__main__":
    main()
