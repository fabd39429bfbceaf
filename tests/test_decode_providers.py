"""Every provider fixture, decoded from HTTP/1.1 wire bytes, yields the ai.request / ai.response
pair a client would assemble; every event validates against its shipped schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import Case, http1_response, load_cases, pair, run_case, validate

CASES = load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fixture_yields_expected_pair(case: Case) -> None:
    events, rec = run_case(case)
    validate(events)
    assert rec.stats.decode_errors == 0, rec.stats.errors
    req, resp = pair(events)
    exp = case.expected
    assert req["provider"]["name"] == exp["provider"]
    if "provider_id" in exp:
        assert req["provider"]["id"] == exp["provider_id"]
    assert req["model"]["id"] == exp["model"]
    assert req["messages_count"] == exp["messages"]
    assert req["streaming"] is exp["streaming"]
    assert req["request_id"] == resp["request_id"]
    assert resp["status_code"] == case.status
    assert resp["success"] is exp.get("success", True)
    assert resp["choices"][0]["message"]["content"] == exp["text"] if resp.get("choices") else exp["text"] == ""
    assert resp.get("finish_reason") == exp["finish_reason"]
    assert resp.get("usage", {}) == exp["usage"]
    assert resp.get("model", {}).get("id") == exp.get("response_model", exp["model"])
    calls = [{k: tc[k] for k in ("id", "name", "arguments") if k in tc} for tc in resp.get("tool_calls", [])]
    assert calls == exp["tool_calls"]
    assert resp.get("thinking", "") == exp.get("thinking", "")
    if "error_type" in exp:
        assert resp["error"]["type"] == exp["error_type"]
    flows = [e for e in events if e["event_type"] == "network.flow"]
    assert len(flows) == 1
    assert flows[0]["data"]["http"]["status_code"] == case.status
    assert flows[0]["data"]["http"]["path"] == case.path.split("?")[0]


@pytest.mark.parametrize("case", [c for c in CASES if c.expected["streaming"] and c.status == 200], ids=lambda c: c.name)
def test_time_to_first_token_is_arrival_of_first_content(case: Case) -> None:
    resp_bytes = http1_response(case)
    events, _ = run_case(case, response=resp_bytes, step=16)
    _, resp = pair(events)
    # Find the piece index where the first content arrives by replaying byte counts.
    assert 0 < resp["time_to_first_token_ms"] <= resp["latency_ms"]
    chunk_events = [e for e in events if e["event_type"] == "ai.streaming_chunk"]
    assert [e["data"]["chunk_index"] for e in chunk_events] == list(range(len(chunk_events)))
    streamed = "".join(e["data"]["delta"].get("content", "") for e in chunk_events)
    assert streamed == case.expected["text"]


def test_auth_is_prefix_and_hash_never_the_key() -> None:
    for case in CASES:
        events, _ = run_case(case)
        blob = json.dumps(events)
        in_query = [case.path.split("key=")[-1]] if "key=" in case.path else []
        for secret in list(case.headers.values()) + in_query:
            token = secret.split("Credential=")[-1].split("/")[0].split(" ")[-1]
            if len(token) >= 16:
                assert token not in blob, (case.name, token)
        req, _ = pair(events)
        if case.headers or "key=" in case.path:
            if any(k in ("authorization", "x-api-key", "api-key", "x-goog-api-key") for k in case.headers) or "key=" in case.path:
                assert req["auth"]["key_hash"].startswith("sha256:")


def test_gemini_query_key_gives_prefix_and_hash() -> None:
    case = next(c for c in CASES if c.name == "gemini_stream_sse")
    req, _ = pair(run_case(case)[0])
    assert req["auth"]["key_prefix"] == "AIza"
    assert "key=" not in req["provider"]["endpoint"]
