"""Per-packet redirector work with oisp vs pydivert vs scapy, as ratios.

    python benchmarks/packet_ratios.py [--rounds 7]

One batch of 256 realistic packets (60 % bare ACKs, 40 % carrying 1,460 bytes;
half IPv4, half IPv6, TCP timestamps on), all going to or coming back from
port 443. The redirector's work on each packet: parse, verify checksums, pick
the packets to take, reflect them (swap addresses, move the port) and update
the checksums. Every round reflects each packet once, alternating 443 -> 8443
and back, so the buffer stays in a steady state without copying it.

  oisp      parse_batch(verify=True) + two reflect() calls over the whole batch
  pydivert  per packet: pydivert.Packet(raw), check the port, swap addresses,
            set the port, recalculate_checksums()
  scapy     per packet: dissect, check, swap, set, delete checksums, raw()

Also: parse + verify throughput on full-size (1,460-byte payload) packets
against a memcpy (numpy copyto) of the same bytes.

Timing: best of --rounds runs of each (the machine is noisy; the ratios within
one run are what to compare). pytest-benchmark runs the same functions:
`python -m pytest benchmarks/bench_packet.py --benchmark-enable`.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import numpy as np
import pydivert
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from oisp.packet import OK, PACKET_DTYPE, parse_batch, reflect

BATCH_SIZE = 256
SERVICE_PORT, PROXY_PORT = 443, 8443
TCP_OPTIONS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


def _packet(rng: random.Random, version: int, payload_len: int) -> bytes:
    if version == 4:
        ip = IP(src=f"10.0.{rng.randrange(256)}.{rng.randrange(1, 255)}", dst="93.184.216.34", ttl=64)
    else:
        ip = IPv6(src=f"fd00::{rng.randrange(1, 0xFFFF):x}", dst="2606:2800:220:1::1", hlim=64)
    tcp = TCP(sport=rng.randrange(32768, 61000), dport=SERVICE_PORT, flags="PA" if payload_len else "A",
              seq=rng.randrange(2**32), ack=rng.randrange(2**32), window=501, options=TCP_OPTIONS)
    return raw(ip / tcp / bytes(rng.randrange(256) for _ in range(payload_len)))


def realistic_batch(seed: int = 2) -> list[bytes]:
    """256 packets: 60 % bare ACKs (52/72 bytes), 40 % with 1,460-byte payloads."""
    rng = random.Random(seed)
    sizes = [0] * (BATCH_SIZE * 6 // 10) + [1460] * (BATCH_SIZE - BATCH_SIZE * 6 // 10)
    rng.shuffle(sizes)
    return [_packet(rng, 4 if i % 2 else 6, size) for i, size in enumerate(sizes)]


def full_size_batch(count: int = 255) -> bytes:
    rng = random.Random(3)
    return b"".join(_packet(rng, 4 if i % 2 else 6, 1460) for i in range(count))


# ---------------------------------------------------------------- the work, three ways


class OispRedirector:
    def __init__(self, packets: list[bytes]) -> None:
        self.buf = bytearray(b"".join(packets))
        self.out = np.empty(255 + 1, PACKET_DTYPE)  # WinDivert's max is 255; the bench batch is 256

    def run(self) -> None:
        rows = parse_batch(self.buf, max_packets=len(self.out), out=self.out)
        good = rows["status"] == OK
        to_proxy = good & (rows["dst_port"] == SERVICE_PORT)
        reflect(self.buf, rows, to_proxy, dst_port=PROXY_PORT)
        reflect(self.buf, rows, good & ~to_proxy, dst_port=SERVICE_PORT)


class PydivertRedirector:
    def __init__(self, packets: list[bytes]) -> None:
        self.packets = [bytearray(p) for p in packets]

    def run(self) -> None:
        for i, data in enumerate(self.packets):
            packet = pydivert.Packet(data)
            port = PROXY_PORT if packet.tcp.dst_port == SERVICE_PORT else SERVICE_PORT
            packet.src_addr, packet.dst_addr = packet.dst_addr, packet.src_addr
            packet.tcp.dst_port = port
            packet.recalculate_checksums()
            self.packets[i] = packet.raw  # keep the state flipping like the others


class ScapyRedirector:
    def __init__(self, packets: list[bytes]) -> None:
        self.packets = list(packets)

    def run(self) -> None:
        for i, data in enumerate(self.packets):
            packet = IP(data) if data[0] >> 4 == 4 else IPv6(data)
            tcp = packet[TCP]
            port = PROXY_PORT if tcp.dport == SERVICE_PORT else SERVICE_PORT
            packet.src, packet.dst = packet.dst, packet.src
            tcp.dport = port
            if packet.version == 4:
                del packet.chksum
            del tcp.chksum
            self.packets[i] = raw(packet)


class ParseVerify:
    """Parse + verify every checksum of a batch of full-size packets."""

    def __init__(self, batch: bytes) -> None:
        self.buf = np.frombuffer(batch, np.uint8)
        self.out = np.empty(255, PACKET_DTYPE)

    def run(self) -> None:
        parse_batch(self.buf, out=self.out)


class Memcpy:
    def __init__(self, batch: bytes) -> None:
        self.src = np.frombuffer(batch, np.uint8)
        self.dst = np.empty_like(self.src)

    def run(self) -> None:
        np.copyto(self.dst, self.src)


def check_equivalence(packets: list[bytes]) -> None:
    """The three redirectors must produce the same bytes, or the comparison is void."""
    oisp, pyd, sc = OispRedirector(packets), PydivertRedirector(packets), ScapyRedirector(packets)
    for r in (oisp, pyd, sc):
        r.run()
    expected = bytes(oisp.buf)
    assert b"".join(bytes(p) for p in pyd.packets) == expected, "pydivert result differs"
    assert b"".join(sc.packets) == expected, "scapy result differs"


def best_ns(run, rounds: int, inner: int) -> float:
    """Best per-call time over `rounds` runs of `inner` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(inner):
            run()
        best = min(best, (time.perf_counter_ns() - start) / inner)
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    packets = realistic_batch()
    check_equivalence(packets)
    n = len(packets)
    per_packet = {
        "oisp": best_ns(OispRedirector(packets).run, args.rounds, 200) / n,
        "pydivert": best_ns(PydivertRedirector(packets).run, args.rounds, 5) / n,
        "scapy": best_ns(ScapyRedirector(packets).run, max(3, args.rounds // 2), 1) / n,
    }
    big = full_size_batch()
    parse_ns = best_ns(ParseVerify(big).run, args.rounds, 200)
    copy_ns = best_ns(Memcpy(big).run, args.rounds, 200)

    print(f"machine: {cpu_model()}, {__import__('os').cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"batch: {n} packets, {sum(map(len, packets))} bytes "
          f"({sum(len(p) > 100 for p in packets)} with 1460-byte payloads)")
    print(f"{'redirector work':<12} {'ns/packet':>10} {'vs oisp':>9}")
    for name, ns in per_packet.items():
        print(f"{name:<12} {ns:>10.1f} {ns / per_packet['oisp']:>8.1f}x")
    print(f"target: pydivert/oisp >= 50x -> {per_packet['pydivert'] / per_packet['oisp']:.0f}x")
    print(f"full-size batch: {len(big)} bytes in 255 packets")
    print(f"  parse+verify  {parse_ns / 1000:8.1f} us  {len(big) / parse_ns:6.2f} GB/s  {parse_ns / 255:6.1f} ns/packet")
    print(f"  memcpy        {copy_ns / 1000:8.1f} us  {len(big) / copy_ns:6.2f} GB/s")
    print(f"target: parse+verify within 3x of memcpy -> {parse_ns / copy_ns:.2f}x")


if __name__ == "__main__":
    main()
