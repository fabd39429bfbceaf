"""Engine scenarios, run inside a test namespace; each prints one JSON object.

`engine_agent.py --help` lists the scenarios, `engine_agent.py SCENARIO --help` their options.
"""

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import threading
import time

from oisp.divert.engine import Engine, EngineStalled, Verdict

PORT = 40000


def udp_receiver(port, expect, idle=3.0):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, 33, 1 << 26)  # SO_RCVBUFFORCE: the socket must not be what drops
    rx.bind(("127.0.0.1", port))
    rx.settimeout(idle)
    got = []

    def run():
        try:
            while len(got) < expect:
                got.append(rx.recv(2048))
        except socket.timeout:
            pass

    thread = threading.Thread(target=run)
    thread.start()
    return got, thread


def paced_sender(count, port, rate=25000, payload=lambda i: b"%08d" % i):
    """Send `count` datagrams at about `rate`/s (below the backend's limit, so the
    kernel queue never overflows and every loss is ours to count)."""
    def run():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        start = time.monotonic()
        for i in range(count):
            tx.sendto(payload(i), ("127.0.0.1", port))
            if i % 500 == 499:
                ahead = (i + 1) / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def scenario_udp(count, policy, slots, stall_at, stall_seconds):
    got, receiver = udp_receiver(PORT, count)
    engine = Engine(f"udp.DstPort == {PORT}", policy=policy, slots=slots, queue_length=16384,
                    queue_size=32 * 1024 * 1024, watchdog=None)
    sender = paced_sender(count, PORT)
    seen, stalled = 0, False
    while True:
        batch = engine.next_batch(timeout=2)
        if batch is None:
            break
        seen += batch.count
        if not stalled and stall_at and seen >= stall_at:
            stalled = True
            time.sleep(stall_seconds)  # the consumer lags while holding this batch
        engine.commit(batch)
    sender.join()
    receiver.join()
    engine.stop()
    counters = engine.counters()
    json.dump({"counters": counters, "delivered": len(got), "unique": len(set(got)), "seen": seen}, sys.stdout)


def scenario_tcp(megabytes):
    total = megabytes * 1024 * 1024
    engine = Engine(f"tcp.DstPort == {PORT} or tcp.SrcPort == {PORT}", watchdog=None, queue_length=16384)
    stop = threading.Event()

    def pump():
        while not stop.is_set():
            batch = engine.next_batch(timeout=0.2)
            if batch is not None:
                engine.commit(batch)

    pumper = threading.Thread(target=pump)
    pumper.start()
    server = socket.create_server(("127.0.0.1", PORT))
    result = {}

    def serve():
        conn, _ = server.accept()
        digest, received = hashlib.sha256(), 0
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
            received += len(chunk)
        result.update(server_sha=digest.hexdigest(), server_bytes=received)
        conn.close()

    serving = threading.Thread(target=serve)
    serving.start()
    client = socket.create_connection(("127.0.0.1", PORT))
    digest, block = hashlib.sha256(), os.urandom(1 << 20)
    started = time.monotonic()
    for i in range(megabytes):
        chunk = block[i % 97:] + block[:i % 97]  # distinct content per megabyte
        digest.update(chunk)
        client.sendall(chunk)
    client.close()
    serving.join(60)
    elapsed = time.monotonic() - started
    stop.set()
    pumper.join()
    engine.stop()
    counters = engine.counters()
    result.update(client_sha=digest.hexdigest(), client_bytes=total, counters=counters, seconds=elapsed)
    json.dump(result, sys.stdout)


def scenario_verdicts():
    from oisp.packet import OK, rewrite

    count = 300
    kept, kept_thread = udp_receiver(PORT, count, idle=2)
    moved, moved_thread = udp_receiver(PORT + 1, count, idle=2)
    engine = Engine(f"udp.DstPort == {PORT}", watchdog=None)
    sender = paced_sender(count, PORT, rate=5000, payload=lambda i: b"%05d" % i)
    seen = 0
    while seen < count:
        batch = engine.next_batch(timeout=3)
        if batch is None:
            break
        seen += batch.count
        rows = batch.rows
        numbers = [int(bytes(batch.packet(i)[-5:])) for i in range(batch.count)]
        drop = [n % 3 == 0 for n in numbers]
        move = [n % 3 == 1 for n in numbers]
        batch.verdicts[drop] = Verdict.DROP
        select = [i for i, m in enumerate(move) if m]
        if select:
            assert (rows["status"][select] == OK).all()
            rewrite(batch.data, rows, select, dst_port=PORT + 1)
            batch.verdicts[select] = Verdict.MODIFIED
        engine.commit(batch)
    sender.join()
    kept_thread.join()
    moved_thread.join()
    counters = engine.counters()
    engine.stop()
    json.dump({"kept": sorted(int(x) for x in kept), "moved": sorted(int(x) for x in moved),
               "counters": counters}, sys.stdout)


def scenario_async(count):
    got, receiver = udp_receiver(PORT, count)

    async def consume(engine):
        seen = 0
        async for batch in engine:
            seen += batch.count
            engine.commit(batch)
            if seen >= count:
                break
        return seen

    engine = Engine(f"udp.DstPort == {PORT}", watchdog=None)
    sender = paced_sender(count, PORT, rate=10000)
    seen = asyncio.run(consume(engine))
    sender.join()
    receiver.join()
    counters = engine.counters()
    engine.stop()
    json.dump({"seen": seen, "delivered": len(got), "counters": counters}, sys.stdout)


