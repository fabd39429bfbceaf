"""What recording costs a local OpenAI-compatible server in plain HTTP, beside what it
costs HTTPS, in one lab (needs root).

    sudo python benchmarks/plain_local.py [--rounds 3] [--seconds 4]

The lab is interception.py's lean one (two namespaces joined by a veth, the lean TLS
provider on :443 in `b`, lean_client.py for HTTPS). Added here: a lean plaintext
server (one selectors loop, every reply the lean provider's prebuilt chat.completion)
on vLLM's port 8000, across the veth (the LAN) and on loopback beside the client,
and a lean plaintext client (prebuilt request bytes, Content-Length replies; at most
MAX_NEWCONN new connections a run). Per
round, direct then recorded (`oisp record`, which watches :8000 by default) or the
other way round, for kept-alive requests (one connection, one after another) and a
new connection per request; the figures are medians of rounds, with each round's.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "interception"))
from lean_provider import CHAT_BODY  # noqa: E402  (the same reply as the HTTPS leg)

PORT = 8000
REQUEST_BODY = json.dumps({"model": "local-model", "messages": [{"role": "user", "content": "hello there"}],
                           "max_tokens": 16}).encode()
REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(CHAT_BODY)) + CHAT_BODY
WARMUP = 20
# New connections per run, at most: each leaves a TIME-WAIT socket in the client's namespace
# for 60 s, and direct loopback runs ~12k a second, which would use up its ephemeral ports
# and slow every later run's connect().
MAX_NEWCONN = 2000


# -- the plaintext server -------------------------------------------------------------
def serve(host: str, port: int) -> None:
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=1024)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    buffers: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffers[conn] = b""
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                buffers.pop(conn, None)
                conn.close()
                continue
            buf = buffers[conn] + data
            while True:  # every whole request in the buffer
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(buf) < end + 4 + length:
                    break
                buf = buf[end + 4 + length:]
                conn.sendall(REPLY)  # small: fits the socket buffer
            buffers[conn] = buf


# -- the plaintext client -------------------------------------------------------------
def request_bytes(host: str) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer sk-local-bench\r\ncontent-length: %d\r\n\r\n"
            % (host.encode(), PORT, len(REQUEST_BODY))) + REQUEST_BODY


def read_reply(sock: socket.socket) -> None:
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the reply")
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n", 1)[0])
            if len(buf) >= end + 4 + length:
                if buf[end + 4:end + 4 + length] != CHAT_BODY:
                    raise ValueError("not the reply sent")
                return


def client(workload: str, host: str, seconds: float) -> dict:
    request = request_bytes(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def connect() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, PORT))
        return sock

    sock = connect() if workload == "seq" else None
    latencies = []
    deadline = None
    count = 0
    while deadline is None or (time.monotonic() < deadline and not (workload == "newconn" and
                                                                     len(latencies) >= MAX_NEWCONN)):
        if count == WARMUP:
            latencies, deadline, started = [], time.monotonic() + seconds, time.monotonic()
        t0 = time.perf_counter()
        if workload == "newconn":
            sock = connect()
        sock.sendall(request)
        read_reply(sock)
        if workload == "newconn":
            sock.close()
        latencies.append(time.perf_counter() - t0)
        count += 1
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


# -- the run --------------------------------------------------------------------------
def run(args) -> str:
    import interception

    tmp = Path(tempfile.mkdtemp(prefix="oisp-plain-bench-"))
    lab = interception.Lab(tmp, lean=True)
    places = {"lan": lab.pair.b_ip4, "loopback": "127.0.0.1"}
    try:
        lab._start(lab.pair.b, sys.executable, __file__, "serve", places["lan"])
        lab._start(lab.pair.a, sys.executable, __file__, "serve", places["loopback"])
        lab._wait_port(lab.pair.b, places["lan"], PORT)
        lab._wait_port(lab.pair.a, places["loopback"], PORT)
        results: dict = {}  # (leg, workload, path) -> [round results]

        def measure(path: str) -> None:
            for workload in ("seq", "newconn"):
                for place, host in places.items():
                    argv = lab.pair.a.cmd(sys.executable, __file__, "client", workload, host, str(args.seconds))
                    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.seconds * 4 + 60)
                    if done.returncode != 0:
                        raise RuntimeError(f"plain client {place}/{workload}/{path}: {done.stderr[-2000:]}")
                    results.setdefault((f"plain-{place}", workload, path), []).append(json.loads(done.stdout))
                https = lab.client(path if path == "direct" else "oisp", workload, args.seconds, 17)
                latencies = sorted(https["latencies"])
                results.setdefault(("https-lan", workload, path), []).append(
                    {"rps": https["requests"] / https["elapsed"], "p50_ms": latencies[len(latencies) // 2] * 1000,
                     "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000})

        for r in range(args.rounds):
            order = ("direct", "recorded") if r % 2 == 0 else ("recorded", "direct")
            for path in order:
                if path == "recorded":
                    lab.start_oisp()
                    time.sleep(1.0)
                measure(path)
                if path == "recorded":
                    lab.stop_oisp()
    finally:
        lab.close()
    return report(results, args)


def report(results: dict, args) -> str:
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    lines = [f"sudo python benchmarks/plain_local.py --rounds {args.rounds} --seconds {args.seconds}",
             f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  nproc {os.cpu_count()}, {args.rounds} rounds "
             f"interleaved, {args.seconds} s per workload, median of rounds",
             "", "leg            workload  direct req/s  recorded req/s  ratio  direct p50  recorded p50  added p50"]
    for leg in ("plain-loopback", "plain-lan", "https-lan"):
        for workload in ("seq", "newconn"):
            d, o = results[(leg, workload, "direct")], results[(leg, workload, "recorded")]
            ratio = med(o, "rps") / med(d, "rps")
            lines.append(f"{leg:<14} {workload:<8} {med(d, 'rps'):>12.0f}  {med(o, 'rps'):>14.0f}  {ratio:>5.2f}"
                         f"  {med(d, 'p50_ms'):>8.2f} ms  {med(o, 'p50_ms'):>9.2f} ms  "
                         f"{med(o, 'p50_ms') - med(d, 'p50_ms'):>6.2f} ms")
    lines.append("")
    for (leg, workload, path), rows in sorted(results.items()):
        lines.append(f"per round {leg} {workload} {path}: req/s " + " / ".join(f"{r['rps']:.0f}" for r in rows)
                     + "; p50 ms " + " / ".join(f"{r['p50_ms']:.2f}" for r in rows))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], PORT)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        print(json.dumps(client(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    print(run(parser.parse_args()))


if __name__ == "__main__":
    main()
