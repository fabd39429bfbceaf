"""`oisp record` and plaintext model servers, end to end on the real kernel path.

A fake local model server (tests/fakelocal.py: Ollama's native API and the
OpenAI-compatible one, plain HTTP/1.1 and h2c) listens on 11434 (Ollama's port),
8000 (vLLM's) and 9000 (no server's: `--plain 9000=llamacpp` names it), either
beside the client (loopback, one namespace) or across a veth pair (the LAN),
over IPv4 and IPv6. The clients are the real `ollama` package and the openai
SDK; what they assembled is what the events must say, with their pid.
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

from tests.netns import VethPair, _ip, agent_args, stop_all
from tests.record_lab import await_recording

HERE = Path(__file__).parent
# Documentation addresses (TEST-NET-3, 2001:db8::/32): in no local range, so "public".
PUBLIC = {"4": ("203.0.113.1", "203.0.113.2", "24"), "6": ("2001:db8:113::1", "2001:db8:113::2", "64")}

pytestmark = pytest.mark.privileged


@pytest.fixture(params=["loopback-4", "loopback-6", "lan-4", "lan-6"])
def lab(sensor_tmp, request, sensor_user):
    tmp_path = sensor_tmp  # the sensor's, as the user (see tests/record_lab.py)
    where, family = request.param.split("-")
    pair = VethPair.create()
    if where == "loopback":
        server_ns, server_ip = pair.a, "127.0.0.1" if family == "4" else "::1"
    else:
        server_ns, server_ip = pair.b, pair.b_ip4 if family == "4" else pair.b_ip6
    ifa = _veth_name(pair.a.name)
    ifb = _veth_name(pair.b.name)
    public_a, public_b, bits = PUBLIC[family]
    _ip("-n", pair.a.name, "addr", "add", f"{public_a}/{bits}", "dev", ifa, *(["nodad"] if family == "6" else []))
    _ip("-n", pair.b.name, "addr", "add", f"{public_b}/{bits}", "dev", ifb, *(["nodad"] if family == "6" else []))
    wire = tmp_path / "wire.jsonl"

    def serve(ns, host: str, *ports: str) -> subprocess.Popen:
        return ns.popen(sys.executable, str(HERE / "fakelocal.py"), "--host", host, "--log", str(wire),
                        *sum((["--port", p] for p in ports), []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    processes = [serve(server_ns, server_ip, "11434", "8000", "9000"), serve(pair.b, public_b, "11434", "7000")]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    events = tmp_path / "events.jsonl"

    def start_sensor(*options: str) -> subprocess.Popen:
        sensor = pair.a.popen(sys.executable, "-m", "oisp", "record", "-o", str(events), "--user", sensor_user.pw_name, *options,
                              stderr=subprocess.PIPE, text=True, env=env)
        processes.append(sensor)
        await_recording(sensor)
        return sensor

    try:
        _wait_listening(pair.a, server_ip, 11434)
        _wait_listening(pair.a, public_b, 11434)
        named = f"[{public_b}]" if family == "6" else public_b
        sensor = start_sensor("--plain", "9000=llamacpp", "--plain", f"{named}:7000=vllm")
        wire.unlink(missing_ok=True)  # the start-up probes' replies
        yield {"pair": pair, "ip": server_ip, "public": public_b, "wire": wire, "family": family, "where": where,
               "sensor": sensor,
               "events": events, "start_sensor": start_sensor}
    finally:
        stop_all(processes)
        pair.delete()


def _veth_name(namespace: str) -> str:
    out = subprocess.run(["ip", "-n", namespace, "-o", "link", "show", "type", "veth"], capture_output=True,
                         text=True, check=True).stdout
    return out.split(":")[1].strip().split("@")[0]


def _wait_listening(ns, host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://[{host}]:{port}/api/version" if ":" in host else f"http://{host}:{port}/api/version"
    while ns.run("curl", "-sf", "-m", "1", url, check=False).returncode != 0:
        assert time.monotonic() < deadline, "the fake local server did not start"
        time.sleep(0.1)


def run_clients(lab, scenario: str, port: int, n: int = 1, host: str | None = None) -> dict:
    done = lab["pair"].a.python(str(HERE / "agents" / "local_clients.py"),
                                *agent_args(scenario, host=host or lab["ip"], port=port, count=n), timeout=90)
    return json.loads(done.stdout)


def read_events(lab) -> list[dict]:
    path = lab["events"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def responses_of(lab, pid: int, count: int, timeout: float = 10.0) -> list[dict]:
    """The ai.response events of `pid`, once there are `count` (the sink writes them a moment after)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in read_events(lab) if e["event_type"] == "ai.response" and e["process"]["pid"] == pid]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def response_text(event: dict) -> str | None:
    choices = event["data"].get("choices") or []
    return choices[0]["message"]["content"] if choices else None


