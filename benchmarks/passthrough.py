"""What `oisp record` costs traffic that is not AI: a bulk TCP transfer to port 443 of
an address that is not an AI endpoint, with and without the sensor running.

    sudo python benchmarks/passthrough.py [--rounds 3] [--megabytes 300]

The lab is the interception benchmark's (two namespaces on a veth, the fake provider
named api.openai.com on b), plus a second address on b that no AI hostname names, with
a sink on its port 443. The same sender (its own process in `a`) pushes --megabytes to
it; rounds alternate without and with `oisp record` in `a`. Printed: MB/s per path
(median of rounds), the ratio, and the sensor's CPU per MB (all threads, /proc): what
the host's ordinary HTTPS pays while oisp records. (The redirector's filter names the
AI addresses, so none should be paid; with a port-only filter every packet crossed to
user space and back: 0.08x.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interception  # the lab

SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], 443))
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    total = 0
    while data := conn.recv(1 << 20):
        total += len(data)
    conn.sendall(total.to_bytes(8, "big"))
    conn.close()
"""

SENDER = """
import json, socket, sys, time
host, megabytes = sys.argv[1], int(sys.argv[2])
chunk = bytes(1 << 20)
started = time.perf_counter()
s = socket.create_connection((host, 443))
for _ in range(megabytes):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
received = int.from_bytes(s.recv(8), "big")
print(json.dumps({"seconds": time.perf_counter() - started, "received": received}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=300)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="oisp-passthrough-"))
    lab = interception.Lab(tmp)
    try:
        pair = lab.pair
        ifname = pair.b.run("ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        other = pair.b_ip4.rsplit(".", 1)[0] + ".3"
        pair.b.run("ip", "addr", "add", f"{other}/24", "dev", ifname)
        sink = lab._start(pair.b, sys.executable, "-c", SINK, other, stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        results: dict[str, list] = {"direct": [], "oisp": []}
        cpu_per_mb = []
        for round_ in range(args.rounds):
            for path in ("direct", "oisp"):
                pid = lab.start_oisp() if path == "oisp" else None
                cpu0 = interception.cpu_seconds(pid) if pid else 0.0
                done = pair.a.run(sys.executable, "-c", SENDER, other, str(args.megabytes), timeout=300)
                out = json.loads(done.stdout)
                if out["received"] != args.megabytes << 20:
                    raise RuntimeError(f"the sink got {out['received']} bytes")
                if pid:
                    cpu_per_mb.append((interception.cpu_seconds(pid) - cpu0) * 1000 / args.megabytes)
                    lab.stop_oisp()
                rate = args.megabytes / out["seconds"]
                results[path].append(rate)
                print(f"[{time.strftime('%H:%M:%S')}] round {round_ + 1} {path:6} {rate:8.1f} MB/s", flush=True)
        direct, oisp = (statistics.median(results[p]) for p in ("direct", "oisp"))
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {interception.machine()}")
        print(f"bulk TCP to a non-AI address's port 443, {args.megabytes} MB, median of {args.rounds} rounds")
        print(f"direct {direct:.1f} MB/s, with oisp record {oisp:.1f} MB/s: ratio {oisp / direct:.2f}")
        print(f"oisp record CPU per MB moved: {statistics.median(cpu_per_mb):.3f} ms (all threads)")
    finally:
        lab.close()


if __name__ == "__main__":
    main()
