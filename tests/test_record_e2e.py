"""`oisp record` end to end on the real kernel path.

Two namespaces joined by a veth: `b` runs the fake AI provider on :443; in
`a`, the hosts file names it api.openai.com / api.anthropic.com /
example.test, `oisp record` runs as the sensor, and unmodified clients (the
openai and anthropic SDKs, curl) talk to https://api.openai.com as usual.
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

from tests.record_lab import HERE, read_events, run_client, sensor_of, start_client, stop_sensor

pytestmark = pytest.mark.privileged


def test_sdk_calls_are_recorded_with_the_clients_process(record_lab):
    clients = [start_client(record_lab, "openai_stream", "https://api.openai.com", 20)]
    clients[0].wait(60)
    clients.append(start_client(record_lab, "anthropic", "https://api.anthropic.com"))
    outputs = [c.communicate(timeout=60) for c in clients]
    assert [c.returncode for c in clients] == [0, 0], [err[-2000:] for _, err in outputs]
    assert json.loads(outputs[0][0])["text"] == "echo: hello there" + "".join(f"w{i} " for i in range(20))
    assert json.loads(outputs[1][0]) == {"text": "echo: hello there", "usage": 5}
    assert stop_sensor(record_lab) == 0  # SIGINT: clean stop, files flushed
    events = read_events(record_lab)
    requests = [e for e in events if e["event_type"] == "ai.request"]
    responses = [e for e in events if e["event_type"] == "ai.response"]
    # Exactly one request and one response per SDK call, from that client's process.
    assert [r["data"]["provider"]["name"] for r in requests] == ["openai", "anthropic"]
    assert [r["data"]["model"]["id"] for r in requests] == ["gpt-4o-mini", "claude-sonnet-4-5"]
    assert all(r["data"]["messages"][-1]["content"] == "hello there" for r in requests)
    assert len(responses) == 2
    assert responses[0]["data"]["usage"]["total_tokens"] == 18
    assert responses[1]["data"]["usage"]["completion_tokens"] == 5
    for client, request, response in zip(clients, requests, responses):
        for event in (request, response):
            assert event["process"]["pid"] == client.pid
            assert event["process"]["name"].startswith("python")
    assert "TESTKEY" not in record_lab["events"].read_text()


def test_a_node_client_is_recorded_too(record_lab):
    """Node's own fetch (undici), unmodified, trusting oisp's CA the Node way."""
    client = run_node(record_lab, 12)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err[-2000:]
    assert json.loads(out)["text"] == "echo: hello from node" + "".join(f"w{i} " for i in range(12))
    assert stop_sensor(record_lab) == 0
    events = read_events(record_lab)
    requests = [e for e in events if e["event_type"] == "ai.request"]
    responses = [e for e in events if e["event_type"] == "ai.response"]
    assert len(requests) == len(responses) == 1
    assert requests[0]["data"]["messages"][-1]["content"] == "hello from node"
    assert requests[0]["data"]["streaming"] is True
    assert responses[0]["data"]["choices"][0]["message"]["content"].startswith("echo: hello from node")
    for event in (requests[0], responses[0]):
        assert event["process"]["pid"] == client.pid
        assert event["process"]["name"] == "node"
    assert "TESTKEYnode" not in record_lab["events"].read_text()


def run_node(record_lab, chunks=0) -> subprocess.Popen:
    return subprocess.Popen(record_lab["pair"].a.cmd("node", str(HERE / "agents" / "node_client.mjs"),
                                              "https://api.openai.com", str(chunks)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NODE_EXTRA_CA_CERTS": record_lab["our_ca"]})


def test_process_names_choose_what_is_intercepted(record_lab):
    """`--process node`: node's connection is intercepted; python's goes straight to the
    server (it trusts only the upstream's CA here, so it would fail if intercepted)."""
    assert stop_sensor(record_lab) == 0
    record_lab["sensor"] = record_lab["start_sensor"]("--process", "node")
    python = run_client(record_lab, "openai_sync", ca=record_lab["upstream_ca"])
    assert python.returncode == 0, python.stderr[-2000:]
    node = run_node(record_lab)
    out, err = node.communicate(timeout=60)
    assert node.returncode == 0, err[-2000:]
    assert stop_sensor(record_lab) == 0
    requests = [e for e in read_events(record_lab) if e["event_type"] == "ai.request"]
    assert [(r["process"]["pid"], r["process"]["name"]) for r in requests] == [(node.pid, "node")]


def test_non_ai_https_passes_through_with_the_real_certificate(record_lab):
    done = record_lab["pair"].a.run("curl", "-sS", "--cacert", record_lab["upstream_ca"], "https://example.test/plain")
    assert done.stdout == "plain upstream reply\n"


def test_killing_the_sensor_mid_stream_fails_open(record_lab):
    stream = subprocess.Popen(record_lab["pair"].a.cmd(sys.executable, str(HERE / "agents" / "ai_clients.py"),
                                                "openai_stream", "https://api.openai.com", "3000"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "SSL_CERT_FILE": record_lab["both"]})
    deadline = time.monotonic() + 20
    while not any(e["event_type"] == "ai.request" for e in read_events(record_lab)):  # the stream is under way
        assert time.monotonic() < deadline, "the streaming request never reached the sensor"
        time.sleep(0.05)
    record_lab["sensor"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    record_lab["sensor"].wait()
    recovered = None
    while time.monotonic() - killed < 5:
        # A SYN sent in the instant before the filters go is lost and retried only after
        # TCP's 1 s initial timeout: short probes measure when traffic flows again.
        done = record_lab["pair"].a.run("curl", "-sS", "--connect-timeout", "0.2", "-m", "2", "--cacert", record_lab["both"],
                                 "https://api.openai.com/plain", check=False)
        if done.returncode == 0 and done.stdout == "plain upstream reply\n":
            recovered = time.monotonic() - killed
            break
        time.sleep(0.02)
    assert recovered is not None, recovered
    assert recovered < 1.0, recovered
    # The cut stream ends with an error at once: the guardian aborts the client's redirected
    # socket (its read timeout, 20 s in ai_clients.py, would otherwise be what ends it).
    out, err = stream.communicate(timeout=40)
    ended = time.monotonic() - killed
    assert stream.returncode != 0, (ended, err[-300:])
    assert ended < 5, (ended, err[-300:])


HOLD = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[1])):
    try:
        s = socket.create_connection(("api.openai.com", 443), timeout=3)
        # The start of a TLS record and no more: the proxy holds the connection and its
        # upstream socket while it waits for the ClientHello (15 s), and the server never
        # sees a byte to refuse. ("x" was passed through at once and the server closed it,
        # freeing the descriptors again: the proxy kept "serving again".)
        s.sendall(b"\x16\x03\x01")
        held.append(s)
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(60)
"""


def test_a_proxy_out_of_descriptors_stops_the_recording_and_traffic_flows(record_lab):
    """The sensor's hard open-file limit is low (so raising the soft one to it does not
    help); held connections exhaust it. The proxy cannot serve for its give-up time, so
    `oisp record` stops redirecting, says why and exits non-zero; connections then go
    straight to the server."""
    import resource

    assert stop_sensor(record_lab) == 0
    sensor = record_lab["start_sensor"](preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160)))
    record_lab["sensor"] = sensor
    hold = subprocess.Popen(record_lab["pair"].a.cmd(sys.executable, "-c", HOLD, "200"), stdout=subprocess.PIPE, text=True)
    try:
        assert int(hold.stdout.readline()) > 0
        try:
            returncode = sensor.wait(40)  # the proxy's give-up time is 10 s
        except subprocess.TimeoutExpired:
            sensor.kill()
            returncode = None
        said = sensor.stderr.read()
        assert returncode == 1, said[-2000:]
        assert "the proxy could not serve" in said, said[-2000:]
        assert "Too many open files" in said, said[-2000:]
        done = record_lab["pair"].a.run("curl", "-sS", "-m", "5", "--cacert", record_lab["upstream_ca"],
                                 "https://api.openai.com/plain", check=False)
        assert done.stdout == "plain upstream reply\n", done.stderr
    finally:
        hold.kill()
        hold.wait()


WAITING_CLIENT = """
import httpx, sys
body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "think_seconds": 60}
with httpx.Client(timeout=20) as client:
    with client.stream("POST", "https://api.openai.com/v1/chat/completions", json=body,
                       headers={"authorization": "Bearer sk-proj-TESTKEY0123456789abcdefghijklmnopqrstuv"}) as r:
        r.read()
