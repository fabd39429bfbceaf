"""`oisp record --otlp` end to end: unmodified SDK clients in the lab of tests/record_lab.py,
the real sensor, and a real OTLP receiver (ddapm-test-agent) on the sensor namespace's
loopback. What the receiver holds is compared with the JSONL the same sensor wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.otlp_receiver import Receiver, attributes, executable
from tests.record_lab import HERE, read_events, stop_sensor

from oisp.sinks.otlp import semconv as sc
from oisp.sinks.otlp.mapping import timestamp_ns

pytestmark = pytest.mark.privileged
IPV4 = pytest.mark.parametrize("record_lab", [4], indirect=True, ids=["ipv4"])

SECRET = "sk-proj-PLANTEDb9Xq3TfL8mZk2RwV7nYc4Hs6Jd1Ua5Ge0Po"
PLANTED = "planted-prompt-5be1c0"
PLANTED_CLIENT = f"""
import json, openai
client = openai.OpenAI(api_key="sk-proj-TESTKEY0123456789abcdefghijklmnopqrstuv",
                       base_url="https://api.openai.com/v1", max_retries=0, timeout=20)
reply = client.chat.completions.create(model="gpt-4o-mini", temperature=0.25, max_tokens=50,
    messages=[{{"role": "user", "content": "{PLANTED} and my other key {SECRET}"}}])
