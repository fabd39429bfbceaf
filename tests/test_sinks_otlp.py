"""The OTLP sink against a real OTLP receiver nobody here wrote (ddapm-test-agent, started
on loopback ports by the tests): the per-provider fixtures, decoded by the real recorder,
go in; what the receiver got must equal the events (figures by hand where the mapping
decides something), follow the pinned GenAI conventions, leave content out unless asked,
and survive the receiver going away and coming back. Most tests drive the exporter
in-process (to see its counts and notices at once); the last ones the sink the sensor
uses, which runs the same exporter in a process of its own."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import load_cases, run_case  # noqa: E402

from oisp.sinks.otlp import OtlpExporter, OtlpSink, config, resolve  # noqa: E402
from oisp.sinks.otlp import semconv as sc  # noqa: E402
from oisp.sinks.otlp.mapping import timestamp_ns  # noqa: E402
from tests.otlp_receiver import Receiver, executable  # noqa: E402

CASES = {c.name: c for c in load_cases()}
SECRET = "sk-proj-PLANTEDb9Xq3TfL8mZk2RwV7nYc4Hs6Jd1Ua5Ge0Po"
PLANTED = "the-planted-prompt-7f3c91"


@pytest.fixture
def receiver():
    if executable() is None:
        pytest.skip("ddapm-test-agent is not installed (.ci/run installs it in /opt/oisp-otlp-receiver)")
    r = Receiver().start()
    yield r
    r.stop()


def recorded(names=None) -> list[dict]:
    events = []
    for case in CASES.values():
        if names is None or case.name in names:
            events += run_case(case)[0]
    return events


def planted_case_events() -> list[dict]:
    """openai_chat_json with a prompt that carries a key and a marker, through the real recorder."""
    case = copy.deepcopy(CASES["openai_chat_json"])
    case.request["messages"][-1]["content"] = f"{PLANTED} my key is {SECRET}"
    return run_case(case)[0]


def export(receiver, events, *, content=False, protocol=None) -> OtlpExporter:
    notes: list[str] = []
    url = receiver.grpc_url if protocol == config.GRPC else receiver.http_url
    sink = OtlpExporter(resolve(url, protocol), content=content, metric_interval_ms=200, notify=notes.append)
    for event in events:
        sink.emit(event)
    sink.close(timeout=10)
    sink.notes = notes
    return sink


def wait_for(predicate, timeout=20.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def by_request(spans) -> dict[str, dict]:
    return {s["attributes"]["oisp.request_id"]: s for s in spans}


# --- spans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [config.HTTP, config.GRPC])
def test_each_exchange_is_one_client_span_equal_to_its_events(receiver, protocol) -> None:
    events = recorded()
    sink = export(receiver, events, protocol=protocol)
    responses = [e for e in events if e["event_type"] == "ai.response"]
    requests = {e["data"]["request_id"]: e for e in events if e["event_type"] == "ai.request"}
    spans = by_request(receiver.spans())
    assert len(spans) == len(responses) == len(CASES)
    assert sink.stats.spans_exported == len(responses)
    assert sink.stats.spans_lost == 0
    for response in responses:
        data, request = response["data"], requests[response["data"]["request_id"]]
        span = spans[data["request_id"]]
        a = span["attributes"]
        model = request["data"]["model"]["id"]
        assert span["name"] == f"{a[sc.OPERATION_NAME]} {model}"
        assert a[sc.REQUEST_MODEL] == model
        assert span["kind"] == "SPAN_KIND_CLIENT"
        # Starts when the request was sent, ends at the response's last byte: the events' times.
        assert int(span["start_time_unix_nano"]) == timestamp_ns(request["ts"])
        assert int(span["end_time_unix_nano"]) == timestamp_ns(response["ts"])
        usage = data.get("usage") or {}
        assert a.get(sc.USAGE_INPUT_TOKENS) == usage.get("prompt_tokens")
        assert a.get(sc.USAGE_OUTPUT_TOKENS) == usage.get("completion_tokens")
        assert a.get(sc.USAGE_CACHE_READ_INPUT_TOKENS) == usage.get("cached_tokens")
        assert a.get(sc.USAGE_REASONING_OUTPUT_TOKENS) == usage.get("reasoning_tokens")
        assert a.get("oisp.cost.usd") == (usage.get("cost") or {}).get("usd")
        assert a.get(sc.RESPONSE_ID) == data.get("provider_request_id")
        assert a.get(sc.RESPONSE_MODEL) == (data.get("model") or {}).get("id")
        assert a.get(sc.RESPONSE_TIME_TO_FIRST_CHUNK) == (
            data["time_to_first_token_ms"] / 1000 if "time_to_first_token_ms" in data else None)
        assert a[sc.REQUEST_STREAM] is request["data"]["streaming"]
        assert span["schema_url"] == sc.SCHEMA_URL
        assert span["resource"]["service.name"] == "oisp"
        assert span["resource"]["host.name"]
        if data["success"]:
            assert sc.ERROR_TYPE not in a
            assert span["status"].get("code") in (None, "STATUS_CODE_UNSET")
        else:
            assert span["status"]["code"] == "STATUS_CODE_ERROR"
    assert sink.stats.lost == 0
    assert sink.stats.emitted == len(events)


def test_the_mapping_decisions_by_hand(receiver) -> None:
    """Figures read off the fixtures' wire bodies, not off the events."""
    export(receiver, recorded(["anthropic_cache_stream", "openai_error_429", "gemini_stream_sse",
                               "openai_chat_json", "deepseek_reasoner_stream"]))
    spans = {s["attributes"][sc.PROVIDER_NAME] + ":" + s["name"]: s["attributes"] for s in receiver.spans()}
    anthropic = spans["anthropic:chat claude-sonnet-4-5"]
    # message_start: input 12 + cache read 4096 + cache creation 2048; 87 output tokens.
    assert (anthropic[sc.USAGE_INPUT_TOKENS], anthropic[sc.USAGE_CACHE_READ_INPUT_TOKENS],
            anthropic[sc.USAGE_CACHE_CREATION_INPUT_TOKENS], anthropic[sc.USAGE_OUTPUT_TOKENS]) == (6156, 4096, 2048, 87)
    assert anthropic[sc.RESPONSE_FINISH_REASONS] == ["stop"]  # end_turn
    assert (anthropic[sc.SERVER_ADDRESS], anthropic[sc.SERVER_PORT]) == ("api.anthropic.com", 443)
    assert anthropic[sc.REQUEST_MAX_TOKENS] == 1024
    assert anthropic["oisp.auth.key_prefix"] == "sk-ant-"
    # A 429: error.type is the provider's error code, the span's status ERROR.
    (error,) = [a for key, a in spans.items() if key.startswith("openai:") and sc.ERROR_TYPE in a]
    assert error[sc.ERROR_TYPE] == "rate_limit_exceeded"
    assert error["http.response.status_code"] == 429
    (gemini,) = [a for key, a in spans.items() if key.startswith("gcp.gemini:")]
    assert gemini[sc.OPERATION_NAME] == "generate_content"
    (deepseek,) = [a for key, a in spans.items() if key.startswith("deepseek:")]
    assert deepseek[sc.USAGE_REASONING_OUTPUT_TOKENS] > 0