"""


@pytest.mark.parametrize("kind", ["streaming", "waiting"])
def test_a_clean_stop_ends_a_request_in_flight_at_once(record_lab, kind):
    """SIGTERM while a stream is under way, or while the client waits for a slow answer
    (no packet flows then): the sensor drains (2 s), then cuts what is left, so the
    client sees an error within seconds, not its own read timeout (20 s here; 600 s in
    the SDKs). Stopping the redirector first left the waiting client stranded."""
    argv = ([str(HERE / "agents" / "ai_clients.py"), "openai_stream", "https://api.openai.com", "30000"]
            if kind == "streaming" else ["-c", WAITING_CLIENT])
    client = subprocess.Popen(record_lab["pair"].a.cmd(sys.executable, *argv), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "SSL_CERT_FILE": record_lab["both"]})
    deadline = time.monotonic() + 20
    while not any(e["event_type"] == "ai.request" for e in read_events(record_lab)):  # the request is through
        assert time.monotonic() < deadline, "the request never reached the sensor"
        time.sleep(0.05)
    record_lab["sensor"].send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    out, err = client.communicate(timeout=40)
    ended = time.monotonic() - stopped
    assert ended < 4.5, (ended, err[-300:])
    # both take far longer than the drain
    assert client.returncode != 0
    assert "Error" in err
    assert record_lab["sensor"].wait(10) == 0


KEPT_ALIVE = """
import httpx, json, time
body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "again"}]}
ports = []
with httpx.Client(timeout=10) as client:
    for pause in (0, 3):
        time.sleep(pause)  # idle, longer than the flow idle timeout
        r = client.post("https://api.openai.com/v1/chat/completions", json=body,
                        headers={"authorization": "Bearer sk-proj-TESTKEY0123456789abcdefghijklmnopqrstuv"})
        assert r.json()["choices"][0]["message"]["content"] == "echo: again"
        ports.append(r.extensions["network_stream"].get_extra_info("client_addr")[1])
