"""`oisp demo` end to end: it exits 0, the events it prints validate and match what each
client assembled, and it leaves no namespace, hosts file, process or file behind - also
when it is interrupted."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import psutil
import pytest

from oisp.events import load_schema

pytestmark = pytest.mark.privileged

FORMAT_CHECKER = jsonschema.FormatChecker()


def demo_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("oisp-demo-*"))


def assert_nothing_left(pid: int, dirs_before: set[Path]) -> None:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"oisp-demo-{pid}-" not in names
    assert not list(Path("/etc/netns").glob(f"oisp-demo-{pid}-*"))
    assert demo_dirs() <= dirs_before
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if any("oisp.demo." in part for part in (p.info["cmdline"] or []))]
    assert not leftovers


def test_demo_records_every_call_and_removes_its_lab():
    before = demo_dirs()
    demo = subprocess.Popen([sys.executable, "-m", "oisp", "demo", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = demo.communicate(timeout=240)
    assert demo.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in out.splitlines()]
    for event in events:
        jsonschema.validate(event, load_schema(event["event_type"]), format_checker=FORMAT_CHECKER)
    # What each client said it got, and its pid, from the demo's own report.
    got = {call: (int(pid), text) for call, pid, text in
           re.findall(r"oisp demo: (\w+): .+? \(pid (\d+)\) got '(.*)'", err)}
    assert list(got) == ["openai", "openai_stream", "anthropic", "anthropic_stream"]
    requests = [e for e in events if e["event_type"] == "ai.request"]
    responses = [e for e in events if e["event_type"] == "ai.response"]
    assert len(requests) == 4
    assert len(responses) == 4
    assert [r["data"]["provider"]["name"] for r in requests] == ["openai", "openai", "anthropic", "anthropic"]
    for (pid, text), request, response in zip(got.values(), requests, responses):
        assert request["process"]["pid"] == pid
        assert response["process"]["pid"] == pid
        assert response["data"]["choices"][0]["message"]["content"][:60] == text
    assert "demo0123456789" not in out  # the clients' made-up keys are redacted
    assert_nothing_left(demo.pid, before)


def test_an_interrupted_demo_removes_its_lab():
    before = demo_dirs()
    demo = subprocess.Popen([sys.executable, "-m", "oisp", "demo"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    said = []
    for line in demo.stderr:
        said.append(line)
        if "openai:" in line:  # mid-run: the lab, the provider, the sensor and a client have been up
            break
    else:
        raise AssertionError("".join(said))
    demo.send_signal(signal.SIGINT)
    started = time.monotonic()
    rest = demo.communicate(timeout=60)[1]
    assert demo.returncode == 130, "".join(said) + rest
    assert time.monotonic() - started < 30
    assert "lab removed" in rest
    assert_nothing_left(demo.pid, before)
