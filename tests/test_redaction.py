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
from provider_cases import validate

from oisp.decode import Direction, FlowContext
from oisp.events import FlowRecorder, Redactor
from oisp.events import redact
from oisp.events.redact import scrub_secrets

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
        {"id": "x",
         "choices": [{"index": 0,
                      "delta": {"tool_calls": [{"index": 0, "id": "t", "type": "function",
                                                "function": {"name": "f", "arguments": json.dumps({"k": s["aws"]})}}]},
                      "finish_reason": "tool_calls"}]},
    ]
    sse = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(sse) + sse
    return req, resp


def record(mode: str) -> list[dict]:
    ctx = FlowContext(("10.0.0.2", 1), ("10.0.0.3", 443), 1.0, sni="api.openai.com", tls_version="TLSv1.3",
                      flow_id=f"flow-{SECRETS['jwt']}")
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
    assert req["data"]["messages"][0]["content"].startswith("use [REDACTED:aws_bedrock:AKIA:sha256:")


def test_minimal_mode_still_never_copies_credentials_headers() -> None:
    blob = json.dumps(record("minimal"))
    for kind in ("openai", "header_only", "anthropic"):
        assert f"Bearer {SECRETS[kind]}" not in blob
    req_auth = json.dumps([e["data"].get("auth") for e in record("minimal") if e["event_type"] == "ai.request"])
    assert SECRETS["openai"] not in req_auth


def test_scrub_is_idempotent() -> None:
    once, n = scrub_secrets(f"a {SECRETS['openai']} b ?key={SECRETS['google']}&x=1")
    twice, m = scrub_secrets(once)
    assert n == 2
    assert m == 0
    assert once == twice


_SECRET_SAMPLES = ["sk-ant-api03-" + "A1" * 15, "sk-proj-" + "b1" * 12, "sk-or-v1-" + "c" * 20, "sk-" + "dD" * 10,
                   "AKIA" + "E" * 16, "ghp_" + "f" * 24, "xoxb-" + "1" * 12, "eyJhbGc1.eyJzdWI2.sig_nature",
                   "AIza" + "g" * 32, "hf_" + "h1" * 12, "gsk_" + "i" * 24, "xai-" + "j" * 24, "pplx-" + "k" * 24,
                   "tgp_v1_" + "l2" * 10, "fw_" + "Mm" * 10, "ABSK" + "n+" * 10 + "=", "ya29." + "o-" * 10,
                   "Bearer " + "l" * 20, "bearer \t" + "m.n" * 8, "x-api-key: ", "API key provided: ", "--api-key",
                   "--api-key=", "password=", "OPENAI_API_KEY=", "Zq12ab34cd56ef78", "?key=v", "&signature=abc",
                   "?api-key=x&y=1", "credent\u0131al=", "\u017fecret=", "\u212aey: "]  # Unicode case folding


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_SECRET_SAMPLES), st.text(max_size=12),
                          st.sampled_from([" ", "\n", '"', "=", ":", "&", "?", "sk-", "Bearer", "eyJ", "[REDACTED:"])),
                max_size=12))
def test_the_prefilter_never_lets_a_secret_through(parts) -> None:
    """scrub_secrets skips strings its one combined search rules out; it must give exactly
    what trying every pattern gives."""
    text = "".join(parts)
    assert redact.scrub_secrets(text)[0] == redact.default_scrubber().scrub_each(text)[0]


# -- patterns from the spec, positions, full mode, the keyed hash (issue 11 item 13) -------------

def _key_for(prefix: str) -> str:
    return prefix + "Q7wE9rT2yU4iO6pA8sD0fG1h"


def test_every_key_prefix_the_spec_lists_is_redacted() -> None:
    from oisp.spec import default_spec

    prefixes = {prefix for p in default_spec().providers for prefix in p.key_prefixes}
    assert {"tgp_v1_", "fw_", "ABSK", "ya29.", "sk-ant-", "gsk_"} <= prefixes
    for prefix in prefixes:
        key = _key_for(prefix)
        text, n = scrub_secrets(f"here: {key} there")
        assert key not in text, prefix
        assert n == 1, prefix
        assert "[REDACTED:" in text, prefix


def test_a_provider_added_to_the_spec_is_covered_without_code() -> None:
    from oisp.spec import Spec

    spec = Spec.from_dict({"providers": [{"id": "newcorp", "hosts": ["api.newcorp.test"], "key_prefixes": ["nc_live_"]}]})
    key = _key_for("nc_live_")
    event = {"event_type": "network.connect", "confidence": {}, "data": {"note": f"uses {key}"}}
    Redactor("safe", spec=spec).apply(event)
    assert key not in json.dumps(event)
    assert "[REDACTED:newcorp:nc_live_:" in event["data"]["note"]