print(json.dumps(ports))
"""


def test_a_kept_alive_connection_idle_past_the_flow_timeout_still_works(record_lab):
    """Flow idle timeout 1 s; the pooled connection is reused after 3 s: the proxy still
    holds it, so its flow stays and the second request is recorded on it."""
    assert stop_sensor(record_lab) == 0
    record_lab["sensor"] = record_lab["start_sensor"]("--flow-idle-timeout", "1")
    done = subprocess.run(record_lab["pair"].a.cmd(sys.executable, "-c", KEPT_ALIVE), capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SSL_CERT_FILE": record_lab["our_ca"]})
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = json.loads(done.stdout)
    assert first == second  # one connection, kept alive
    assert stop_sensor(record_lab) == 0
    requests = [e for e in read_events(record_lab) if e["event_type"] == "ai.request"]
    assert [r["data"]["messages"][-1]["content"] for r in requests] == ["again", "again"]


def test_the_sensor_runs_as_the_user_without_privileges_and_writes_the_users_files(record_lab):
    """`oisp record --user NAME` (what sudo's SUDO_UID gives too): the redirector stays root,
    the sensor is the user's, with no capability, no supplementary group and no way to gain
    privilege, read from /proc; what it writes belongs to the user."""
    user = record_lab["user"]
    sensor = sensor_of(record_lab["sensor"])
    status = dict(line.split(":", 1) for line in Path(f"/proc/{sensor}/status").read_text().splitlines())
    assert status["Uid"].split() == [str(user.pw_uid)] * 4 and status["Gid"].split() == [str(user.pw_gid)] * 4
    assert status["Groups"].strip() == ""
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    record = dict(line.split(":", 1) for line in Path(f"/proc/{record_lab['sensor'].pid}/status").read_text().splitlines())
    assert record["Uid"].split()[1] == "0"  # the redirector: root
    done = run_client(record_lab, "openai_sync")
    assert done.returncode == 0, done.stderr[-2000:]
    assert stop_sensor(record_lab) == 0
    assert [e["data"]["model"]["id"] for e in read_events(record_lab) if e["event_type"] == "ai.request"] == ["gpt-4o-mini"]
    for path in (record_lab["events"], Path(record_lab["our_ca"]), Path(record_lab["our_ca"]).parent / "oisp-ca-key.pem"):
        assert path.stat().st_uid == user.pw_uid, path


@pytest.mark.parametrize("how", ["--single-process", "as root without SUDO_UID"])
def test_one_process_records_as_before(record_lab, how):
    """--single-process, and root with no user to run the sensor as (a root shell, CI):
    one process, no sensor child; the same banner and events; the latter says why."""
    assert stop_sensor(record_lab) == 0
    record = record_lab["sensor"] = record_lab["start_sensor"](*([how] if how.startswith("--") else []), user=False)
    import psutil

    assert not [c for c in psutil.Process(record.pid).children() if "sensor" in c.cmdline()]  # guardians only
    said = "".join(record.banner)
    assert ("note: running as one root process: there is no user to run the sensor as" in said) == (
        not how.startswith("--")), said
    done = run_client(record_lab, "anthropic", "https://api.anthropic.com")
    assert done.returncode == 0, done.stderr[-2000:]
    assert stop_sensor(record_lab) == 0
    requests = [e for e in read_events(record_lab) if e["event_type"] == "ai.request"]
    assert [r["data"]["provider"]["name"] for r in requests] == ["anthropic"]
    assert requests[0]["process"]["pid"] > 0
