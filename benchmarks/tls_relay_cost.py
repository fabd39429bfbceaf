"""The relay's CPU per TLS record on its own, Python path against native path, in one
process and without sockets, so the machine's noise is only the CPU's.

    python benchmarks/tls_relay_cost.py [--records 20000] [--size 150] [--rounds 5]

The real `oisp.proxy.relay` Sides of an intercepted connection (a server-side TLS
facing the client, a client-side TLS facing upstream), handshaken over memory with
two stdlib SSLObject ends; the sockets' transports are replaced by objects whose
write() hands the bytes to the other end's incoming BIO. Upstream's end writes
--records records of --size bytes (an SSE event each); each one is delivered to the
upstream Side's data_received alone, as a paced stream arrives, and the relay
decrypts, re-encrypts for the client and hands the plaintext to its observer.
Timed: the process CPU (time.process_time) over those deliveries. The client end
reads everything afterwards and it must match what upstream wrote.

Paths, interleaved per round: `python` (Relay(native_tls=False): SSLObject.read/
write on MemoryBIOs) and `native` (oisp._native.tls_relay.pump).

--pingpong N measures latency instead: a real Relay between two loopback TCP
connections, its ends (a TLS client and a TLS echo server, stdlib ssl) in a child
process so they never hold this process's GIL; the client sends --size bytes and
waits for the echo, N times; the median round trip per path.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oisp.proxy.relay import Relay, Side  # noqa: E402
from tests.fakeprovider import HOSTS, make_test_pki  # noqa: E402


class MemoryTransport:
    """Stands in for a socket's transport: what the relay writes lands in `into`."""

    def __init__(self, into: ssl.MemoryBIO):
        self.into = into

    def write(self, data) -> None:
        self.into.write(data)

    def is_closing(self) -> bool:
        return False


def drain(tls: ssl.SSLObject) -> bytes:
    out = []
    try:
        while chunk := tls.read(1 << 16):
            out.append(chunk)
    except ssl.SSLWantReadError:
        pass
    return b"".join(out)


async def one_run(pki, native: bool, records: int, size: int) -> float:
    ca, cert, key = pki
    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serving.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=ca)
    seen = [0]
    relay = Relay(native_tls=native, on_data=lambda side, data: seen.__setitem__(0, seen[0] + len(data)))
    down = Side(relay, "client", serving, server_side=True)
    up = Side(relay, "upstream", trusting, server_hostname=HOSTS[0])
    relay.sides = [down, up]
    ends = {}
    for side, context, wrap in ((down, trusting, {"server_hostname": HOSTS[0]}), (up, serving, {"server_side": True})):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ends[side.name] = (context.wrap_bio(incoming, outgoing, **wrap), outgoing)
        side.connection_made(MemoryTransport(incoming))
    up._handshake_step()
    for _ in range(10):
        for side in (down, up):
            end, outgoing = ends[side.name]
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                side.data_received(outgoing.read())
    assert down.handshaken.done() and up.handshaken.done(), "in-memory handshake did not finish"
    assert (down.native is not None) == native and (up.native is not None) == native
    relay.start()
    server, server_out = ends["upstream"]
    client, _ = ends["client"]
    drain(client)  # session tickets
    record = b"data: " + b"x" * (size - 8) + b"\n\n"
    wires = []
    for _ in range(records):
        server.write(record)
        wires.append(server_out.read())
    start = time.process_time()
    for wire in wires:
        up.data_received(wire)
    spent = time.process_time() - start
    assert drain(client) == record * records and seen[0] == len(record) * records
    return spent / records * 1e6


ENDS = """
import socket, ssl, statistics, sys, threading, time
ca, cert, key, host, port, n, size = sys.argv[1:8]
n, size = int(n), int(size)
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
serving.load_cert_chain(cert, key)
def echo():
    conn, _ = listener.accept()
    with serving.wrap_socket(conn, server_side=True) as tls:
        while data := tls.recv(1 << 16):
            tls.sendall(data)
threading.Thread(target=echo, daemon=True).start()
sys.stdin.readline()  # the relay is listening and dialled us
trusting = ssl.create_default_context(cafile=ca)
with trusting.wrap_socket(socket.create_connection(("127.0.0.1", int(port))), server_hostname=host) as tls:
    message, times = b"x" * size, []
    for _ in range(n):
        start = time.perf_counter()
        tls.sendall(message)
        got = 0
        while got < size:
            got += len(tls.recv(1 << 16))
        times.append(time.perf_counter() - start)
print(statistics.median(times) * 1e6, flush=True)
"""


async def pingpong(pki, native: bool, n: int, size: int) -> float:
    ca, cert, key = pki
    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serving.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=ca)
    listener = socket.create_server(("127.0.0.1", 0))
    ends = subprocess.Popen([sys.executable, "-c", ENDS, ca, cert, key, HOSTS[0], str(listener.getsockname()[1]),
                             str(n), str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    loop = asyncio.get_running_loop()
    try:
        upstream = socket.create_connection(("127.0.0.1", int(ends.stdout.readline())))
        ends.stdin.write("go\n")
        ends.stdin.flush()
        listener.setblocking(False)
        client, _ = await loop.sock_accept(listener)
        relay = Relay(native_tls=native)
        for s in (client, upstream):
            s.setblocking(False)
        up = await relay.attach("upstream", upstream, trusting, server_hostname=HOSTS[0])
        down = await relay.attach("client", client, serving, server_side=True)
        await up.handshake(10)
        await down.handshake(10)
        assert (down.native is not None) == native
        relay.start()
        median_us = float(await loop.run_in_executor(None, ends.stdout.readline))
        relay.close()
        await relay.done
        return median_us
    finally:
        listener.close()
        ends.kill()
        ends.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pingpong", type=int, metavar="N", help="round trips per path and round (latency)")
    args = parser.parse_args()
    per = {"python": [], "native": []}
    unit = "us round trip (median)" if args.pingpong else "us CPU per record"
    with tempfile.TemporaryDirectory(prefix="tls-relay-cost-") as directory:
        pki = make_test_pki(directory)
        for rnd in range(args.rounds):
            for path in ("python", "native") if rnd % 2 == 0 else ("native", "python"):
                run = (pingpong(pki, path == "native", args.pingpong, args.size) if args.pingpong
                       else one_run(pki, path == "native", args.records, args.size))
                per[path].append(asyncio.run(run))
            print(f"round {rnd + 1}: python {per['python'][-1]:.2f}, native {per['native'][-1]:.2f} {unit}",
                  file=sys.stderr, flush=True)
    ratios = [n / p for n, p in zip(per["native"], per["python"])]
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}")
    what = (f"{args.pingpong} round trips of {args.size} bytes, client -> relay -> echo server" if args.pingpong
            else f"{args.records} records of {args.size} bytes, upstream -> relay -> client")
    print(f"# {what}, {args.rounds} rounds interleaved")
    for path in per:
        print(f"{path:7} {statistics.median(per[path]):6.2f} {unit}  "
              f"(per round {' / '.join(f'{x:.2f}' for x in per[path])})")
    print(f"native / python: {statistics.median(ratios):.3f} (per round {' / '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
