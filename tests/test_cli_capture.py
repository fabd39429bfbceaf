"""`oisp capture`: real traffic in a namespace, read back by tshark, compared with
what the test's own client sent and received."""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.netns import ECHO_TCP_PORT, ECHO_UDP_PORT, echo_args, with_cgroup2

FIELDS = ["frame.len", "frame.interface_name", "frame.packet_flags_direction", "frame.comment", "ip.src", "ip.dst",
          "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport", "tcp.len", "tcp.flags.syn", "udp.srcport",
          "udp.dstport", "udp.length"]

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not shutil.which("tshark"), reason="needs tshark (apt-get install -y tshark)")]


def start_capture(ns, *args: str, cgroup2: bool = False, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    argv = [sys.executable, "-m", "oisp", "capture", *args]
    proc = ns.popen(*(with_cgroup2(*[f"'{a}'" for a in argv]) if cgroup2 else argv), stdout=stdout,
                    stderr=subprocess.PIPE)  # binary: stdout may be pcapng
    deadline = time.monotonic() + 20
    seen = []
    while time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 0.2)[0]:
            line = proc.stderr.readline().decode()
            seen.append(line)
            if line.startswith("oisp capture: capturing"):
                return proc
            if not line:
                break
    proc.kill()
    raise AssertionError(f"capture did not start: {''.join(seen)}")


def tshark(source) -> list[dict]:
    """Rows of FIELDS for each packet of a pcapng file (path) or bytes."""
    argv = ["tshark", "-r", "-" if isinstance(source, bytes) else str(source), "-T", "fields", "-E", "occurrence=f",
            *[a for f in FIELDS for a in ("-e", f)]]
    done = subprocess.run(argv, input=source if isinstance(source, bytes) else None, capture_output=True,
                          check=True)
    return [dict(zip(FIELDS, line.split("\t"))) for line in done.stdout.decode().splitlines()]


def run_client(ns, host, messages=5, datagrams=7) -> dict:
    return json.loads(ns.python(*echo_args("client", host, messages=messages, datagrams=datagrams)).stdout)


def five_tuple(row) -> tuple:
    proto = "tcp" if row["tcp.srcport"] else "udp"
    return (proto, row["ip.src"] or row["ipv6.src"], int(row[f"{proto}.srcport"]),
            row["ip.dst"] or row["ipv6.dst"], int(row[f"{proto}.dstport"]))


def check_exchange(rows, host, client) -> None:
    """Every packet is the client's TCP or UDP exchange with the server, complete."""
    tcp_c, udp_c = client["tcp_port"], client["udp_port"]
    expected = {("tcp", host, tcp_c, host, ECHO_TCP_PORT), ("tcp", host, ECHO_TCP_PORT, host, tcp_c),
                ("udp", host, udp_c, host, ECHO_UDP_PORT), ("udp", host, ECHO_UDP_PORT, host, udp_c)}
    assert {five_tuple(r) for r in rows} == expected
    by_tuple = {}
    for r in rows:
        by_tuple.setdefault(five_tuple(r), []).append(r)
    # UDP: one packet per datagram each way, as the client counted them.
    assert len(by_tuple[("udp", host, udp_c, host, ECHO_UDP_PORT)]) == client["udp_sent"]
    assert len(by_tuple[("udp", host, ECHO_UDP_PORT, host, udp_c)]) == client["udp_received"]
    # TCP: the handshake, and exactly the payload bytes the client sent and got back.
    to_server = by_tuple[("tcp", host, tcp_c, host, ECHO_TCP_PORT)]
    assert sum(int(r["tcp.len"]) for r in to_server) == client["tcp_sent"]
    assert sum(int(r["tcp.len"]) for r in by_tuple[("tcp", host, ECHO_TCP_PORT, host, tcp_c)]) == client["tcp_received"]
    assert to_server[0]["tcp.flags.syn"] in ("1", "True")
    for r in rows:
        assert r["frame.interface_name"] == "loopback"
        assert int(r["frame.packet_flags_direction"], 16) == 2  # loopback is seen outbound only


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_capture_then_sigterm_writes_every_packet_of_the_exchange(netns, tmp_path, host):
    server = netns.popen(sys.executable, *echo_args("server", host),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = tmp_path / "capture.pcapng"
        capture = start_capture(netns, "-w", str(out), "--no-process-info", "--duration", "60", "--filter",
                                f"tcp.DstPort == {ECHO_TCP_PORT} or tcp.SrcPort == {ECHO_TCP_PORT} or "
                                f"udp.DstPort == {ECHO_UDP_PORT} or udp.SrcPort == {ECHO_UDP_PORT}")
        client = run_client(netns, host)
        time.sleep(0.5)
        capture.send_signal(signal.SIGTERM)
        err = capture.communicate(timeout=20)[1].decode()
        assert capture.returncode == 0, err
    finally:
        server.kill()
    rows = tshark(out)
    check_exchange(rows, host, client)
    assert f"{len(rows)} packets" in err


def test_count_stops_at_exactly_n_and_stdout_is_a_pcapng_stream(netns):
    server = netns.popen(sys.executable, *echo_args("server", "127.0.0.1"),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        capture = start_capture(netns, "-w", "-", "--no-process-info", "--count", "9", "--duration", "30",
                                "--filter", f"udp.DstPort == {ECHO_UDP_PORT}", stdout=subprocess.PIPE)
        client = run_client(netns, "127.0.0.1", messages=1, datagrams=20)
        data, err = capture.communicate(timeout=20)
        assert capture.returncode == 0, err.decode()
    finally:
        server.kill()
    rows = tshark(data)
    assert len(rows) == 9
    assert {five_tuple(r) for r in rows} == {("udp", "127.0.0.1", client["udp_port"], "127.0.0.1", ECHO_UDP_PORT)}


def test_invalid_filter_is_a_typed_error_with_its_position(netns, tmp_path):
    done = netns.run(sys.executable, "-m", "oisp", "capture", "-w", str(tmp_path / "x.pcapng"), "--filter",
                     "tcp.DstPort == ", check=False)
    assert done.returncode == 2
    assert "invalid filter at position 15" in done.stderr


def test_process_keeps_only_the_chosen_childs_flows(netns, tmp_path):
    server = netns.popen(sys.executable, *echo_args("server", "127.0.0.1"),
                         stdout=subprocess.PIPE, text=True)
    children = [netns.popen(sys.executable, *echo_args("client", "127.0.0.1", messages=4, datagrams=5, wait=True),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert server.stdout.readline().strip() == "ready"
        chosen, other = (json.loads(c.stdout.readline())["pid"] for c in children)
        out = tmp_path / "process.pcapng"
        capture = start_capture(netns, "-w", str(out), "--process", str(chosen), "--duration", "60", cgroup2=True)
        reports = []
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
            reports.append(json.loads(child.stdout.readline()))
        time.sleep(1.0)  # past the attribution hold-back
        capture.send_signal(signal.SIGINT)
        err = capture.communicate(timeout=20)[1].decode()
        assert capture.returncode == 0, err
    finally:
        for p in (server, *children):
            p.kill()
    rows = tshark(out)
    assert reports[0]["pid"] == chosen
    assert reports[1]["pid"] == other
    check_exchange(rows, "127.0.0.1", reports[0])
    assert {r["frame.comment"].split(" (")[0] for r in rows} == {f"pid {chosen}"}
