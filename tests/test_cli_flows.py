"""`oisp flows`: a child's TCP connection shows with the child's pid, its addresses,
and the bytes and packets that tshark, capturing on the same loopback, counted."""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import ECHO_TCP_PORT, ECHO_UDP_PORT, echo_args, with_cgroup2

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not shutil.which("tshark"), reason="needs tshark (apt-get install -y tshark)")]


def wait_for(stream, text: str, timeout: float = 20) -> None:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        if select.select([stream], [], [], 0.2)[0]:
            line = stream.readline()
            seen.append(line)
            if text in line:
                return
            if not line:
                break
    raise AssertionError(f"never saw {text!r}: {''.join(seen)}")


def reference_counts(pcap: Path, client_port: int) -> tuple[int, int]:
    """Packets and IP bytes of the client's TCP connection, as tshark counted them."""
    done = subprocess.run(["tshark", "-r", str(pcap), "-Y", f"tcp.port == {client_port} && tcp.port == {ECHO_TCP_PORT}",
                           "-T", "fields", "-e", "ip.len"], capture_output=True, text=True, check=True)
    lengths = [int(x) for x in done.stdout.split()]
    return len(lengths), sum(lengths)


@pytest.mark.parametrize("process_filter", [False, True])
def test_childs_tcp_connection_shows_with_its_pid_addresses_bytes_and_packets(netns, tmp_path, process_filter):
    server = netns.popen(sys.executable, *echo_args("server", "127.0.0.1"),
                         stdout=subprocess.PIPE, text=True)
    child = netns.popen(sys.executable, *echo_args("client", "127.0.0.1", messages=6, datagrams=3, wait=True),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pcap = tmp_path / "reference.pcap"
    reference = netns.popen("tshark", "-i", "lo", "-f", f"tcp port {ECHO_TCP_PORT}", "-w", str(pcap),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    flows = None
    try:
        assert server.stdout.readline().strip() == "ready"
        pid = json.loads(child.stdout.readline())["pid"]
        wait_for(reference.stderr, "Capturing on")
        argv = [sys.executable, "-m", "oisp", "flows", "--json", "--duration", "30", "--interval", "0.2"]
        if process_filter:
            argv += ["--process", str(pid)]
        flows = netns.popen(*with_cgroup2(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(flows.stderr, "oisp flows: watching")
        child.stdin.write("go\n")
        child.stdin.flush()
        report = json.loads(child.stdout.readline())
        # The connection's last packets (the server's FIN, the client's last ACK) go out once
        # the server's thread closes its end, which on a loaded machine can be well after the
        # client's report: wait until the client's socket is in TIME-WAIT (or gone), then give
        # `oisp flows` time to settle and print.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = netns.run("ss", "-Htan", f"sport = :{report['tcp_port']}", check=False).stdout
            if not states.strip() or "TIME-WAIT" in states:
                break
            time.sleep(0.05)
        time.sleep(1.0)
        flows.send_signal(signal.SIGINT)
        out, err = flows.communicate(timeout=20)
        assert flows.returncode == 0, err
        time.sleep(0.5)
        reference.send_signal(signal.SIGINT)
        reference.communicate(timeout=20)
    finally:
        for p in (server, child, reference, flows):
            if p is not None and p.poll() is None:
                p.kill()

    latest = {}
    for line in out.splitlines():
        row = json.loads(line)
        latest[(row["pid"], row["protocol"], row["local"], row["local_port"], row["remote"], row["remote_port"])] = row
    mine = latest[(pid, "tcp", "127.0.0.1", report["tcp_port"], "127.0.0.1", ECHO_TCP_PORT)]
    packets, nbytes = reference_counts(pcap, report["tcp_port"])
    assert (mine["packets"], mine["bytes"]) == (packets, nbytes)
    assert mine["bytes"] > report["tcp_sent"] + report["tcp_received"]  # payload plus headers
    assert mine["first_seen"] <= mine["last_seen"]
    assert (pid, "udp", "127.0.0.1", report["udp_port"], "127.0.0.1", ECHO_UDP_PORT) in latest
    if process_filter:
        assert {key[0] for key in latest} == {pid}
    else:
        server_side = latest[(server.pid, "tcp", "127.0.0.1", ECHO_TCP_PORT, "127.0.0.1", report["tcp_port"])]
        assert (server_side["packets"], server_side["bytes"]) == (packets, nbytes)
