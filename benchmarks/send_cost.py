"""What a diverted packet costs the program that sends it: the CPU of one small
`send()` with and without a divert handle taking the packets, side by side.

    sudo python benchmarks/send_cost.py [--sends 20000] [--rounds 3] [--size 200]

Two namespaces joined by a veth (made and removed here). In `a` a sender connects
to a sink in `b` (TCP_NODELAY, so one send is one segment) and makes --sends sends
of --size bytes, pacing itself so each goes out alone; it reports its own CPU per
send (getrusage, the thread's user + system time). Modes, interleaved per round:

  plain     nothing diverts
  diverted  an oisp Engine in `a` takes the sender's packets (outbound to the sink's
            port) and re-injects each unchanged: the path every client-bound packet
            of a reflected connection takes
  hook      a divert handle whose filter matches nothing of this traffic (udp port 9):
            the divert program runs, decides no, the packet goes on

The difference diverted - plain is what the divert hook and the ring add inside the
sender's own syscalls (the issue-16 question: how much of the proxy's send() per
chunk is the divert path). The engine's own CPU is reported apart.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns import VethPair  # noqa: E402

PORT = 9000
SINK = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{{host}}", {PORT})); s.listen(8); print("ready", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 16):
        pass
    c.close()
"""
SENDER = """
import json, resource, socket, sys, time
host, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, {port})); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
payload = b"x" * size
for _ in range(200):
    c.send(payload)
time.sleep(0.2)
r0 = resource.getrusage(resource.RUSAGE_THREAD)
for i in range(n):
    c.send(payload)
    if i % 16 == 15:
        time.sleep(0.0005)  # let the segments go out one by one, not merge in the socket buffer
r1 = resource.getrusage(resource.RUSAGE_THREAD)
c.close()
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({{"us_per_send": cpu * 1e6 / n, "sys_us_per_send": (r1.ru_stime - r0.ru_stime) * 1e6 / n}}))
""".format(port=PORT)
ENGINE = """
import sys, time
from oisp.divert.engine import Engine
print("ready", flush=True)
with Engine(sys.argv[1], policy="block") as engine:
    for batch in engine:
        engine.commit(batch)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def run_mode(pair: VethPair, mode: str, sends: int, size: int) -> dict:
    engine = None
    if mode != "plain":
        divert = f"outbound and tcp.DstPort == {PORT}" if mode == "diverted" else "udp.DstPort == 9"
        engine = pair.a.popen(sys.executable, "-c", ENGINE, divert, stdout=subprocess.PIPE, text=True,
                              cwd=str(ROOT))
        assert engine.stdout.readline().strip() == "ready"
        time.sleep(0.5)
    try:
        cpu0 = cpu_seconds(engine.pid) if engine else 0.0
        done = pair.a.run(sys.executable, "-c", SENDER, pair.b_ip4, str(sends), str(size), timeout=300)
        result = json.loads(done.stdout)
        result["engine_us_per_send"] = (cpu_seconds(engine.pid) - cpu0) * 1e6 / sends if engine else 0.0
        return result
    finally:
        if engine is not None:
            engine.send_signal(signal.SIGINT)
            try:
                engine.wait(10)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sends", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=200)
    args = parser.parse_args()
    pair = VethPair.create()
    sink = None
    try:
        sink = pair.b.popen(sys.executable, "-c", SINK.format(host=pair.b_ip4), stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        modes = ("plain", "diverted", "hook")
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for rnd in range(args.rounds):
            for mode in modes:
                r = run_mode(pair, mode, args.sends, args.size)
                results[mode].append(r)
                print(f"round {rnd + 1} {mode:8} {r['us_per_send']:6.1f} us/send (sys {r['sys_us_per_send']:5.1f}); "
                      f"engine {r['engine_us_per_send']:5.1f} us/send", file=sys.stderr, flush=True)
        print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {args.sends} sends of {args.size} bytes, "
              f"{args.rounds} rounds interleaved, median")
        base = statistics.median(r["us_per_send"] for r in results["plain"])
        for mode in modes:
            per = [r["us_per_send"] for r in results[mode]]
            ratios = [r / p["us_per_send"] for r, p in zip(per, results["plain"])]
            print(f"{mode:8} sender {statistics.median(per):6.1f} us/send  (x{statistics.median(per) / base:.2f} plain; "
                  f"per round {' / '.join(f'{x:.2f}' for x in ratios)})  engine "
                  f"{statistics.median(r['engine_us_per_send'] for r in results[mode]):5.1f} us/send")
    finally:
        if sink is not None:
            sink.kill()
        pair.delete()


if __name__ == "__main__":
    main()