print(json.dumps({{"text": reply.choices[0].message.content, "id": reply.id, "usage": reply.usage.total_tokens}}))
"""


def client(lab, *argv) -> subprocess.Popen:
    """`ip netns exec` execs the client, so the Popen pid is the client's own."""
    return subprocess.Popen(lab["pair"].a.cmd(sys.executable, *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SSL_CERT_FILE": lab["our_ca"]})


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out)


@pytest.fixture
def otlp_lab(record_lab):
    if executable() is None:
        pytest.skip("ddapm-test-agent is not installed (.ci/run installs it in /opt/oisp-otlp-receiver)")
    ns = record_lab["pair"].a

    def query(path: str):
        done = ns.run("curl", "-sS", "--fail", "-m", "10", receiver.http_url + path, check=True)
        return json.loads(done.stdout)

    receiver = Receiver(wrap=lambda argv: ns.cmd(*argv))
    receiver.start(query)
    assert stop_sensor(record_lab) == 0  # the lab's sensor has no --otlp
    record_lab["receiver"], record_lab["query"] = receiver, query
    lines: list[str] = []

    def start(*options: str) -> subprocess.Popen:
        env_before = dict(os.environ)
        os.environ.update({"OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
        try:
            sensor = record_lab["start_sensor"]("--otlp", receiver.http_url, *options)
        finally:
            os.environ.clear()
            os.environ.update(env_before)
        threading.Thread(target=lambda: lines.extend(sensor.stderr), daemon=True).start()
        record_lab["sensor"] = sensor
        return sensor

    record_lab["start_otlp"], record_lab["stderr"] = start, lines
    try:
        yield record_lab
    finally:
        receiver.stop()


def wait_for(predicate, timeout=30.0, what="it"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@IPV4
def test_sdk_calls_become_spans_logs_and_metrics_equal_to_the_jsonl(otlp_lab) -> None:
    lab, receiver = otlp_lab, otlp_lab["receiver"]
    lab["start_otlp"]("--otlp-content")
    stream = client(lab, str(HERE / "agents" / "ai_clients.py"), "openai_stream", "https://api.openai.com", "7")
    streamed = finish(stream)
    planted = client(lab, "-c", PLANTED_CLIENT)
    reply = finish(planted)
    anthropic = client(lab, str(HERE / "agents" / "ai_clients.py"), "anthropic", "https://api.anthropic.com")
    finish(anthropic)
    assert streamed["text"].startswith("echo: hello there")
    assert reply["text"].startswith("echo:")
    assert stop_sensor(lab) == 0
    events = read_events(lab)
    responses = [e for e in events if e["event_type"] == "ai.response"]
    requests = {e["data"]["request_id"]: e for e in events if e["event_type"] == "ai.request"}
    assert len(responses) == len(requests) == 3

    # Log records: the JSONL's events themselves, named by their type (batches may arrive in any order).
    logs = {r["event"]["event_id"]: r for r in receiver.logs()}
    assert {i: r["event"] for i, r in logs.items()} == {e["event_id"]: e for e in events}
    assert all(r["event_name"] == r["event"]["event_type"] for r in logs.values())
    assert sorted(r["body"] for r in logs.values()) == sorted(lab["events"].read_text().splitlines())  # byte for byte

    # One CLIENT span per exchange, attributes equal to the events (and to what the SDK client saw).
    spans = {s["attributes"]["oisp.request_id"]: s for s in receiver.spans()}
    assert len(spans) == 3
    pids = {"openai": [stream.pid, planted.pid], "anthropic": [anthropic.pid]}
    for response in responses:
        data = response["data"]
        request = requests[data["request_id"]]
        span = spans[data["request_id"]]
        a = span["attributes"]
        assert span["kind"] == "SPAN_KIND_CLIENT"
        assert span["name"] == f"chat {request['data']['model']['id']}"
        assert int(span["start_time_unix_nano"]) == timestamp_ns(request["ts"])
        assert int(span["end_time_unix_nano"]) == timestamp_ns(response["ts"])
        assert abs((int(span["end_time_unix_nano"]) - int(span["start_time_unix_nano"])) / 1e6 - data["latency_ms"]) <= 1
        assert a[sc.PROVIDER_NAME] == data["provider"]["name"]
        assert a[sc.USAGE_INPUT_TOKENS] == data["usage"]["prompt_tokens"]
        assert a[sc.USAGE_OUTPUT_TOKENS] == data["usage"]["completion_tokens"]
        assert a[sc.RESPONSE_FINISH_REASONS] == [c["finish_reason"] for c in data["choices"]]
        assert a[sc.SERVER_ADDRESS] == f"api.{data['provider']['name']}.com"
        assert a[sc.SERVER_PORT] == 443
        assert a[sc.PROCESS_PID] in pids[data["provider"]["name"]]
        assert a[sc.PROCESS_EXECUTABLE_NAME] == response["process"]["name"]
        assert a[sc.PROCESS_COMMAND_LINE] == response["process"]["cmdline"]
        assert a[sc.USER_NAME] == response["process"]["user"] == "root"
        assert span["resource"]["service.name"] == "oisp"
        if request["data"]["streaming"]:
            assert a[sc.RESPONSE_TIME_TO_FIRST_CHUNK] == data["time_to_first_token_ms"] / 1000
    planted_span = next(s for s in spans.values() if s["attributes"][sc.PROCESS_PID] == planted.pid)
    a = planted_span["attributes"]
    assert a[sc.RESPONSE_ID] == reply["id"]  # what the SDK client itself got
    assert a[sc.USAGE_INPUT_TOKENS] + a[sc.USAGE_OUTPUT_TOKENS] == reply["usage"]
    assert (a[sc.REQUEST_TEMPERATURE], a[sc.REQUEST_MAX_TOKENS]) == (0.25, 50)
    assert PLANTED in json.loads(a[sc.INPUT_MESSAGES])[0]["parts"][0]["content"]  # opted in
    (answer,) = [r["data"]["choices"][0]["message"]["content"] for r in responses if r["process"]["pid"] == planted.pid]
    assert json.loads(a[sc.OUTPUT_MESSAGES])[0]["parts"][0]["content"] == answer
    # the provider echoed the key; redacted before export
    assert SECRET in reply["text"]
    assert SECRET not in answer

    # Metrics: the token histograms' sums are the events' token counts.
    metrics = [m for m in receiver.metrics() if m["name"] == sc.TOKEN_USAGE[0]]
    points = [attributes(p["attributes"]) | {"sum": p["sum"]} for p in metrics[-1]["histogram"]["data_points"]]
    for kind, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        assert sum(p["sum"] for p in points if p[sc.TOKEN_TYPE] == kind) == sum(r["data"]["usage"][key] for r in responses)

    # The planted key: in nothing the receiver got, nor in the JSONL.
    assert SECRET not in receiver.raw()
    assert SECRET not in lab["events"].read_text()


@IPV4
def test_without_opt_in_no_content_leaves_the_machine(otlp_lab) -> None:
    lab, receiver = otlp_lab, otlp_lab["receiver"]
    lab["start_otlp"]()
    reply = finish(client(lab, "-c", PLANTED_CLIENT))
    assert stop_sensor(lab) == 0
    events = read_events(lab)
    raw = receiver.raw()
    assert PLANTED in lab["events"].read_text()  # the JSONL has the conversation …
    (answer,) = [e["data"]["choices"][0]["message"]["content"] for e in events if e["event_type"] == "ai.response"]
    # the fake provider echoes the prompt
    assert PLANTED in answer
    assert SECRET in reply["text"]
    # … OTLP does not
    assert PLANTED not in raw
    assert answer not in raw
    assert SECRET not in raw
    logs = receiver.logs()
    assert sorted(r["event"]["event_id"] for r in logs) == sorted(e["event_id"] for e in events)
    (span,) = receiver.spans()
    assert not {sc.INPUT_MESSAGES, sc.OUTPUT_MESSAGES, sc.SYSTEM_INSTRUCTIONS, sc.TOOL_DEFINITIONS} & set(span["attributes"])
    assert span["attributes"][sc.USAGE_INPUT_TOKENS] + span["attributes"][sc.USAGE_OUTPUT_TOKENS] == reply["usage"]


@IPV4
def test_the_receiver_stopped_mid_run_costs_only_what_came_meanwhile(otlp_lab) -> None:
    """Capture goes on while the receiver is away; what was exported then is counted lost
    and said at the end; export resumes when the receiver is back, and the cumulative
    token metrics it then gets still add up to every call."""
    lab, receiver = otlp_lab, otlp_lab["receiver"]
    lab["start_otlp"]()
    said = lab["stderr"]
    agent = str(HERE / "agents" / "ai_clients.py")
    first = client(lab, agent, "openai_sync", "https://api.openai.com")
    finish(first)
    wait_for(lambda: len(receiver.spans()) == 1, what="the first call's span")
    receiver.stop()
    second = client(lab, agent, "openai_sync", "https://api.openai.com")
    assert finish(second)["text"] == "echo: hello there"  # capture goes on
    wait_for(lambda: any("export of logs" in line and "failing" in line for line in said),
             what="the sensor to say export is failing")
    time.sleep(3)  # a batch still being retried (1 s) or scheduled (1 s) fails too before the receiver is back
    receiver.start(lab["query"])
    third = client(lab, agent, "openai_sync", "https://api.openai.com")
    finish(third)
    wait_for(lambda: len(receiver.spans()) == 1, what="export to resume")
    wait_for(lambda: any("export of logs" in line and "resumed" in line for line in said),
             what="the sensor to say export resumed")
    assert stop_sensor(lab) == 0
    events = read_events(lab)
    by_pid = {pid: [e for e in events if (e.get("process") or {}).get("pid") == pid]
              for pid in (first.pid, second.pid, third.pid)}
    assert all(len(v) >= 3 for v in by_pid.values())
    lost = [line for line in said if "sink otlp lost" in line]
    assert lost, said[-10:]
    assert f"lost {len(by_pid[second.pid])} events" in lost[0], said[-10:]
    (span,) = receiver.spans()
    assert span["attributes"][sc.PROCESS_PID] == third.pid
    assert {r["event"]["event_id"] for r in receiver.logs()} == {e["event_id"] for e in by_pid[third.pid]}
    usage = [m for m in receiver.metrics() if m["name"] == sc.TOKEN_USAGE[0]][-1]
    total = sum(p["sum"] for p in usage["histogram"]["data_points"])
    assert total == sum(e["data"]["usage"]["total_tokens"] for e in events if e["event_type"] == "ai.response")
