"""Secrets planted in every field a request can carry never reach any output, in any mode
that promises it; full mode replaces content by hashes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import validate  # noqa: E402

from oisp.decode import Direction, FlowContext  # noqa: E402
from oisp.events import FlowRecorder, Redactor  # noqa: E402
from oisp.events import redact  # noqa: E402
from oisp.events.redact import scrub_secrets  # noqa: E402

SECRETS = {
    "openai": "sk-proj-Pl4ntedOpenAIKey0000000000000000",
    "openai_legacy": "sk-Pl4ntedLegacyKey1111111111111111",
    "anthropic": "sk-ant-api03-Pl4ntedAnthropicKey22222222",
    "aws": "AKIAPL4NTEDAWSKEY333",
    "github": "ghp_Pl4ntedGithubToken444444444444444444",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwbGFudGVkIn0.Pl4ntedSignature5555",
    "slack": "xoxb-1234567890-Pl4ntedSlackToken",
    "google": "AIzaSyPl4ntedGoogleKey66666666666666666",
    "header_only": "0123456789abcdefPl4ntedAzureKey77",
}


def planted_exchange() -> tuple[bytes, bytes]:
    s = SECRETS
    body = {
        "model": "gpt-4o",
        "stream": True,
        "messages": [
            {"role": "system", "content": f"use {s['aws']} and {s['github']}"},
            {"role": "user", "content": [{"type": "text", "text": f"my token {s['jwt']} and {s['slack']}"}]},
            {"role": "tool", "tool_call_id": "c1", "content": f"result {s['google']}"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "description": f"key {s['openai_legacy']}"}}],
    }
    raw = json.dumps(body).encode()
    req = (
        f"POST /v1/chat/completions?key={s['google']} HTTP/1.1\r\nHost: api.openai.com\r\n"
        f"Authorization: Bearer {s['openai']}\r\napi-key: {s['header_only']}\r\nx-api-key: {s['anthropic']}\r\n"
        f"User-Agent: agent/{s['anthropic']}\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    ).encode() + raw
    chunks = [
        {"id": "x", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": f"echo {s['openai']}"}}]},
        {"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t", "type": "function", "function": {"name": "f", "arguments": json.dumps({"k": s["aws"]})}}]}, "finish_reason": "tool_calls"}]},
    ]
    sse = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(sse) + sse
    return req, resp


def record(mode: str) -> list[dict]:
    ctx = FlowContext(("10.0.0.2", 1), ("10.0.0.3", 443), 1.0, sni="api.openai.com", tls_version="TLSv1.3", flow_id=f"flow-{SECRETS['jwt']}")
    rec = FlowRecorder(ctx, redactor=Redactor(mode), streaming_chunks=True)
    req, resp = planted_exchange()
    events = rec.feed(Direction.REQUEST, req, 2.0) + rec.feed(Direction.RESPONSE, resp, 3.0) + rec.close(4.0)
    validate(events)
    return events


@pytest.mark.parametrize("mode", ["safe", "full"])
def test_no_planted_secret_in_any_output(mode: str, tmp_path) -> None:
    from oisp.sinks import JsonlSink, StdoutSink

    events = record(mode)
    assert {e["event_type"] for e in events} >= {"ai.request", "ai.response", "ai.streaming_chunk", "network.flow"}
    out = tmp_path / "events.jsonl"
    sink = JsonlSink(out)
    pretty = tmp_path / "pretty.txt"
    with pretty.open("w") as fh:
        stdout = StdoutSink(stream=fh, pretty=True)
        for e in events:
            sink.emit(e)
            stdout.emit(e)
    sink.close()
    outputs = {"json": json.dumps(events), "jsonl": out.read_text(), "pretty": pretty.read_text(), "repr": repr(events)}
    for name, text in outputs.items():
        for kind, secret in SECRETS.items():
            assert secret not in text, (mode, name, kind)
            assert secret[8:24] not in text, (mode, name, kind)  # no large fragment either


def test_auth_header_becomes_prefix_and_hash() -> None:
    req = next(e for e in record("safe") if e["event_type"] == "ai.request")
    assert req["data"]["auth"] == {"type": "api_key", "key_prefix": "sk-proj-", "key_hash": req["data"]["auth"]["key_hash"]}
    assert req["confidence"]["redaction_applied"] is True


def test_full_mode_hashes_all_content() -> None:
    events = record("full")
    req = next(e for e in events if e["event_type"] == "ai.request")
    resp = next(e for e in events if e["event_type"] == "ai.response")
    assert all("$redacted" in m["content"] for m in req["data"]["messages"])
    assert "$redacted" in resp["data"]["choices"][0]["message"]["content"]
    assert "$redacted" in resp["data"]["tool_calls"][0]["arguments"]
    assert resp["confidence"]["completeness"] == "redacted"


def test_safe_mode_keeps_ordinary_content() -> None:
    req = next(e for e in record("safe") if e["event_type"] == "ai.request")
    assert req["data"]["messages"][0]["content"].startswith("use [REDACTED:aws_access_key:AKIA:sha256:")


def test_minimal_mode_still_never_copies_credentials_headers() -> None:
    blob = json.dumps(record("minimal"))
    for kind in ("openai", "header_only", "anthropic"):
        assert f"Bearer {SECRETS[kind]}" not in blob
    req_auth = json.dumps([e["data"].get("auth") for e in record("minimal") if e["event_type"] == "ai.request"])
    assert SECRETS["openai"] not in req_auth


def test_scrub_is_idempotent() -> None:
    once, n = scrub_secrets(f"a {SECRETS['openai']} b ?key={SECRETS['google']}&x=1")
    twice, m = scrub_secrets(once)
    assert n == 2 and m == 0 and once == twice


_SECRET_SAMPLES = ["sk-ant-api03-" + "A" * 30, "sk-proj-" + "b1" * 12, "sk-or-v1-" + "c" * 20, "sk-" + "d" * 20,
                   "AKIA" + "E" * 16, "ghp_" + "f" * 24, "xoxb-" + "1" * 12, "eyJhbGc1.eyJzdWI2.sig_nature",
                   "AIza" + "g" * 32, "hf_" + "h" * 24, "gsk_" + "i" * 24, "xai-" + "j" * 24, "pplx-" + "k" * 24,
                   "Bearer " + "l" * 20, "bearer " + "m.n" * 8, "?key=v", "&signature=abc", "?api-key=x&y=1"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_SECRET_SAMPLES), st.text(max_size=12),
                          st.sampled_from([" ", "\n", '"', "=", "&", "?", "sk-", "Bearer", "eyJ"])), max_size=12))
def test_the_prefilter_never_lets_a_secret_through(parts) -> None:
    """scrub_secrets skips strings its one combined search rules out; it must give exactly
    what trying every pattern gives."""
    text = "".join(parts)
    count = 0

    def every_pattern(value: str) -> str:
        nonlocal count
        for kind, pattern, prefix_len in redact._PATTERNS:
            value, n = pattern.subn(lambda m, k=kind, p=prefix_len: redact._marker(k, m.group(), p), value)
            count += n
        return redact._QUERY_SECRET.sub(
            lambda m: m.group() if m.group(2).startswith("[REDACTED:")
            else m.group(1) + redact._marker("query_secret", m.group(2), 0), value)

    assert redact.scrub_secrets(text)[0] == every_pattern(text)
