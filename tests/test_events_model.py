"""Envelope, schemas and process attribution."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from oisp.events import EVENT_TYPES, ProcessAttributor, load_schema, make_event, rfc3339
from oisp.events.ulid import new_ulid


def test_ulid_shape_and_time_order() -> None:
    a, b = new_ulid(1000.0), new_ulid(2000.0)
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", a)
    assert a[:10] < b[:10]
    assert len({new_ulid(1.0) for _ in range(1000)}) == 1000


def test_rfc3339_utc() -> None:
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500000Z"


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_schemas_are_valid_and_reject_bad_envelopes(event_type: str) -> None:
    schema = load_schema(event_type)
    jsonschema.Draft202012Validator.check_schema(schema)
    bad = make_event(event_type, {}, time.time())
    bad["event_id"] = "not-a-ulid"
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)


def test_attribution_of_a_live_child_then_after_exit() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--marker"])
    try:
        # Popen returns once exec has begun (the close-on-exec pipe closes), which can be before
        # the kernel has set up the new argument list: wait until /proc shows it.
        deadline = time.monotonic() + 10
        while b"--marker" not in Path(f"/proc/{child.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        att = ProcessAttributor(revalidate_after_s=0)
        info = att.process(child.pid)
        assert info["pid"] == child.pid
        assert info["ppid"] == os.getpid()
        assert "--marker" in info["cmdline_args"]
        assert "--marker" in info["cmdline"]
        assert info["exe"]
        assert info["name"]
        assert info["user"]
        # cached, same creation time
        assert att.process(child.pid) == info
        assert att.lookups == 1
    finally:
        child.kill()
        child.wait()
    assert att.process(child.pid)["cmdline_args"] == info["cmdline_args"]  # exited: what we knew


def test_attribution_unknown_pid_and_pid_reuse(monkeypatch) -> None:
    att = ProcessAttributor(revalidate_after_s=0)
    assert att.process(2**22 + 12345) == {"pid": 2**22 + 12345}
    me = att.process(os.getpid())
    # Simulate the pid being reused: same pid, different creation time → fresh lookup.
    import psutil

    real = psutil.Process.create_time
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + 1000)
    again = att.process(os.getpid())
    assert att.lookups == 2
    assert again["start_time"] != me["start_time"]


@pytest.mark.parametrize("authority, domain", [
    ("localhost:11434", "localhost"),            # a local model server's Host header carries its port
    ("api.openai.com", "api.openai.com"),
    ("API.Example.COM.:8443", "api.example.com"),
    ("127.0.0.1:8000", None),                    # an IP literal is no domain: dest.ip says it
    ("[::1]:11434", None),
])
def test_flow_domain_is_the_host_name_without_port(authority, domain):
    from oisp.decode import FlowContext
    from oisp.decode.records import Exchange
    from oisp.events.builder import flow_data

    ex = Exchange(1, "HTTP/1.1", "POST", "/api/chat", authority, [("host", authority)], 1.0, status=200)
    data = flow_data(ex, FlowContext(client=("127.0.0.1", 50000), server=("127.0.0.1", 11434), start_ts=1.0))
    assert data["dest"].get("domain") == domain
    assert data["http"]["host"] == authority  # the header as sent stays in http.host


def test_a_certificate_rejection_is_a_partial_failed_connect() -> None:
    """The event a pinning client's refused handshake makes (the proxy's _client_rejected)."""
    from oisp.events.builder import certificate_rejected_event

    validator = jsonschema.Draft202012Validator(load_schema("network.connect"))
    named = certificate_rejected_event(("10.0.0.2", 443), ("10.0.0.1", 40000), "api.mistral.ai", 1000.0,
                                       reason="TLSV1_ALERT_UNKNOWN_CA", pid=1234, process_name="curl",
                                       passes_for=600.0)
    validator.validate(named)
    assert named["data"] == {"dest": {"ip": "10.0.0.2", "port": 443, "domain": "api.mistral.ai"},
                             "src": {"ip": "10.0.0.1", "port": 40000}, "protocol": "tcp", "success": False,
                             "tls": {"sni": "api.mistral.ai"}}
    assert named["process"] == {"pid": 1234, "name": "curl"}
    assert named["confidence"]["completeness"] == "partial"
    assert named["confidence"]["reasons"] == [
        "client rejected the interception certificate (TLSV1_ALERT_UNKNOWN_CA); this program's connections "
        "to api.mistral.ai pass through undecrypted for 10 min"]
    assert "process_attribution" not in named["confidence"]
    unknown = certificate_rejected_event(("10.0.0.2", 443), ("10.0.0.1", 40000), "api.mistral.ai", 1000.0,
                                         reason="closed")
    validator.validate(unknown)
    assert "process" not in unknown
    assert unknown["confidence"]["reasons"] == ["client rejected the interception certificate (closed)"]
    assert unknown["confidence"]["process_attribution"] == "unknown"
    assert unknown["confidence"]["limitations"] == ["process_unknown"]