def test_the_pinned_names_are_the_semantic_conventions_packages(receiver) -> None:
    """Our names against the OpenTelemetry Python semantic-conventions package (an independent list)."""
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as g
    from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as m

    ours = {v for k, v in vars(sc).items() if isinstance(v, str) and v.startswith("gen_ai.")}
    theirs = {v for k, v in vars(g).items() if k.startswith("GEN_AI_") and isinstance(v, str)}
    assert ours <= theirs, ours - theirs
    assert {sc.TOKEN_USAGE[0], sc.OPERATION_DURATION[0], sc.TIME_TO_FIRST_CHUNK[0]} == {
        m.GEN_AI_CLIENT_TOKEN_USAGE, m.GEN_AI_CLIENT_OPERATION_DURATION, m.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK}


# --- log records ----------------------------------------------------------------------------


def test_log_records_are_the_events_themselves_with_content_when_opted_in(receiver) -> None:
    events = recorded()
    export(receiver, events, content=True)
    logs = receiver.logs()
    assert [r["event_name"] for r in logs] == [e["event_type"] for e in events]
    assert [r["event"] for r in logs] == events
    assert [int(r["time_unix_nano"]) for r in logs] == [timestamp_ns(e["ts"]) for e in events]
    # ai.request/ai.response records belong to their exchange's span.
    spans = {s["span_id"]: s for s in receiver.spans()}
    for record in logs:
        if record["event_name"] in ("ai.request", "ai.response"):
            assert spans[record["span_id"]]["attributes"]["oisp.request_id"] == record["event"]["data"]["request_id"]


