"""How fast a QUIC client gives up on an AI address, per way of refusing it (needs root).

    sudo python benchmarks/quic_refusal.py [--tries 5] [--timeout 3]

Two namespaces joined by a veth; a QUIC echo server (tests/agents/quic_echo.py,
aioquic) on UDP 443 in `b`. In `a`, oisp.redirect.quic.QuicRefuser takes QUIC to
the server's address and answers each Initial one way: "drop" (nothing), "icmp" (an
ICMP port unreachable), "vn" (a QUIC Version Negotiation naming only a reserved
version) or "both" (what oisp record does). Two clients try, `--tries` times each:

- aioquic (its socket is not connected, so ICMP errors never reach it): seconds
  until connect() fails;
- a connected UDP socket sending an Initial-shaped datagram, as browsers' QUIC
  stacks use: seconds until recv() reports an error (ECONNREFUSED from ICMP) or a
  Version Negotiation packet arrives.

Each figure is the median of the tries; a client that hears nothing waits its
`--timeout`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

REFUSER = """
import sys, time, ipaddress
from oisp.redirect.quic import QuicRefuser
from oisp.redirect.targets import TargetSet
refuser = QuicRefuser(TargetSet([sys.argv[1]]), how=sys.argv[2]).start()
print("ready", flush=True)
sys.stdin.read()
refuser.stop()
"""

CONNECTED = """
import json, os, socket, sys, time
host, timeout = sys.argv[1], float(sys.argv[2])
dcid, scid = os.urandom(8), os.urandom(8)
initial = bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + dcid + bytes([8]) + scid + bytes(1200 - 23)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((host, 443))
sock.settimeout(timeout)
started = time.monotonic()
sock.send(initial)
try:
    while True:
        data = sock.recv(2048)
        if data[1:5] == bytes(4):
            outcome = "version negotiation"
            break
except ConnectionRefusedError:
    outcome = "ECONNREFUSED"
except socket.timeout:
    outcome = "timeout"
print(json.dumps({"seconds": time.monotonic() - started, "outcome": outcome}))
"""


def main() -> None:
    from oisp.demo.provider import make_test_pki
    from tests.netns import VethPair, agent_args, stop_all

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="oisp-quic-bench-"))
    pair = VethPair.create()
    ca, cert, key = make_test_pki(tmp)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    echo = str(ROOT / "tests" / "agents" / "quic_echo.py")
    server = pair.b.popen(sys.executable, echo, *agent_args("serve", host=pair.b_ip4, port=443, cert=cert, key=key),
                          env=env)
    processes = [server]
    rows = []
    try:
        time.sleep(1.5)
        for how in ("none", "drop", "icmp", "vn", "both"):
            refuser = None
            if how != "none":
                refuser = pair.a.popen(sys.executable, "-c", REFUSER, pair.b_ip4, how, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
                processes.append(refuser)
                assert refuser.stdout.readline().strip() == "ready"
            aioquic, connected = [], []
            for _ in range(args.tries):
                argv = agent_args("connect", host=pair.b_ip4, port=443, ca=ca, timeout=args.timeout)
                done = subprocess.run(pair.a.cmd(sys.executable, echo, *argv), capture_output=True, text=True, env=env)
                aioquic.append(json.loads(done.stdout))
                done = subprocess.run(pair.a.cmd(sys.executable, "-c", CONNECTED, pair.b_ip4, str(args.timeout)),
                                      capture_output=True, text=True, env=env)
                connected.append(json.loads(done.stdout))
            if refuser is not None:
                refuser.communicate("", timeout=10)
            rows.append((how, statistics.median(r["seconds"] for r in aioquic),
                         "ok" if all(r["ok"] for r in aioquic) else (aioquic[0]["error"] or "failed"),
                         statistics.median(r["seconds"] for r in connected),
                         "/".join(sorted({r["outcome"] for r in connected}))))
    finally:
        stop_all(processes)
        pair.delete()
    print(f"sudo python benchmarks/quic_refusal.py --tries {args.tries} --timeout {args.timeout}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, median of {args.tries} tries, client timeout "
          f"{args.timeout} s")
    print(f"{'refusal':<8} {'aioquic s':>10}  {'aioquic outcome':<40} {'connected UDP s':>16}  outcome")
    for how, a_s, a_out, c_s, c_out in rows:
        print(f"{how:<8} {a_s:>10.3f}  {a_out[:40]:<40} {c_s:>16.3f}  {c_out}")


if __name__ == "__main__":
    main()
