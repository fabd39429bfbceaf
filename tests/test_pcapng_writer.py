"""The pcapng writer, checked against two independent readers: tshark and scapy."""

from __future__ import annotations

import random
import shutil
import subprocess

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, IPv6, PcapNgReader, Raw

from oisp.pcapng.writer import DIRECTION_UNKNOWN, INBOUND, OUTBOUND, PcapngWriter

T0 = 1_795_000_000_123_456_789  # ns; checks all nine digits survive


def _packets(n: int, seed: int = 7):
    """n scapy-built IP packets of both families and protocols, odd and even lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 90)))
        sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
        l4 = TCP(sport=sport, dport=dport, flags="PA") if i % 2 else UDP(sport=sport, dport=dport)
        if i % 3 == 0:
            ip = IPv6(src=f"fd00::{i + 1:x}", dst=f"fd00::{i + 2:x}")
            src, dst = f"fd00::{i + 1:x}", f"fd00::{i + 2:x}"
        else:
            ip = IP(src=f"10.1.{i % 250}.1", dst=f"10.2.{i % 250}.2")
            src, dst = f"10.1.{i % 250}.1", f"10.2.{i % 250}.2"
        proto = "tcp" if i % 2 else "udp"
        out.append((bytes(ip / l4 / Raw(payload)), (proto, src, dst, sport, dport)))
    return out


def _write(path, packets, comments):
    """Write `packets` as one packed batch plus a single packet, like a capture does."""
    with PcapngWriter.open(str(path)) as writer:
        interfaces = [writer.add_interface("loopback"), writer.add_interface("ifIdx 3", description="eth0")]
        blob = b"".join(p for p, _ in packets[:-1])
        lengths = np.array([len(p) for p, _ in packets[:-1]])
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        n = len(packets) - 1
        writer.write_batch(np.frombuffer(blob, np.uint8), offsets, lengths,
                           interfaces=np.arange(n) % 2, timestamps=T0 + np.arange(n, dtype=np.uint64) * 1000,
                           directions=np.arange(n) % 3, comments=comments,
                           comment_ids=np.arange(n) % (len(comments) + 1) - 1)
        writer.write_packet(packets[-1][0], interface=interfaces[1], timestamp_ns=T0 + n * 1000,
                            direction=OUTBOUND, comment="pid 42 (last one)")
    return n


def _expected(i, n, comments):
    """(interface name, direction, comment) the writer was told for packet i."""
    if i == n:
        return "ifIdx 3", OUTBOUND, "pid 42 (last one)"
    cid = i % (len(comments) + 1) - 1
    return ("loopback", "ifIdx 3")[i % 2], i % 3, comments[cid] if cid >= 0 else None


def test_scapy_reads_back_every_packet(tmp_path):
    packets = _packets(301)
    comments = ["pid 1234 (python3)", "pid 7 (späti)"]
    n = _write(tmp_path / "out.pcapng", packets, comments)
    read = list(PcapNgReader(str(tmp_path / "out.pcapng")))
    assert len(read) == len(packets)
    for i, (pkt, (raw, _)) in enumerate(zip(read, packets)):
        name, direction, comment = _expected(i, n, comments)
        assert bytes(pkt) == raw
        assert pkt.sniffed_on == name
        assert (pkt.direction or DIRECTION_UNKNOWN) == direction
        assert (pkt.comments or [None])[0] == (comment.encode() if comment else None)
        assert int(pkt.time * 10**6) == (T0 + i * 1000) // 1000  # scapy keeps float seconds


@pytest.mark.skipif(not shutil.which("tshark"), reason="needs tshark (apt-get install -y tshark)")
def test_tshark_reads_back_five_tuples_direction_and_comments(tmp_path):
    packets = _packets(120, seed=11)
    comments = ["pid 1234 (curl)"]
    n = _write(tmp_path / "out.pcapng", packets, comments)
    fields = ["frame.number", "frame.len", "frame.interface_name", "frame.packet_flags_direction",
              "frame.comment", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport",
              "udp.srcport", "udp.dstport", "frame.time_epoch"]
    done = subprocess.run(["tshark", "-r", str(tmp_path / "out.pcapng"), "-T", "fields", "-E", "occurrence=f",
                           *[a for f in fields for a in ("-e", f)]], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert len(lines) == len(packets)
    for i, (line, (raw, (proto, src, dst, sport, dport))) in enumerate(zip(lines, packets)):
        row = dict(zip(fields, line.split("\t")))
        name, direction, comment = _expected(i, n, comments)
        assert int(row["frame.number"]) == i + 1
        assert int(row["frame.len"]) == len(raw)
        assert row["frame.interface_name"] == name
        assert int(row["frame.packet_flags_direction"] or "0", 16) == direction
        assert row["frame.comment"] == (comment or "")
        assert (row["ip.src"] or row["ipv6.src"], row["ip.dst"] or row["ipv6.dst"]) == (src, dst)
        assert (int(row[f"{proto}.srcport"]), int(row[f"{proto}.dstport"])) == (sport, dport)
        assert row["frame.time_epoch"].replace(".", "") == str(T0 + i * 1000)


def test_each_write_is_flushed_for_a_live_reader(tmp_path):
    """A reader opening the file mid-capture sees every packet written so far."""
    path = tmp_path / "live.pcapng"
    packets = _packets(3)
    with PcapngWriter.open(str(path)) as writer:
        lo = writer.add_interface("loopback")
        for i, (raw, _) in enumerate(packets):
            writer.write_packet(raw, interface=lo, timestamp_ns=T0, direction=INBOUND)
            assert [bytes(p) for p in PcapNgReader(str(path))] == [p for p, _ in packets[: i + 1]]