def test_without_opt_in_content_is_only_its_length_and_the_rest_equal(receiver) -> None:
    events = planted_case_events()
    export(receiver, events)
    raw = receiver.raw()
    (response,) = [e for e in events if e["event_type"] == "ai.response"]
    completion = response["data"]["choices"][0]["message"]["content"]
    # the model's answer
    assert completion == "Four."
    assert '"Four."' not in raw
    assert PLANTED not in raw
    assert SECRET not in raw
    assert "PLANTED" not in raw
    bodies = [r["event"] for r in receiver.logs()]
    (request,) = [b for b in bodies if b["event_type"] == "ai.request"]
    (original,) = [e for e in events if e["event_type"] == "ai.request"]
    for shown, msg in zip(request["data"]["messages"], original["data"]["messages"]):
        assert shown["content"]["$redacted"]["original_length"] == len(msg["content"])
        assert {k: v for k, v in shown.items() if k != "content"} == {k: v for k, v in msg.items() if k != "content"}
    assert {k: v for k, v in request["data"].items() if k != "messages"} == {
        k: v for k, v in original["data"].items() if k != "messages"}
    (span,) = receiver.spans()
    assert not {sc.INPUT_MESSAGES, sc.OUTPUT_MESSAGES, sc.SYSTEM_INSTRUCTIONS, sc.TOOL_DEFINITIONS} & set(span["attributes"])


def test_opted_in_content_follows_the_message_schemas_and_keeps_no_secret(receiver) -> None:
    events = planted_case_events()
    export(receiver, events, content=True)
    raw = receiver.raw()
    assert PLANTED in raw
    assert SECRET not in raw
    (span,) = receiver.spans()
    messages = json.loads(span["attributes"][sc.INPUT_MESSAGES])
    (request,) = [e for e in events if e["event_type"] == "ai.request"]
    assert messages[-1]["role"] == "user"
    assert messages[-1]["parts"] == [{"type": "text", "content": request["data"]["messages"][-1]["content"]}]
    assert PLANTED in messages[-1]["parts"][0]["content"]
    output = json.loads(span["attributes"][sc.OUTPUT_MESSAGES])
    (response,) = [e for e in events if e["event_type"] == "ai.response"]
    assert output == [{"role": "assistant", "finish_reason": response["data"]["finish_reason"],
                       "parts": [{"type": "text", "content": response["data"]["choices"][0]["message"]["content"]}]}]


# --- metrics --------------------------------------------------------------------------------


def _last(metrics, name):
    found = [m for m in metrics if m["name"] == name]
    assert found, f"no {name} in {sorted({m['name'] for m in metrics})}"
    return found[-1]


def _points(metric):
    from tests.otlp_receiver import attributes

    kind = "histogram" if "histogram" in metric else "sum"
    return [{**p, "attributes": attributes(p.get("attributes"))} for p in metric[kind]["data_points"]]


def test_metrics_sum_to_the_events_token_counts(receiver) -> None:
    events = recorded()
    export(receiver, events)
    responses = [e["data"] for e in events if e["event_type"] == "ai.response"]
    metrics = receiver.metrics()
    usage = _points(_last(metrics, sc.TOKEN_USAGE[0]))
    for kind, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        expected = sum((r.get("usage") or {}).get(key, 0) for r in responses)
        assert sum(float(p["sum"]) for p in usage if p["attributes"][sc.TOKEN_TYPE] == kind) == expected
    token_metric = _last(metrics, sc.TOKEN_USAGE[0])
    assert token_metric["unit"] == "{token}"
    duration = _points(_last(metrics, sc.OPERATION_DURATION[0]))
    assert sum(int(p["count"]) for p in duration) == len(responses)
    assert sum(float(p["sum"]) for p in duration) == pytest.approx(sum(r["latency_ms"] for r in responses) / 1000)
    assert [p["attributes"][sc.ERROR_TYPE] for p in duration if sc.ERROR_TYPE in p["attributes"]] == ["rate_limit_exceeded"]
    ttfc = _points(_last(metrics, sc.TIME_TO_FIRST_CHUNK[0]))
    assert sum(int(p["count"]) for p in ttfc) == sum("time_to_first_token_ms" in r for r in responses)
    cost = _points(_last(metrics, "oisp.gen_ai.client.cost"))
    assert sum(p["as_double"] for p in cost) == pytest.approx(
        sum(r["usage"]["cost"]["usd"] for r in responses if "cost" in (r.get("usage") or {})))


