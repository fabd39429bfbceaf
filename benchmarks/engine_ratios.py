"""Divert-and-reinject throughput, side by side in one run, as ratios.

    sudo python benchmarks/engine_ratios.py [--count 200000] [--rounds 3] [--window 4096]

In a network namespace it creates (and removes), a C sender floods 64-byte UDP
datagrams at 127.0.0.1 and a sink in the same C process counts them; the sender
keeps at most WINDOW datagrams in flight, so the divert loop under test is offered
as much as it can take and no more (WINDOW < the handle's queue length, so a
lossless loop loses nothing). Each loop reports packets/s from the first to the
last packet it diverted. The loops:

  (a) pydivert 4.0.1: recv() / send() one packet at a time
  (b) oisp Engine pass-through: next_batch() / commit()
  (c) oisp Engine + oisp.packet.reflect: addresses swapped, the destination port
      moved to the sink's port with an incremental checksum, verdict MODIFIED
      (the sink listens only there, and the kernel drops a bad checksum: a broken
      rewrite shows as loss)
  (d) benchmarks/c/divert_loop: ebpfdivert_recv_ex/send_ex in C, the backend's limit

Rounds are interleaved (a b c d a b c d …) and the median of each is reported, since
the machine is noisy. `--consumer` is how the script runs a loop inside the namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
C_DIR = HERE / "c"
PORT, SINK_PORT = 40001, 40002
QUEUE_LENGTH = 16384
IDLE = 1.0  # a loop stops after this long without a packet


def library_path() -> str:
    import pydivert

    return str(Path(pydivert.__file__).parent / "bpf" / "libebpfdivert.so")


def build_c() -> None:
    subprocess.run(["make", "-s", "-C", str(C_DIR)], check=True)


@contextmanager
def namespace(tag: str):
    name = f"oisp-bench-{tag}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name])


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run_flood(ns: str, consumer: list[str], count: int, window: int, *, sink_port: int = PORT,
              windowed: bool = True) -> dict:
    """Start `consumer` in the namespace, wait for its ready line, flood, collect both reports."""
    proc = subprocess.Popen(in_ns(ns, *consumer), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        if '"ready"' not in ready:
            raise RuntimeError(f"{consumer[0]} did not start: {ready}{proc.stderr.read()}")
        flood = subprocess.run(in_ns(ns, str(C_DIR / "udp_flood"), "run", "127.0.0.1", str(PORT), str(count),
                                     str(window if windowed else 0), "64", str(int(IDLE * 1000)), str(sink_port)),
                               capture_output=True, text=True, timeout=300, check=True)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{consumer} exited {proc.returncode}: {out}{err}")
    return {"loop": json.loads(lines[-1]), "flood": json.loads(flood.stdout)}


# -- the Python loops, run with --consumer inside the namespace --------------------------------


def report(packets: int, first: float, last: float, **extra) -> None:
    span = last - first
    print(json.dumps({"packets": packets, "seconds": span, "pps": packets / span if span > 0 else 0.0, **extra}),
          flush=True)


def consume_pydivert(count: int) -> None:
    import pydivert

    with pydivert.Divert(f"udp.DstPort == {PORT}") as w:  # WinDivert or EBPFDivert
        w.set_param(pydivert.Param.QUEUE_LEN, QUEUE_LENGTH)
        print('{"ready": true}', flush=True)
        packets, first, last = 0, 0.0, 0.0
        timeout = 30.0
        while packets < count:
            try:
                packet = w.recv(timeout=timeout)
            except TimeoutError:
                break
            w.send(packet)
            last = time.perf_counter()
            first = first or last
            packets += 1
            timeout = IDLE
    report(packets, first, last)


def consume_engine(count: int, rewrite: bool) -> None:
    from oisp.divert.engine import Engine, Verdict
    from oisp.packet import reflect

    with Engine(f"udp.DstPort == {PORT}", queue_length=QUEUE_LENGTH) as engine:
        print('{"ready": true}', flush=True)
        packets, first, last = 0, 0.0, 0.0
        timeout = 30.0
        while packets < count:
            batch = engine.next_batch(timeout)
            if batch is None:
                break
            if rewrite:
                rows = batch.rows
                select = rows["dst_port"] == PORT
                reflect(batch.data, rows, select, dst_port=SINK_PORT)
                batch.verdicts[select] = Verdict.MODIFIED
            engine.commit(batch)
            last = time.perf_counter()
            first = first or last
            packets += batch.count
            timeout = IDLE
        counters = engine.counters()
    report(packets, first, last, counters={k: v for k, v in counters.items() if k != "kernel"})


# -- the run ------------------------------------------------------------------------------------

VARIANTS = {
    "a": ("pydivert 4.0.1 recv/send", PORT),
    "b": ("oisp Engine pass-through", PORT),
    "c": ("oisp Engine + reflect rewrite", SINK_PORT),
    "d": ("C ebpfdivert_recv_ex/send_ex", PORT),
}


def consumer_command(variant: str, count: int, batch: int) -> list[str]:
    if variant == "d":
        return [str(C_DIR / "divert_loop"), library_path(), f"udp.DstPort == {PORT}", "pass", str(batch),
                str(count), str(int(IDLE * 1000)), str(QUEUE_LENGTH)]
    return [sys.executable, str(Path(__file__).resolve()), "--consumer", variant, "--count", str(count)]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="datagrams per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=4096, help="datagrams in flight at most")
    parser.add_argument("--batch", type=int, default=255, help="batch size of the C loop")
    parser.add_argument("--variants", default="abcd")
    parser.add_argument("--consumer", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.consumer == "a":
        consume_pydivert(args.count)
        return 0
    if args.consumer in ("b", "c"):
        consume_engine(args.count, rewrite=args.consumer == "c")
        return 0

    build_c()
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with namespace("engine") as ns:
        for _ in range(args.rounds):
            for variant in args.variants:
                results[variant].append(run_flood(ns, consumer_command(variant, args.count, args.batch),
                                                  args.count, args.window, sink_port=VARIANTS[variant][1]))

    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  {machine()}")
    print(f"# {args.count} x 64-byte UDP datagrams on loopback, window {args.window}, "
          f"{args.rounds} rounds, median; C batch {args.batch}")
    print(f"{'':4}{'loop':34}{'packets/s':>11}{'sink pkt/s':>11}{'diverted':>10}{'delivered':>11}{'lost':>6}"
          f"{'dup':>5}")
    pps = {}
    for variant, runs in results.items():
        median = sorted(runs, key=lambda r: r["loop"]["pps"])[len(runs) // 2]
        pps[variant] = statistics.median(r["loop"]["pps"] for r in runs)
        delivered = median["flood"]["received"]
        print(f"({variant}) {VARIANTS[variant][0]:34}{pps[variant]:>11,.0f}{median['flood']['pps']:>11,.0f}"
              f"{median['loop']['packets']:>10}"
              f"{delivered:>11}{median['flood']['sent'] - delivered:>6}{median['flood']['duplicates']:>5}")
    for num, den in (("b", "d"), ("c", "d"), ("b", "a"), ("c", "a")):
        if num in pps and den in pps and pps[den]:
            print(f"({num})/({den}) = {pps[num] / pps[den]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
