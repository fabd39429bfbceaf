"""Failing open across the split (issue 15 item 4), with real SDK clients in the record lab.

- `oisp record` (split): kill -9 of its sensor mid-stream. Nothing new is reflected at
  once (a fresh connection goes straight to the server within 1 s), the stream's
  connection errors at once, and record says so and exits 1.
- `oisp redirector` + `oisp sensor` run by hand (root and the test user, as a service
  runs them): kill -9 of the sensor, then of the redirector, each mid-stream. Traffic
  flows directly within 1 s each time, and restarting the side that died resumes
  recording without restarting the other. A local user other than the allowed one
  (root here) is not served by the real redirector either.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.record_lab import HERE, read_events, run_client, sensor_of

pytestmark = pytest.mark.privileged


def requests(lab) -> int:
    return sum(e["event_type"] == "ai.request" for e in read_events(lab))


def stream(lab) -> subprocess.Popen:
    """A long streaming call, trusting both CAs, so it could go on either way."""
    return subprocess.Popen(lab["pair"].a.cmd(sys.executable, str(HERE / "agents" / "ai_clients.py"), "openai_stream",
                                              "https://api.openai.com", "3000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SSL_CERT_FILE": lab["both"]})


def await_requests(lab, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while requests(lab) < count:
        assert time.monotonic() < deadline, f"{requests(lab)} requests recorded, not {count}"
        time.sleep(0.05)


def direct_within(lab, since: float) -> float | None:
    """Seconds from `since` until a new connection gets the real server's certificate
    (trusting only the upstream CA: a reflected one would fail), within 5 s."""
    while time.monotonic() - since < 5:
        # A SYN sent in the instant before the filters go is retried only after TCP's 1 s
        # initial timeout: short probes measure when traffic flows again.
        done = lab["pair"].a.run("curl", "-sS", "--connect-timeout", "0.2", "-m", "2", "--cacert", lab["upstream_ca"],
                                 "https://api.openai.com/plain", check=False)
        if done.returncode == 0 and done.stdout == "plain upstream reply\n":
            return time.monotonic() - since
        time.sleep(0.02)
    return None


def assert_cut_at_once(client: subprocess.Popen, since: float) -> None:
    out, err = client.communicate(timeout=40)
    ended = time.monotonic() - since
    assert client.returncode != 0 and ended < 5, (ended, err[-300:])


def test_killing_the_sensor_of_oisp_record_mid_stream_fails_open(record_lab):
    client = stream(record_lab)
    await_requests(record_lab, 1)
    os.kill(sensor_of(record_lab["sensor"]), signal.SIGKILL)
    killed = time.monotonic()
    recovered = direct_within(record_lab, killed)
    assert recovered is not None and recovered < 1.0, recovered
    assert_cut_at_once(client, killed)
    assert record_lab["sensor"].wait(15) == 1
    rest = record_lab["sensor"].stderr.read()
    assert "the sensor died (SIGKILL); stopped diverting, traffic flows directly" in rest, rest


class Lines:
    """A process's stderr, read in a thread, so a test can wait for a line."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process) -> None:
        for line in process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, start: str, timeout: float = 30) -> str:
        with self._changed:
            if not self._changed.wait_for(lambda: any(line.startswith(start) for line in self.lines), timeout):
                raise AssertionError(f"no line {start!r} in {''.join(self.lines)[-3000:]}")
            return next(line for line in self.lines if line.startswith(start))


@pytest.fixture
def roles(provider_lab):
    address = f"/run/oisp/split-test-{os.getpid()}.sock"
    lab = provider_lab

    def redirector() -> tuple[subprocess.Popen, Lines]:
        process = lab["spawn"](sys.executable, "-m", "oisp", "redirector", "--user", lab["user"].pw_name,
                               "--socket", address)
        lines = Lines(process)
        lines.wait_for("oisp redirector: serving sensors")
        return process, lines

    def sensor(wait: bool = True) -> tuple[subprocess.Popen, Lines]:
        process = lab["spawn"](sys.executable, "-m", "oisp", "sensor", "--socket", address, "-o", str(lab["events"]),
                               "--upstream-ca", lab["upstream_ca"], as_user=True)
        lines = Lines(process)
        if wait:
            lines.wait_for("oisp sensor: recording")
        return process, lines

    lab.update(redirector=redirector, sensor=sensor, address=address)
    try:
        yield lab
    finally:
        Path(address).unlink(missing_ok=True)


def test_either_side_killed_mid_stream_fails_open_and_a_restart_resumes(roles):
    lab = roles
    redirector, _ = lab["redirector"]()
    sensor, sensor_says = lab["sensor"]()
    Path(lab["both"]).write_text(Path(lab["our_ca"]).read_text() + Path(lab["upstream_ca"]).read_text())
    assert run_client(lab, "openai_sync").returncode == 0
    await_requests(lab, 1)

    # root is not the allowed user: the real redirector closes on it without a word
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    probe.connect(lab["address"])  # root passes the socket's mode, not the peer check
    hello = b'{"type":"hello","versions":[2]}'
    try:
        probe.sendall(len(hello).to_bytes(4, "big") + hello)
        said = probe.recv(100)
    except (ConnectionResetError, BrokenPipeError):
        said = b""
    assert said == b""
    probe.close()

    # the sensor dies: nothing new is reflected, in-flight connections error at once
    client = stream(lab)
    await_requests(lab, 2)
    sensor.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    recovered = direct_within(lab, killed)
    assert recovered is not None and recovered < 1.0, recovered
    assert_cut_at_once(client, killed)
    sensor.wait()

    # a new sensor resumes recording; the redirector was not restarted
    sensor, sensor_says = lab["sensor"]()
    assert run_client(lab, "openai_sync").returncode == 0
    await_requests(lab, 3)

    # the redirector dies: the guardian lets traffic go straight, the sensor says so and waits
    client = stream(lab)
    await_requests(lab, 4)
    redirector.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    recovered = direct_within(lab, killed)
    assert recovered is not None and recovered < 1.0, recovered
    assert_cut_at_once(client, killed)
    redirector.wait()
    assert "went away" in sensor_says.wait_for("oisp sensor: the redirector went away", timeout=10)
    assert sensor.poll() is None  # waiting, not gone

    # a new redirector: the same sensor records again
    redirector, _ = lab["redirector"]()
    sensor_says.wait_for("oisp sensor: the redirector is back; recording again")
    done = run_client(lab, "openai_sync")
    assert done.returncode == 0, done.stderr[-2000:]
    await_requests(lab, 5)

    sensor.send_signal(signal.SIGINT)
    assert sensor.wait(15) == 0
    assert sensor_says.wait_for("oisp sensor: 3 requests")  # the summary: the calls since it started
    redirector.send_signal(signal.SIGTERM)
    assert redirector.wait(15) == 0
