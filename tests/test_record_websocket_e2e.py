"""`oisp record` end to end with WebSocket clients, on the real kernel path.

As in test_record_e2e.py: namespace `b` runs tests/fakews.py (wss on :443,
permessage-deflate as websockets' server negotiates it); in `a`, the hosts file
names it api.openai.com, `oisp record` runs as the sensor, and unmodified
clients (the openai SDK's responses.connect() and realtime.connect(),
google-genai's aio.live.connect(), a plain websockets client) talk to
wss://api.openai.com and wss://generativelanguage.googleapis.com.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from oisp.events import load_schema
from tests.fakeprovider import make_test_pki
from tests.netns import VethPair, agent_args, stop_all
from tests.record_lab import await_recording, read_events, stop_sensor

HERE = Path(__file__).parent

pytestmark = pytest.mark.privileged


@pytest.fixture
def lab(sensor_tmp, sensor_user):
    tmp_path = sensor_tmp  # the sensor's, as the user (see tests/record_lab.py)
    pair = VethPair.create()
    hosts_dir = Path("/etc/netns") / pair.a.name
    hosts_dir.mkdir(parents=True, exist_ok=True)
    (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{pair.b_ip4} api.openai.com generativelanguage.googleapis.com\n")
    upstream_ca, cert, key = make_test_pki(tmp_path)
    server = pair.b.popen(sys.executable, str(HERE / "fakews.py"), "--host", pair.b_ip4, "--port", "443",
                          "--cert", cert, "--key", key, stdout=subprocess.PIPE, text=True)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    processes = [server]
    try:
        assert server.stdout.readline().startswith("serving")
        sensor = pair.a.popen(sys.executable, "-m", "oisp", "record", "-o", str(tmp_path / "events.jsonl"),
                              "--upstream-ca", upstream_ca, "--user", sensor_user.pw_name, stderr=subprocess.PIPE, text=True,
                              env=env)
        processes.append(sensor)
        await_recording(sensor)
        yield {"pair": pair, "sensor": sensor, "our_ca": str(tmp_path / "data" / "oisp" / "oisp-ca.pem"),
               "events": tmp_path / "events.jsonl"}
    finally:
        stop_all(processes)
        pair.delete()
        shutil.rmtree(hosts_dir, ignore_errors=True)


def run_client(lab, name: str, base: str = "wss://api.openai.com") -> tuple[subprocess.Popen, object]:
    argv = [sys.executable, str(HERE / "agents" / "ws_clients.py"), *agent_args(name, base=base)]
    client = subprocess.Popen(lab["pair"].a.cmd(*argv),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "SSL_CERT_FILE": lab["our_ca"]})
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err[-2000:]
    return client, json.loads(out)


def settled_events(lab, count: int) -> list[dict]:
    """The sensor writes a session's flow when the connection ends: wait for it, then stop cleanly."""
    deadline = time.monotonic() + 10
    while sum(e["event_type"] == "network.flow" for e in read_events(lab)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stop_sensor(lab) == 0
    return read_events(lab)


def test_responses_websocket_mode_is_recorded_like_http(lab):
    client, got = run_client(lab, "openai_responses")
    assert got[1]["text"] == "echo: hello over a socket" + "".join(f" w{i}" for i in range(6))
    events = settled_events(lab, 1)
    for ev in events:
        jsonschema.validate(ev, load_schema(ev["event_type"]))
    requests = [e for e in events if e["event_type"] == "ai.request"]
    responses = [e for e in events if e["event_type"] == "ai.response"]
    assert len(requests) == len(responses) == 3  # the upgrade is none of them
    for event in requests + responses:
        assert event["process"]["pid"] == client.pid
        assert event["process"]["name"].startswith("python")
    assert requests[0]["data"]["parameters"] == {"generate": False}
    assert requests[1]["data"]["messages"][-1]["content"] == "hello over a socket"
    assert [r["data"]["provider_request_id"] for r in responses] == [g["id"] for g in got]
    assert [r["data"]["choices"][0]["message"]["content"] for r in responses] == [g["text"] for g in got]
    assert [[[c["id"], c["name"], c["arguments"]] for c in r["data"]["tool_calls"]] for r in responses] == [
        g["calls"] for g in got]
    assert [[r["data"]["usage"]["prompt_tokens"], r["data"]["usage"]["completion_tokens"]] for r in responses] == [
        g["usage"] for g in got]
    assert all(r["data"]["success"] for r in responses)
    flow = [e["data"] for e in events if e["event_type"] == "network.flow"]
    assert len(flow) == 1
    assert flow[0]["websocket"]["client"]["messages"] == 3
    assert flow[0]["websocket"]["extensions"][0].startswith("permessage-deflate")
    assert flow[0]["tls"]["sni"] == "api.openai.com"
    assert flow[0]["websocket"]["close_code"] == 1000
    assert "TESTKEYws" not in lab["events"].read_text()


def test_a_realtime_session_is_recorded_response_by_response(lab):
    client, got = run_client(lab, "openai_realtime")
    assert [g["text"] for g in got] == ["echo: first question and more", "echo: second question and more"]
    events = settled_events(lab, 1)
    requests = [e for e in events if e["event_type"] == "ai.request"]
    responses = [e for e in events if e["event_type"] == "ai.response"]
    assert len(requests) == len(responses) == 2
    for event in requests + responses:
        assert event["process"]["pid"] == client.pid
        jsonschema.validate(event, load_schema(event["event_type"]))
    assert [r["data"]["model"]["id"] for r in requests] == ["gpt-realtime"] * 2
    assert [m["content"] for m in requests[1]["data"]["messages"]] == [
        "answer briefly", "first question", got[0]["text"], "second question"]
    assert [r["data"]["provider_request_id"] for r in responses] == [g["id"] for g in got]
    assert [r["data"]["choices"][0]["message"]["content"] for r in responses] == [g["text"] for g in got]
    assert [[r["data"]["usage"]["prompt_tokens"], r["data"]["usage"]["completion_tokens"]] for r in responses] == [
        g["usage"] for g in got]
    assert "TESTKEYws" not in lab["events"].read_text()


def test_a_plain_websocket_is_relayed_and_recorded_as_a_session(lab):
    client, got = run_client(lab, "plain")
    assert got == {"echo": "ping me"}
    events = settled_events(lab, 1)
    assert not [e for e in events if e["event_type"].startswith("ai.")]
    flow = [e for e in events if e["event_type"] == "network.flow"]
    assert len(flow) == 1
    assert flow[0]["process"]["pid"] == client.pid
    ws = flow[0]["data"]["websocket"]
    assert ws["path"] == "/echo"
    assert ws["client"]["messages"] == ws["server"]["messages"] == 1


def test_gemini_live_is_recorded_turn_by_turn(lab):
    client, got = run_client(lab, "gemini_live", "wss://generativelanguage.googleapis.com")
    assert got[0]["text"] == "echo: hello live and more"
    assert got[1]["calls"] == [["fc_2", "get_weather", {"city": "Paris"}]]
    events = settled_events(lab, 1)
    for ev in events:
        jsonschema.validate(ev, load_schema(ev["event_type"]))
    requests = [e for e in events if e["event_type"] == "ai.request"]
    responses = [e for e in events if e["event_type"] == "ai.response"]
    assert len(requests) == len(responses) == 3
    for event in requests + responses:
        assert event["process"]["pid"] == client.pid
    first = requests[0]["data"]
    assert first["provider"]["name"] == "google"
    assert first["model"] == {"id": "gemini-live-test"}
    assert [(m["role"], m["content"]) for m in first["messages"]] == [("system", "be brief"), ("user", "hello live")]
    assert first["tools"] == [{"type": "function", "name": "get_weather", "description": "the weather"}]
    assert requests[2]["data"]["messages"][-1]["role"] == "tool"
    assert [r["data"]["choices"][0]["message"]["content"] for r in responses] == [g["text"] for g in got]
    assert [[[c["id"], c["name"], json.loads(c["arguments"])] for c in r["data"]["tool_calls"]]
            for r in responses] == [g["calls"] for g in got]
    assert [[r["data"]["usage"]["prompt_tokens"], r["data"]["usage"]["completion_tokens"]] for r in responses] == [
        g["usage"] for g in got]
    assert [r["data"]["finish_reason"] for r in responses] == ["stop", "tool_calls", "stop"]
    flow = [e["data"] for e in events if e["event_type"] == "network.flow"]
    assert len(flow) == 1
    assert flow[0]["websocket"]["server"]["binary_messages"] > 0
    assert "TESTKEYlive" not in lab["events"].read_text()