def check_recorded(lab, ran: dict, provider: str, port: int) -> list[dict]:
    """Every call the client made has its ai.request and ai.response, equal to what it assembled."""
    results, pid = ran["results"], ran["pid"]
    responses = responses_of(lab, pid, len(results))
    events = [e for e in read_events(lab) if e.get("process", {}).get("pid") == pid]
    requests = [e for e in events if e["event_type"] == "ai.request"]
    assert len(responses) == len(results) == len(requests), [e["event_type"] for e in events]
    by_id = {e["data"]["request_id"]: e for e in requests}
    # Matched by content, not order: a client with a pool of connections may have its
    # exchanges recorded in another order than it made them.
    unmatched = list(responses)
    for result in results:
        response = next((r for r in unmatched if by_id[r["data"]["request_id"]]["data"]["model"]["id"] == result["model"]
                         and response_text(r) == result["text"]), None)
        assert response is not None, (result, [response_text(r) for r in unmatched])
        unmatched.remove(response)
        request = by_id[response["data"]["request_id"]]
        assert request["data"]["provider"]["id"] == provider
        assert request["data"]["model"]["id"] == result["model"]
        assert request["data"]["provider"]["endpoint"].startswith("http://")
        assert response["confidence"]["completeness"] == "full"
        assert "plaintext_capture" in response["confidence"]["reasons"]
        if result["text"] is not None:
            assert response_text(response) == result["text"]
        usage = response["data"]["usage"]
        assert usage["prompt_tokens"] == result["prompt_tokens"]
        if result["completion_tokens"] is not None:
            assert usage["completion_tokens"] == result["completion_tokens"]
    for connect in (e for e in events if e["event_type"] == "network.connect"):
        assert connect["data"]["dest"] == {"ip": lab["ip"], "port": port}
    return events


def test_the_ollama_client_is_recorded_streamed_and_not_on_one_kept_alive_connection(lab):
    ran = run_clients(lab, "ollama", 11434, n=3)
    events = check_recorded(lab, ran, "ollama", 11434)
    kinds = [r["kind"] for r in ran["results"]]
    assert kinds.count("chat_stream") == kinds.count("generate") == 3
    # Twelve exchanges, streamed (NDJSON, chunked) and not (gzip'd), on one connection.
    assert [e["event_type"] for e in events].count("network.connect") == 1
    streamed = [e for e in events if e["event_type"] == "ai.request" and e["data"]["streaming"]]
    assert len(streamed) == 6
    # On the wire: the six whole replies gzip'd, the six streams chunked (HTTP/1.1, no length).
    wire = [json.loads(line) for line in lab["wire"].read_text().splitlines()]
    assert sum(w["gzip"] for w in wire) == 6
    assert sum(w["streamed"] for w in wire) == 6
    assert {w["http_version"] for w in wire} == {"1.1"}


def test_the_openai_sdk_is_recorded_against_a_vllm_port(lab):
    ran = run_clients(lab, "openai", 8000, n=2)
    events = check_recorded(lab, ran, "vllm", 8000)
    types = {e["data"]["request_type"] for e in events if e["event_type"] == "ai.request"}
    assert types == {"chat", "completion", "embedding"}
    assert all(e["data"]["provider"]["name"] == "vllm" for e in events if e["event_type"] == "ai.request")


def test_h2c_on_a_port_named_with_plain(lab):
    ran = run_clients(lab, "h2c", 9000, n=3)
    events = check_recorded(lab, ran, "llamacpp", 9000)
    flows = [e for e in events if e["event_type"] == "network.flow"]
    assert flows, flows[:1]
    assert all(f["data"]["http"]["version"] == "HTTP/2" for f in flows), flows[:1]


def test_other_http_on_a_watched_port_passes_and_leaves_no_event(lab):
    host = f"[{lab['ip']}]" if ":" in lab["ip"] else lab["ip"]
    done = lab["pair"].a.run("curl", "-sS", "-m", "5", f"http://{host}:11434/api/version")
    assert done.stdout == '{"version":"0.12.0"}'
    time.sleep(0.5)
    assert read_events(lab) == []


def test_a_public_address_is_taken_only_when_named(lab):
    public = lab["public"]
    # 11434 is watched for local addresses only: the same server on a public address is not taken.
    host = f"[{public}]" if ":" in public else public
    done = lab["pair"].a.run("curl", "-sS", "-m", "5", "-d", '{"model":"m","prompt":"x","stream":false}',
                             f"http://{host}:11434/api/generate")
    assert json.loads(done.stdout)["response"].startswith("echo: x")
    time.sleep(0.5)
    assert not [e for e in read_events(lab) if e["event_type"].startswith("ai.")]
    # --plain 203.0.113.2:7000=vllm names it: taken.
    ran = run_clients(lab, "openai", 7000, host=public)
    lab["ip"] = public
    check_recorded(lab, ran, "vllm", 7000)


def test_a_burst_of_concurrent_streams_is_recorded_whole(lab):
    ran = run_clients(lab, "burst", 8000, n=40)
    responses = responses_of(lab, ran["pid"], 40)
    assert sorted(response_text(e) for e in responses) == sorted(r["text"] for r in ran["results"])
    assert all(e["confidence"]["completeness"] == "full" for e in responses)


def test_killing_the_sensor_mid_stream_fails_open(lab):
    stream = lab["pair"].a.popen(sys.executable, str(HERE / "agents" / "local_clients.py"),
                                 *agent_args("stream", host=lab["ip"], port=8000, count=1000), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not any(e["event_type"] == "ai.request" for e in read_events(lab)):  # the stream is under way
        assert time.monotonic() < deadline, "the streaming request never reached the sensor"
        time.sleep(0.05)
    lab["sensor"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    lab["sensor"].wait()
    recovered = None
    while time.monotonic() - killed < 5:
        host = f"[{lab['ip']}]" if ":" in lab["ip"] else lab["ip"]
        done = lab["pair"].a.run("curl", "-sS", "--connect-timeout", "0.2", "-m", "2",
                                 f"http://{host}:8000/api/version", check=False)
        if done.returncode == 0 and done.stdout == '{"version":"0.12.0"}':
            recovered = time.monotonic() - killed
            break
        time.sleep(0.02)
    assert recovered is not None, recovered
    assert recovered < 1.0, recovered
    out, err = stream.communicate(timeout=40)
    ended = time.monotonic() - killed
    if stream.returncode == 0:  # it completed: then it got the whole reply
        assert len(json.loads(out)["results"][0]["text"].split()) == 1000 + 1
    assert ended < 15, (ended, err[-300:])
