"""Sniff-mode capture to a file: oisp vs pydivert loops, side by side in one run.

    sudo python benchmarks/sniff_ratios.py [--count 200000] [--rounds 3]

In a namespace it creates, the C sender floods 64-byte UDP datagrams at
127.0.0.1 as fast as the kernel lets it (a sniff handle does not slow the
traffic, so there is no window here), while one of these writes them to a file:

  (a) pydivert 4.0.1 sniff handle, recv() per packet, scapy's PcapWriter
  (p) pydivert 4.0.1 sniff handle, recv() per packet, a plain struct-packing pcap writer
  (b) oisp: oisp.capture.session.Capture (what `oisp capture -w FILE` runs), pcapng
  (d) benchmarks/c/divert_loop sniff: ebpfdivert_recv_ex in C, writing nothing (the limit)

Each reports packets captured and packets/s from its first to its last packet.
A loop that cannot keep up loses packets (the kernel queue overflows), so its
rate is its ceiling; one that keeps up runs at the offered rate, so a ratio
against it is a lower bound. Target: (b)/(a) >= 5.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_ratios import C_DIR, IDLE, PORT, QUEUE_LENGTH, build_c, library_path, machine, namespace, report, run_flood

FILTER = f"udp.DstPort == {PORT}"
VARIANTS = {
    "a": "pydivert sniff + scapy PcapWriter",
    "p": "pydivert sniff + plain pcap writer",
    "b": "oisp capture to pcapng",
    "d": "C ebpfdivert_recv_ex sniff (no file)",
}


class PlainPcapWriter:
    """The smallest honest pcap writer: global header, then one record header per packet."""

    def __init__(self, path: str):
        self.f = open(path, "wb")
        self.f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))  # LINKTYPE_RAW

    def write(self, data: bytes) -> None:
        now = time.time()
        self.f.write(struct.pack("<IIII", int(now), int(now % 1 * 1e6), len(data), len(data)) + data)

    def close(self) -> None:
        self.f.close()


def consume_pydivert(count: int, path: str, plain: bool) -> None:
    import pydivert

    if plain:
        writer = PlainPcapWriter(path)
    else:
        from scapy.utils import PcapWriter

        writer = PcapWriter(path, linktype=101, sync=False)
    with pydivert.Divert(FILTER, flags=pydivert.Flag.SNIFF) as w:  # WinDivert or EBPFDivert
        w.set_param(pydivert.Param.QUEUE_LEN, QUEUE_LENGTH)
        print('{"ready": true}', flush=True)
        packets, first, last, timeout = 0, 0.0, 0.0, 30.0
        while packets < count:
            try:
                packet = w.recv(timeout=timeout)
            except TimeoutError:
                break
            writer.write(packet.raw.tobytes() if hasattr(packet.raw, "tobytes") else bytes(packet.raw))
            last = time.perf_counter()
            first = first or last
            packets += 1
            timeout = IDLE
    writer.close()
    report(packets, first, last)


def consume_oisp(count: int, path: str) -> None:
    from oisp.capture.session import Capture
    from oisp.pcapng.writer import PcapngWriter

    writer = PcapngWriter.open(path, flush=False)
    capture = Capture(writer, FILTER, count=count, attribute=False)
    capture.engine.handle.set_param(0, QUEUE_LENGTH)  # Param.QUEUE_LENGTH, as the pydivert loops get

    def stop_when_idle():
        started = time.monotonic()
        while not capture.stop_requested.wait(0.1):
            last = capture.stats.last or started + 30.0 - IDLE  # wait up to 30 s for the first packet
            if time.monotonic() - last > IDLE:
                capture.stop_requested.set()

    threading.Thread(target=stop_when_idle, daemon=True).start()
    print('{"ready": true}', flush=True)
    stats = capture.run()
    writer.close()
    report(stats.packets, stats.first, stats.last, dropped=stats.dropped)


def consumer_command(variant: str, count: int, path: str) -> list[str]:
    if variant == "d":
        return [str(C_DIR / "divert_loop"), library_path(), FILTER, "sniff", "255", str(count),
                str(int(IDLE * 1000)), str(QUEUE_LENGTH)]
    return [sys.executable, str(Path(__file__).resolve()), "--consumer", variant, "--count", str(count),
            "--path", path]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="apbd")
    parser.add_argument("--consumer", choices=["a", "p", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.consumer in ("a", "p"):
        consume_pydivert(args.count, args.path, plain=args.consumer == "p")
        return 0
    if args.consumer == "b":
        consume_oisp(args.count, args.path)
        return 0

    build_c()
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp, namespace("sniff") as ns:
        for _ in range(args.rounds):
            for variant in args.variants:
                path = str(Path(tmp) / f"{variant}.pcap")
                results[variant].append(run_flood(ns, consumer_command(variant, args.count, path), args.count, 0,
                                                  windowed=False))

    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  {machine()}")
    print(f"# {args.count} x 64-byte UDP datagrams on loopback, unpaced, {args.rounds} rounds, median")
    print(f"{'':4}{'loop':38}{'packets/s':>11}{'captured':>10}{'offered pkt/s':>15}")
    pps = {}
    for variant, runs in results.items():
        median = sorted(runs, key=lambda r: r["loop"]["pps"])[len(runs) // 2]
        pps[variant] = statistics.median(r["loop"]["pps"] for r in runs)
        print(f"({variant}) {VARIANTS[variant]:38}{pps[variant]:>11,.0f}{median['loop']['packets']:>10}"
              f"{median['flood']['send_pps']:>15,.0f}")
    for num, den in (("b", "a"), ("b", "p"), ("b", "d")):
        if num in pps and den in pps and pps[den]:
            print(f"({num})/({den}) = {pps[num] / pps[den]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
