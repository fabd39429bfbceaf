"""`oisp record` refuses QUIC to AI addresses, on the real kernel path, with aioquic.

Two namespaces joined by a veth: `b` runs QUIC echo servers on UDP 443 at the
address the hosts file of `a` names api.openai.com and at another address; in `a`
runs `oisp record` and an aioquic client. While recording, QUIC to the AI address
fails at once (a Version Negotiation answer) and is reported as a refused
network.connect; QUIC to the other address works; after a clean stop, or a
kill -9, QUIC to the AI address works again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oisp.demo.provider import make_test_pki
from tests.netns import VethPair, _ip, agent_args, stop_all
from tests.record_lab import await_recording

HERE = Path(__file__).parent
TIMEOUT = 4.0  # the client's handshake (idle) timeout: what a dropped Initial would cost

pytestmark = pytest.mark.privileged


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def lab(sensor_tmp, request, sensor_user):
    tmp_path = sensor_tmp  # the sensor's, as the user (see tests/record_lab.py)
    pair = VethPair.create()
    family = request.param
    ai = pair.b_ip4 if family == 4 else pair.b_ip6
    other = pair.b_ip4.rsplit(".", 1)[0] + ".3" if family == 4 else pair.b_ip6.rsplit(":", 1)[0] + ":3"
    ifb = subprocess.run(["ip", "-n", pair.b.name, "-o", "link", "show", "type", "veth"], capture_output=True,
                         text=True, check=True).stdout.split(":")[1].strip().split("@")[0]
    _ip("-n", pair.b.name, "addr", "add", f"{other}/{24 if family == 4 else 64}", "dev", ifb,
        *(["nodad"] if family == 6 else []))
    hosts_dir = Path("/etc/netns") / pair.a.name
    hosts_dir.mkdir(parents=True, exist_ok=True)
    (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{ai} api.openai.com\n")
    ca, cert, key = make_test_pki(tmp_path)
    processes = [pair.b.popen(sys.executable, str(HERE / "agents" / "quic_echo.py"),
                              *agent_args("serve", host=host, port=443, cert=cert, key=key))
                 for host in (ai, other)]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    events = tmp_path / "events.jsonl"

    def start_sensor() -> subprocess.Popen:
        sensor = pair.a.popen(sys.executable, "-m", "oisp", "record", "-o", str(events), "--no-local",
                              "--user", sensor_user.pw_name,
                              stderr=subprocess.PIPE, text=True, env=env)
        processes.append(sensor)
        await_recording(sensor)
        return sensor

    def quic(host: str) -> dict:
        done = pair.a.python(str(HERE / "agents" / "quic_echo.py"),
                             *agent_args("connect", host=host, port=443, ca=ca, timeout=TIMEOUT), timeout=30)
        return json.loads(done.stdout)

    try:
        deadline = time.monotonic() + 15
        while not quic(ai)["ok"]:  # the servers are up, and QUIC works without oisp
            assert time.monotonic() < deadline, "the QUIC servers did not start"
            time.sleep(0.2)
        assert quic(other)["ok"]
        yield {"ai": ai, "other": other, "quic": quic, "start_sensor": start_sensor, "events": events}
    finally:
        stop_all(processes)
        pair.delete()
        import shutil

        shutil.rmtree(hosts_dir, ignore_errors=True)


def refused_events(lab) -> list[dict]:
    path = lab["events"]
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in events if e["event_type"] == "network.connect" and e["data"].get("protocol") == "udp"]


def test_quic_to_an_ai_address_is_refused_at_once_and_reported(lab):
    sensor = lab["start_sensor"]()
    refused = lab["quic"](lab["ai"])
    # far from the 4 s timeout
    assert not refused["ok"], refused
    assert refused["seconds"] < 0.5, refused
    assert refused["error"].startswith("ConnectionError"), refused  # aioquic's end on a Version Negotiation
    assert lab["quic"](lab["other"])["ok"]  # QUIC elsewhere is untouched
    deadline = time.monotonic() + 5
    while not refused_events(lab):
        assert time.monotonic() < deadline, "no network.connect for the refused QUIC"
        time.sleep(0.1)
    [event] = refused_events(lab)
    assert event["data"]["dest"] == {"ip": lab["ai"], "port": 443}
    assert event["data"]["success"] is False
    assert event["confidence"]["completeness"] == "partial"
    assert any("quic_refused" in r for r in event["confidence"]["reasons"])
    sensor.send_signal(signal.SIGINT)
    assert sensor.wait(15) == 0
    assert lab["quic"](lab["ai"])["ok"]  # a clean stop leaves nothing blocking


def test_after_kill_9_quic_to_the_ai_address_works_again(lab):
    sensor = lab["start_sensor"]()
    assert not lab["quic"](lab["ai"])["ok"]
    sensor.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    sensor.wait()
    time.sleep(0.5)  # the guardian removes the filters (well under a second, see test_failopen)
    works = lab["quic"](lab["ai"])
    assert works["ok"], works
    assert time.monotonic() - killed < 3.0, works