def test_sensor_health_becomes_oisp_metrics(receiver) -> None:
    sink = OtlpExporter(resolve(receiver.http_url, None), metric_interval_ms=200, notify=lambda _: None)
    sink.set_health({"flows": {"intercepted": 7, "passed_through": 3}, "drops": 2,
                     "sinks": {"jsonl": {"emitted": 40, "lost": 1, "errors": 0}}})
    sink.close(timeout=10)
    metrics = receiver.metrics()
    flows = {p["attributes"]["oisp.flow.outcome"]: int(p["as_int"]) for p in _points(_last(metrics, "oisp.flows"))}
    assert flows == {"intercepted": 7, "passed_through": 3}
    assert [int(p["as_int"]) for p in _points(_last(metrics, "oisp.capture.dropped"))] == [2]
    sinks = {(p["attributes"]["oisp.sink.name"], p["attributes"]["oisp.sink.outcome"]): int(p["as_int"])
             for p in _points(_last(metrics, "oisp.sink.events"))}
    assert sinks[("jsonl", "emitted")] == 40
    assert sinks[("jsonl", "lost")] == 1
    assert ("otlp", "lost") in sinks


# --- losses ---------------------------------------------------------------------------------


def test_the_receiver_going_away_costs_what_was_sent_meanwhile_and_export_resumes(receiver, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # seconds: an export gives up within it
    notes: list[str] = []
    sink = OtlpExporter(resolve(receiver.http_url, None), metric_interval_ms=500, notify=notes.append)
    first, second, third = recorded(["openai_chat_json"]), recorded(["anthropic_json"]), recorded(["gemini_stream_sse"])
    for event in first:
        sink.emit(event)
    wait_for(lambda: sink.stats.emitted == len(first), what="the first events")
    receiver.stop()
    for event in second:
        sink.emit(event)
    wait_for(lambda: sink.stats.lost == len(second) and sink.stats.spans_lost == 1,
             what="the events and the span sent while the receiver was away to be lost")
    assert sink.stats.errors >= 2
    assert any("failing" in n for n in notes)
    receiver.start()  # same ports, a fresh receiver with nothing in it
    for event in third:
        sink.emit(event)
    wait_for(lambda: sink.stats.emitted == len(first) + len(third), what="export to resume")
    assert any("resumed" in n for n in notes)
    sink.close(timeout=10)
    assert sink.stats.lost == len(second)
    assert sink.stats.spans_exported == 2
    from oisp.sinks.otlp.mapping import without_content

    assert [r["event"] for r in receiver.logs()] == [without_content(e) for e in third]


def test_an_unreachable_endpoint_at_start_is_a_warning_and_close_is_bounded(monkeypatch) -> None:
    from tests.otlp_receiver import free_ports

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")  # longer than close may wait
    notes: list[str] = []
    (port,) = free_ports(1)
    sink = OtlpExporter(resolve(f"http://127.0.0.1:{port}", None), notify=notes.append)
    events = recorded(["openai_chat_json"])
    for event in events:
        sink.emit(event)
    wait_for(lambda: notes, what="the warning")
    assert "not reachable" in notes[0]
    assert f"127.0.0.1:{port}" in notes[0]
    started = time.monotonic()
    sink.close(timeout=2)
    assert time.monotonic() - started < 5  # the bound, not a speed: 30 s of retries were cut
    assert sink.stats.lost == len(events)
    assert sink.stats.emitted == 0
    assert sink.stats.spans_lost == 1


def test_past_the_sdk_queue_events_are_dropped_here_and_counted(receiver, monkeypatch) -> None:
    """The worker lets out no more than the SDK's queue holds (the SDK would drop the rest
    silently): with a slow export and a queue of 4, the rest is dropped and counted here,
    and every event is either delivered or counted lost."""
    import oisp.sinks.otlp.exporter as sink_module
    from oisp.sinks.otlp.config import exporters

    class Slow:
        def __init__(self, inner):
            self.inner = inner

        def export(self, batch):
            time.sleep(0.2)
            return self.inner.export(batch)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(sink_module, "LOG_QUEUE", 4)
    monkeypatch.setattr(sink_module, "BATCH", 4)
    spans, logs, metrics = exporters(resolve(receiver.http_url, None))
    sink = OtlpExporter(resolve(receiver.http_url, None), exporters=(spans, Slow(logs), metrics), notify=lambda _: None)
    events = recorded()
    for event in events:
        sink.emit(event)
    # Counted while running, not only made up at close (which counts whatever never came back).
    wait_for(lambda: sink.stats.emitted + sink.stats.lost == len(events), what="every event to be accounted for")
    assert sink.stats.lost > 0 and sink.stats.last_error == sink_module.SDK_FULL.format("log record")
    sink.close(timeout=10)
    assert sink.stats.emitted + sink.stats.lost == len(events)
    assert len(receiver.logs()) == sink.stats.emitted


# --- configuration --------------------------------------------------------------------------


def test_the_standard_variables_choose_endpoint_protocol_and_headers(receiver, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fleet-sensor")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci")
    target = resolve(None, None)
    assert target.protocol == config.GRPC
    assert target.base is None
    sink = OtlpExporter(target, metric_interval_ms=200, notify=lambda _: None)
    for event in recorded(["openai_chat_json"]):
        sink.emit(event)
    sink.close(timeout=10)
    (span,) = receiver.spans()
    assert span["resource"]["service.name"] == "fleet-sensor"
    assert span["resource"]["deployment.environment.name"] == "ci"


def test_bad_settings_are_refused_with_what_to_do() -> None:
    with pytest.raises(config.OtlpConfigError, match="not supported"):
        resolve(None, "http/json")
    with pytest.raises(config.OtlpConfigError, match="http:// or https://"):
        resolve("ftp://collector:4318", None)
    assert resolve("https://collector.example:4318/", "http/protobuf").shown == "https://collector.example:4318"


# --- the sink the sensor uses: the exporter in its own process ------------------------------


@pytest.mark.parametrize("protocol", [config.HTTP, config.GRPC])
def test_the_sink_exports_through_its_own_process(receiver, protocol) -> None:
    events = recorded()
    url = receiver.grpc_url if protocol == config.GRPC else receiver.http_url
    sink = OtlpSink(resolve(url, protocol), content=True, metric_interval_ms=200)
    child = sink._proc
    for event in events:
        sink.emit(event)
    sink.close(timeout=10)
    assert child.returncode == 0
    assert (sink.stats.emitted, sink.stats.lost, sink.stats.spans_exported) == (len(events), 0, len(CASES))
    logs = receiver.logs()
    assert sorted(r["body"] for r in logs) == sorted(json.dumps(e, ensure_ascii=False, separators=(",", ":"))
                                                     for e in events)
    assert len(receiver.spans()) == len(CASES)


def test_an_exporter_process_that_dies_costs_the_events_after_it_counted(receiver) -> None:
    events = recorded(["openai_chat_json"])
    sink = OtlpSink(resolve(receiver.http_url, None))
    for event in events:
        sink.emit(event)
    wait_for(lambda: sink.stats.emitted == len(events), what="the first events")
    sink._proc.kill()
    sink._proc.wait()
    for _ in range(3):
        for event in events:
            sink.emit(event)
        time.sleep(0.2)  # the writer meets the closed pipe
    sink.close(timeout=5)
    assert sink.stats.emitted == len(events)
    assert sink.stats.lost == 3 * len(events)
    assert "exporter process ended" in sink.stats.last_error


def test_oisp_replay_exports_a_recording(receiver, tmp_path) -> None:
    """The command line: `oisp replay FILE --otlp URL` sends a JSONL recording's events."""
    import subprocess

    events = recorded()
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    done = subprocess.run([sys.executable, "-m", "oisp", "replay", str(path), "--otlp", receiver.http_url, "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"replayed {len(events)} events; 0 unreadable lines; 0 lost by sinks" in done.stderr
    assert sorted(r["event"]["event_id"] for r in receiver.logs()) == sorted(e["event_id"] for e in events)
    assert len(receiver.spans()) == len(CASES)


ORPHAN = """
import sys, time
from oisp.sinks.otlp import OtlpSink, resolve
sink = OtlpSink(resolve(sys.argv[1], None))
sink.emit({"event_type": "network.connect", "ts": "2026-01-01T00:00:00.000000Z", "event_id": "E1", "data": {}})
print(sink._proc.pid, flush=True)
time.sleep(120)
"""


def test_a_killed_sensor_leaves_no_exporter_process_behind(receiver) -> None:
    """kill -9 of the sensor: its exporter sees the end of its input, exports what it
    holds (within the close timeout) and exits."""
    import os
    import signal
    import subprocess

    sensor = subprocess.Popen([sys.executable, "-c", ORPHAN, receiver.http_url], stdout=subprocess.PIPE, text=True)
    child = int(sensor.stdout.readline())
    wait_for(lambda: len(receiver.logs()) == 1, what="the event to be exported")
    sensor.send_signal(signal.SIGKILL)
    sensor.wait()

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{child}/stat") as f:  # a zombie until init reaps it: gone too
            return f.read().split(") ")[1][0] == "Z"

    wait_for(gone, timeout=15, what="the exporter process to end")


def test_odd_events_cost_themselves_only(receiver) -> None:
    """Events a replayed file may hold (no ts, a bad ts, no data): each is counted lost, and
    the ones after them still go."""
    good = recorded(["openai_chat_json"])
    odd = [{"event_type": "ai.request"}, {"event_type": "network.flow", "ts": "yesterday"},
           {"event_type": "ai.response", "ts": "2026-01-01T00:00:00.000000Z", "data": None}]
    sink = OtlpExporter(resolve(receiver.http_url, None), notify=lambda _: None)
    for event in odd * 3 + good:
        sink.emit(event)
    sink.close(timeout=10)
    assert sink.stats.emitted == len(good) + 3  # the data-less response still is an event, logged
    assert sink.stats.lost == 6
    assert sink.stats.errors == 6
    assert sorted(r["event"].get("event_id", "") for r in receiver.logs())[-len(good):] == sorted(
        e["event_id"] for e in good)


# --- the exporter process's input -----------------------------------------------------------


class Reads:
    """A pipe's reads, one piece each (what read1 would return as bytes arrive)."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def read1(self, _n: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_the_pipe_is_read_in_lines_across_reads_and_each_line_is_bounded(monkeypatch) -> None:
    from oisp.sinks.otlp import child

    got = list(child.chunks(Reads(b"Ea\nEb", b"c\nEd\n", b"Ee", b"f", b"g\n")))
    assert got == [[b"Ea"], [b"Ebc", b"Ed"], [b"Eefg"]]
    monkeypatch.setattr(child, "LINE_MAX", 4)  # a line longer is not kept, only said
    got = list(child.chunks(Reads(b"E12", b"345", b"6\nEok\nE123", b"45\nEx\nEto")))
    assert got == [[None, b"Eok"], [None, b"Ex"], [b"Eto"]]


def test_the_exporter_process_counts_unreadable_lines_and_says_so(receiver) -> None:
    """The real exporter process fed by hand: a torn line is one event lost, with its reason;
    an event whose line msgspec refuses (a lone surrogate's escape) still goes, its body the line."""
    import subprocess

    from oisp.sinks.base import encode_event

    good = recorded(["openai_chat_json"])
    odd = copy.deepcopy(good[1])
    odd["event_id"] = "odd-surrogate"
    odd["data"]["messages"][0]["content"] = "half a pair \ud83d"
    lines = [encode_event(e) for e in good + [odd]]
    assert b"\\ud83d" in lines[-1]  # escaped: the line is ASCII
    settings = {"protocol": config.HTTP, "base": receiver.http_url, "content": True, "close_timeout": 10}
    proc = subprocess.run([sys.executable, "-m", "oisp.sinks.otlp.child"], capture_output=True, timeout=60,
                          input=json.dumps(settings).encode() + b"\n" + b"".join(b"E" + line + b"\n" for line in lines)
                          + b'E{"event_type": "ai.req')
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.splitlines()[-1])["stats"]
    assert (stats["emitted"], stats["lost"], stats["errors"]) == (len(lines), 1, 1)
    assert "unreadable" in stats["last_error"]
    bodies = {r["event"]["event_id"]: r["body"] for r in receiver.logs()}
    assert bodies["odd-surrogate"] == lines[-1].decode()


def test_every_loss_says_why(receiver, monkeypatch) -> None:
    """A count of lost events comes with its reason (the sensor prints 'lost N events (reason)')."""
    import oisp.sinks.otlp.exporter as sink_module

    monkeypatch.setattr(sink_module, "QUEUE", 3)
    sink = OtlpExporter(resolve(receiver.http_url, None), notify=lambda _: None)
    events = recorded(["openai_chat_json"])
    sink.emit_many([(e, None) for e in events])  # one more than the queue holds
    assert sink.stats.lost == len(events) - 3 and sink.stats.last_error == sink_module.FULL
    sink.close(timeout=10)
    assert sink.stats.emitted == 3
