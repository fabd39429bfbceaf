"""The dashboard of a live `oisp record --ui`, in a real browser: real SDK calls through the
real sensor in a namespace lab (tests/record_lab.py), Debian's Chromium driven by
Playwright from inside the client's namespace (where the dashboard listens, on loopback).
The page's rows, details and totals must equal what the sensor wrote to its JSONL file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import uievents
from tests.netns import agent_args
from tests.record_lab import HERE, read_events, start_client, stop_sensor

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs Debian's chromium (.ci/run installs it)")]
pytest.importorskip("playwright.sync_api")


@pytest.mark.parametrize("record_lab", [4], indirect=True, ids=["ipv4"])
def test_a_live_recording_shows_its_calls_in_the_browser(record_lab) -> None:
    assert stop_sensor(record_lab) == 0  # the lab's own sensor has no dashboard
    record_lab["sensor"] = record_lab["start_sensor"]("--ui", "0")
    url = next((m.group(1) for line in record_lab["sensor"].banner if (m := re.search(r"dashboard (\S+)", line))), None)
    assert url, record_lab["sensor"].banner
    assert url.startswith("http://127.0.0.1:"), record_lab["sensor"].banner

    clients = [start_client(record_lab, "openai_stream", "https://api.openai.com", 20)]
    clients[0].wait(60)
    clients.append(start_client(record_lab, "anthropic", "https://api.anthropic.com"))
    outputs = [c.communicate(timeout=60) for c in clients]
    assert [c.returncode for c in clients] == [0, 0], [err[-2000:] for _, err in outputs]
    deadline = time.monotonic() + 10  # the JSONL sink writes through; wait for both responses
    while sum(e["event_type"] == "ai.response" for e in read_events(record_lab)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)

    argv = agent_args(url=url, expected_calls=2, screenshot_dir=record_lab["tmp"])
    check = subprocess.run(record_lab["pair"].a.cmd(sys.executable, str(HERE / "agents" / "ui_page_check.py"), *argv),
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    page = json.loads(check.stdout)
    print(f"screenshot: {record_lab['tmp'] / 'record-ui.png'}")
    assert stop_sensor(record_lab) == 0

    assert page["no_token"] in (401, 403)
    assert page["wrong_host"] in (400, 403)
    want = uievents.totals(record_lab["events"])
    assert want["calls"] == 2
    assert want["input"] > 0
    for key in ("calls", "errors", "input", "cached", "output", "reasoning"):
        assert int(page["totals"][key].replace(",", "")) == want[key], key
    events = read_events(record_lab)
    requests = {e["data"]["provider"]["name"]: e for e in events if e["event_type"] == "ai.request"}
    rows = {name: next(r for r in page["rows"] if name in r) for name in ("openai", "anthropic")}
    for client, name in zip(clients, ("openai", "anthropic")):
        assert str(client.pid) in rows[name].split()  # the client's own process, as in the file
        assert requests[name]["process"]["pid"] == client.pid
        assert requests[name]["data"]["model"]["id"] in rows[name]
    assert len(page["details"]) == 2
    for detail in page["details"]:
        # the prompt and the answer
        assert "hello there" in detail
        assert "echo: hello there" in detail
    assert "TESTKEY" not in check.stdout  # the page never saw the key the clients sent
    # The redirector's refusals are on the health panel (DNS answers nobody asked for, owners not
    # shown to hold the socket, QUIC sent to TCP), with the counters' names.
    assert "refused or unknown" in page["health"]
    for name in ("dns unsolicited", "processes unknown", "quic refused"):
        assert name in page["health"], name
