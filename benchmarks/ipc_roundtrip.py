"""What one IPC flow lookup costs the sensor: the round trip of `IPCClient.lookup`
against an `IPCServer` in another process, beside the same lookup made in-process and
a bare Unix-socket ping-pong between two processes (the machine's floor).

    python benchmarks/ipc_roundtrip.py [--lookups 5000] [--rounds 5] [--flows 10000]

The server process holds a real FlowTable of --flows entries and serves it from its
IPC thread, as the redirector will; the client looks up random ones of them on its
asyncio loop, one request at a time (each timed alone with perf_counter_ns). Modes per
round, interleaved so drift hits all of them alike:

  direct     FlowTable.lookup in this process (what record does today, no IPC)
  pingpong   64 bytes there and back over a Unix socket, blocking, two processes
  floor      120 bytes there and back: an asyncio client (as the sensor's) against a
             selectors loop in a thread of another process (as the server's) that
             echoes: the least any lookup of this shape can take here
  ipc        IPCClient.lookup → IPCServer → FlowTable → FlowAnswer (hold=False)
  ipc_hold   the same with hold=True (the proxy's case: the answer carries a token)

It prints p50/p90/p99 per mode and round, and the spread of the p50s over rounds.
The issue's goal is an added p50 (ipc - direct) of at most 50 µs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oisp.ipc.client import IPCClient  # noqa: E402

SERVER = """
import ipaddress, os, sys, time
sys.path.insert(0, {root!r})
from oisp.ipc.server import IPCServer, flow_table_handlers
from oisp.ipc.transport import AccessPolicy
from oisp.redirect.flows import FlowEntry, FlowTable
from oisp.own_ports import OwnPorts
flows = FlowTable(max_flows={flows} + 1)
for i in range({flows}):
    flows.open(FlowEntry(client_addr=ipaddress.ip_address("10.200.0.1"), client_port=1024 + i,
                         server_addr=ipaddress.ip_address("10.200.%d.%d" % (i // 250 % 250, i % 250 + 1)),
                         server_port=443, proxy_port=8443, pid=4000 + i, process_name="python3"))
server = IPCServer(flow_table_handlers(flows, OwnPorts(), lambda: {{}}), AccessPolicy.user(os.getuid()),
                   address={address!r}, owner=(os.getuid(), None)).start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""

ECHO_THREAD = """
import selectors, socket, sys, threading
listener = socket.socket(socket.AF_UNIX)
listener.bind({address!r}); listener.listen(1)
print("ready", flush=True)
def serve():
    conn, _ = listener.accept()
    conn.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(conn, selectors.EVENT_READ)
    while True:
        selector.select()
        data = conn.recv(65536)
        if not data:
            break
        conn.send(data)
threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
"""

ECHO = """
import socket, sys
listener = socket.socket(socket.AF_UNIX)
listener.bind({address!r}); listener.listen(1)
print("ready", flush=True)
conn, _ = listener.accept()
while True:
    data = conn.recv(4096)
    if not data:
        break
    conn.sendall(data)
"""


def keys(flows: int, n: int, seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(flows)
        out.append((f"10.200.{i // 250 % 250}.{i % 250 + 1}", 1024 + i, 8443))
    return out


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    q = statistics.quantiles(samples_ns, n=100)
    return {"p50": q[49] / 1000, "p90": q[89] / 1000, "p99": q[98] / 1000}


def start(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("helper process did not start")
    return proc


def direct(flows: int, lookups: list) -> list[int]:
    import ipaddress

    from oisp.redirect.flows import FlowEntry, FlowTable

    table = FlowTable(max_flows=flows + 1)
    for i in range(flows):
        table.open(FlowEntry(client_addr=ipaddress.ip_address("10.200.0.1"), client_port=1024 + i,
                             server_addr=ipaddress.ip_address(f"10.200.{i // 250 % 250}.{i % 250 + 1}"),
                             server_port=443, proxy_port=8443, pid=4000 + i, process_name="python3"))
    out = []
    for addr, port, proxy in lookups:
        t = time.perf_counter_ns()
        entry = table.lookup(addr, port, proxy, name_owner=False)
        (str(entry.client_addr), entry.client_port, str(entry.server_addr), entry.server_port, entry.pid)
        out.append(time.perf_counter_ns() - t)
    return out


def pingpong(n: int, workdir: str) -> list[int]:
    address = os.path.join(workdir, "echo.sock")
    proc = start(ECHO.format(address=address))
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address)
        payload, out = b"x" * 64, []
        for _ in range(n):
            t = time.perf_counter_ns()
            sock.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(sock.recv(4096))
            out.append(time.perf_counter_ns() - t)
        sock.close()
    finally:
        proc.stdin.close()
        proc.wait(10)
        os.unlink(address)
    return out


async def floor(n: int, workdir: str) -> list[int]:
    address = os.path.join(workdir, "floor.sock")
    proc = start(ECHO_THREAD.format(address=address))
    try:
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future] = []

        class Echo(asyncio.Protocol):
            def data_received(self, data):
                waiting.pop().set_result(data)

        transport, _ = await loop.create_unix_connection(Echo, address)

        async def one():
            future = loop.create_future()
            waiting.append(future)
            transport.write(b"x" * 120)
            return await future

        out = []
        for _ in range(n):
            t = time.perf_counter_ns()
            await one()
            out.append(time.perf_counter_ns() - t)
        transport.close()
    finally:
        proc.stdin.close()
        proc.wait(10)
        os.unlink(address)
    return out


async def ipc(address: str, lookups: list, hold: bool) -> list[int]:
    client = await IPCClient(address, server_uids=frozenset({os.getuid()})).start()
    try:
        await client.wait_connected(10)
        for addr, port, proxy in lookups[:200]:  # warm up
            await client.lookup(addr, port, proxy, hold=False)
        out = []
        for addr, port, proxy in lookups:
            t = time.perf_counter_ns()
            flow = await client.lookup(addr, port, proxy, hold=hold)
            out.append(time.perf_counter_ns() - t)
            if flow is None:
                raise AssertionError(f"no flow for {addr}:{port}")
            if hold:
                client.release(flow.token)
        return out
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lookups", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flows", type=int, default=10000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="oisp-ipc-bench-")
    address = os.path.join(workdir, "run", "ipc.sock")
    server = start(SERVER.format(root=str(ROOT), flows=args.flows, address=address))
    results: dict[str, list[dict]] = {"direct": [], "pingpong": [], "floor": [], "ipc": [], "ipc_hold": []}
    try:
        for r in range(args.rounds):
            lookups = keys(args.flows, args.lookups, seed=r)
            results["direct"].append(percentiles(direct(args.flows, lookups)))
            results["pingpong"].append(percentiles(pingpong(args.lookups, workdir)))
            results["floor"].append(percentiles(asyncio.run(floor(args.lookups, workdir))))
            results["ipc"].append(percentiles(asyncio.run(ipc(address, lookups, hold=False))))
            results["ipc_hold"].append(percentiles(asyncio.run(ipc(address, lookups, hold=True))))
            if not args.json:
                print(f"round {r + 1}: " + "  ".join(f"{mode} p50 {rows[-1]['p50']:.1f} µs" for mode, rows in results.items()),
                      flush=True)
    finally:
        server.stdin.close()
        server.wait(10)
    summary = {mode: {"p50_median": statistics.median(row["p50"] for row in rows),
                      "p50_min": min(row["p50"] for row in rows), "p50_max": max(row["p50"] for row in rows),
                      "p90_median": statistics.median(row["p90"] for row in rows),
                      "p99_median": statistics.median(row["p99"] for row in rows)}
               for mode, rows in results.items()}
    added = summary["ipc"]["p50_median"] - summary["direct"]["p50_median"]
    if args.json:
        print(json.dumps({"rounds": results, "summary": summary, "added_p50_us": added}))
        return
    print(f"\n{args.rounds} rounds × {args.lookups} lookups, {args.flows} flows in the table; µs")
    print("| mode | p50 (median of rounds) | p50 spread | p90 | p99 |\n|---|---:|---:|---:|---:|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['p50_median']:.1f} | {s['p50_min']:.1f}–{s['p50_max']:.1f} | "
              f"{s['p90_median']:.1f} | {s['p99_median']:.1f} |")
    print(f"added p50 (ipc - direct): {added:.1f} µs (goal ≤ 50)")


if __name__ == "__main__":
    main()