def test_a_word_after_a_short_prefix_is_not_a_key() -> None:
    assert scrub_secrets("run fw_update_firmware_version_now and hf_hub_download_helper")[1] == 0


@pytest.mark.parametrize("text, secret", [
    ("Authorization: Bearer  Zx81jfk2l3jd8skQ", "Zx81jfk2l3jd8skQ"),  # two spaces
    ("Authorization: Bearer\tZx81jfk2l3jd8skQ", "Zx81jfk2l3jd8skQ"),  # a tab
    ("curl -H 'x-api-key: Zx81jfk2l3jd8skQ' https://api.example", "Zx81jfk2l3jd8skQ"),
    ("tool --api-key=Zx81jfk2l3jd8skQ --model m", "Zx81jfk2l3jd8skQ"),
    ("tool --api-key Zx81jfk2l3jd8skQ", "Zx81jfk2l3jd8skQ"),
    ("Incorrect API key provided: Zx81jfk2l3jd8skQ. You can find your API key at", "Zx81jfk2l3jd8skQ"),
    ("OPENAI_API_KEY=Zx81jfk2l3jd8skQ python app.py", "Zx81jfk2l3jd8skQ"),
    ('{"client_secret": "Zx81jfk2l3jd8skQ"}', "Zx81jfk2l3jd8skQ"),
    ("db password=hunter2 ok", "hunter2"),
    ("github_token: Zx81jfk2l3jd8skQ", "Zx81jfk2l3jd8skQ"),
])
def test_unprefixed_secrets_in_auth_positions(text, secret) -> None:
    scrubbed, n = scrub_secrets(text)
    assert secret not in scrubbed, scrubbed
    assert n >= 1, scrubbed


@pytest.mark.parametrize("text", ["set max_tokens=1024 and temperature=0.2", "the key: understanding matters",
                                  "monkey=bananas123Abc", "token limits apply", "a keyboard and a passport"])
def test_ordinary_text_is_left_alone(text) -> None:
    assert scrub_secrets(text) == (text, 0)


def test_command_lines_are_scrubbed_at_attribution_in_every_mode() -> None:
    import subprocess

    from oisp.events.attribution import ProcessAttributor

    secret = "Zx81jfk2l3jd8skQ0a9s"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--token", secret,
                              "-H", f"x-api-key: {secret}9"])
    try:
        info = ProcessAttributor().process(child.pid)
    finally:
        child.kill()
        child.wait()
    assert secret not in json.dumps(info)
    assert info["cmdline_args"][3] == "--token"
    assert info["cmdline_args"][4].startswith("[REDACTED:value::sha256:")


def _full_mode_event() -> dict:
    return {"event_type": "ai.response", "confidence": {},
            "process": {"pid": 1, "cmdline_args": ["llm", "-m", "gpt-4o", "summarise my medical record"],
                        "cmdline": "llm -m gpt-4o 'summarise my medical record'"},
            "data": {"tools": [{"type": "function", "function": {"name": "lookup", "description": "finds the patient",
                                                                 "parameters": {"properties": {"q": {
                                                                     "type": "string", "description": "their name"}}}}}],
                     "error": {"type": "invalid_request_error", "code": "bad", "message": "echo: my medical record",
                               "param": "messages[0]: my medical record"}}}


def test_full_mode_hashes_command_line_arguments_tool_descriptions_and_errors() -> None:
    event = Redactor("full").apply(_full_mode_event())
    text = json.dumps(event)
    assert "medical" not in text
    assert "patient" not in text
    assert "their name" not in text
    assert event["process"]["cmdline_args"][0] == "llm"
    assert event["process"]["cmdline"].startswith("llm '[REDACTED:content:")
    assert event["data"]["error"]["type"] == "invalid_request_error"
    assert event["data"]["error"]["code"] == "bad"
    assert event["data"]["tools"][0]["function"]["name"] == "lookup"


def test_safe_mode_keeps_them() -> None:
    event = Redactor("safe").apply(_full_mode_event())
    assert "summarise my medical record" in event["process"]["cmdline_args"]


def test_hashes_are_keyed_per_install_and_stable_across_runs(tmp_path) -> None:
    import hashlib
    import os
    import stat
    import subprocess

    program = "from oisp.events.redact import secret_hash; print(secret_hash('sk-proj-the-same-key'))"

    def run(install: str) -> str:
        env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / install)}
        return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    first, again, other = run("a"), run("a"), run("b")
    assert first == again != other
    assert first.startswith("sha256:")
    assert len(first) == len("sha256:") + 16
    assert first != "sha256:" + hashlib.sha256(b"sk-proj-the-same-key").hexdigest()[:16]  # not guessable offline
    key = tmp_path / "a" / "oisp" / "hash.key"
    assert len(key.read_bytes()) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