def scenario_watchdog():
    """Take one batch and never give it back; time until datagrams flow again."""
    got, receiver = udp_receiver(PORT, 10**6, idle=4)
    engine = Engine(f"udp.DstPort == {PORT}", watchdog=0.5, slots=2)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.sendto(b"first", ("127.0.0.1", PORT))
    held = engine.next_batch(timeout=2)
    stalled_at = time.monotonic()
    restored_after = None
    i = 0
    while time.monotonic() - stalled_at < 5:
        tx.sendto(b"probe%d" % i, ("127.0.0.1", PORT))
        i += 1
        time.sleep(0.01)
        if any(g.startswith(b"probe") for g in got):
            restored_after = time.monotonic() - stalled_at
            break
    try:
        engine.next_batch(timeout=0)
        error = None
    except EngineStalled as e:
        error = str(e)
    receiver.join()
    json.dump({"held_count": held.count if held else 0, "restored_after": restored_after, "error": error},
              sys.stdout)


def scenario_consume():
    engine = Engine(f"udp.DstPort == {PORT}", watchdog=None)
    print("ready", flush=True)
    for batch in engine:
        engine.commit(batch)


def scenario_kill9():
    """Probes every 5 ms through a diverting child; SIGKILL it; how long until probes flow again?"""
    import signal
    import subprocess

    got = []
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", PORT))
    rx.settimeout(0.05)
    child = subprocess.Popen([sys.executable, __file__, "consume"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    killed_at = None
    i = 0
    while time.monotonic() - start < 4:
        now = time.monotonic()
        if killed_at is None and now - start > 1.5:
            child.send_signal(signal.SIGKILL)
            child.wait()
            killed_at = time.monotonic()
        tx.sendto(b"%d %f" % (i, now), ("127.0.0.1", PORT))
        i += 1
        try:
            while True:
                got.append((time.monotonic(), rx.recv(100)))
        except socket.timeout:
            pass
    sent_before = [g for g in got if g[0] < killed_at]
    after = [t for t, _ in got if t >= killed_at]
    json.dump({"probes": i, "delivered": len(got), "delivered_before_kill": len(sent_before),
               "first_after_kill": (after[0] - killed_at) if after else None,
               "delivered_after_kill": len(after)}, sys.stdout)


def scenario_events(layer_name):
    import subprocess

    from oisp.divert.constants import Flag, Layer

    layer = Layer[layer_name]
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    engine = Engine(f"tcp and remotePort == {port}" if layer == Layer.SOCKET else "tcp",
                    layer=layer, flags=Flag.SNIFF | Flag.RECV_ONLY, watchdog=None)
    child = subprocess.Popen([sys.executable, "-c",
                              f"import socket,time; s=socket.create_connection(('127.0.0.1',{port})); "
                              "time.sleep(0.3); s.close()"])
    conn, _ = server.accept()
    child.wait()
    conn.close()
    events = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        batch = engine.next_batch(timeout=0.5)
        if batch is None:
            continue
        events += [dict(event=e.event.name, pid=e.pid, local=str(e.local), local_port=e.local_port,
                        remote=str(e.remote), remote_port=e.remote_port, protocol=e.protocol)
                   for e in batch.events()]
        engine.release(batch)
    engine.stop()
    json.dump({"child": child.pid, "me": os.getpid(), "port": port, "events": events}, sys.stdout)


SCENARIOS = {"udp": scenario_udp, "tcp": scenario_tcp, "verdicts": scenario_verdicts, "async": scenario_async,
             "watchdog": scenario_watchdog, "kill9": scenario_kill9, "consume": scenario_consume,
             "events": scenario_events}


def parse(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Engine scenarios in a test namespace; each prints one JSON object.")
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    udp = scenarios.add_parser("udp", help="datagrams through the engine, optionally stalling the consumer")
    udp.add_argument("--count", type=int, required=True, help="datagrams to send")
    udp.add_argument("--policy", choices=["block", "drop"], default="block", help="the engine's overflow policy")
    udp.add_argument("--slots", type=int, default=16, help="ring slots")
    udp.add_argument("--stall-at", type=int, default=0, metavar="N", help="stall once N packets were seen (0: never)")
    udp.add_argument("--stall-seconds", type=float, default=0.0, help="how long the consumer stalls")
    tcp = scenarios.add_parser("tcp", help="a TCP transfer through the engine (both directions diverted)")
    tcp.add_argument("--megabytes", type=int, required=True)
    scenarios.add_parser("verdicts", help="DROP and MODIFIED (port rewrite) verdicts")
    asynchronous = scenarios.add_parser("async", help="consume with `async for`")
    asynchronous.add_argument("--count", type=int, required=True, help="datagrams to send")
    scenarios.add_parser("watchdog", help="the consumer stops; the watchdog must fail open")
    scenarios.add_parser("kill9", help="a consumer process is killed with SIGKILL mid-traffic")
    scenarios.add_parser("consume", help="(child of kill9) divert and pass until killed")
    events = scenarios.add_parser("events", help="FLOW or SOCKET events for a child's connection (needs cgroup2)")
    events.add_argument("--layer", dest="layer_name", choices=["FLOW", "SOCKET"], required=True)
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    options = parse()
    SCENARIOS[options.pop("scenario")](**options)
