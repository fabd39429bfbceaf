"""Events for the dashboard tests, made by the real recorder from the provider fixtures' wire bytes,
and the figures a page should show, computed straight from a JSONL file."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import Case, http1_request, http1_response, load_cases

from oisp.decode import Direction, FlowContext
from oisp.events import FlowRecorder

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=1">'
HOSTILE_PROCESS = "<img src=x onerror=window.pwned=1>"
PROCESSES = ["agent-a", "agent-b", "agent-c"]


def recorder(case: Case, n: int, ts: float, process: str) -> FlowRecorder:
    ctx = FlowContext(("10.0.0.2", 40000 + n), ("10.9.9.9", case.port), ts, pid=None, process_name=process,
                      sni=case.host.split(":")[0] if case.tls else None, alpn="http/1.1" if case.tls else None,
                      tls_version="TLSv1.3" if case.tls else None, flow_id=f"flow-{n}")
    return FlowRecorder(ctx)


def call_events(case: Case, n: int, ts: float, process: str) -> list[dict]:
    rec = recorder(case, n, ts, process)
    events = rec.feed(Direction.REQUEST, http1_request(case), ts + 0.01)
    events += rec.feed(Direction.RESPONSE, http1_response(case), ts + 0.2)
    return events + rec.close(ts + 0.3)


def hostile_case() -> Case:
    base = next(c for c in load_cases() if c.name == "openai_chat_json")
    return replace(base, name="hostile", request={**base.request, "messages": [{"role": "user", "content": HOSTILE}]})


def recorded_events(start: float | None = None) -> list[dict]:
    """Every fixture case once, spread over the last minute, plus a call whose prompt and process name are HTML."""
    start = time.time() - 60 if start is None else start
    events = []
    cases = load_cases()
    for n, case in enumerate(cases):
        events += call_events(case, n, start + n, PROCESSES[n % len(PROCESSES)])
    events += call_events(hostile_case(), len(cases), start + len(cases), HOSTILE_PROCESS)
    for ev in events:
        usage = ev["data"].get("usage") if ev["event_type"] == "ai.response" else None
        if usage and usage.get("prompt_tokens"):
            # The cost branch prices responses in the recorder; until then the fields of its contract
            # (issue 14) are filled here, at a made-up rate, so the page's cost column has figures to add.
            usage.setdefault("cost", {"usd": usage["prompt_tokens"] * 2.5e-6 + usage.get("completion_tokens", 0) * 1e-5,
                                      "estimate": True, "prices_as_of": "2026-12-01", "source": "bundled"})
    return events


def write_jsonl(path: Path, events: list[dict], mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for event in events:
            f.write(json.dumps(event, ensure_ascii=False) + "\n")


def totals(path: Path) -> dict:
    """What the header should show for a file: calls and the usage summed over its responses."""
    ids, out = set(), {"calls": 0, "errors": 0, "input": 0, "cached": 0, "output": 0, "reasoning": 0, "cost": 0.0}
    for line in path.read_text(encoding="utf-8").splitlines():
        ev = json.loads(line)
        if ev["event_type"] not in ("ai.request", "ai.response"):
            continue
        ids.add(ev["data"]["request_id"])
        if ev["event_type"] == "ai.response":
            usage = ev["data"].get("usage") or {}
            out["errors"] += not ev["data"]["success"]
            for key, field in (("input", "prompt_tokens"), ("cached", "cached_tokens"),
                               ("output", "completion_tokens"), ("reasoning", "reasoning_tokens")):
                out[key] += usage.get(field) or 0
            out["cost"] += (usage.get("cost") or {}).get("usd") or 0
    out["calls"] = len(ids)
    return out


class Served:
    """A running `oisp ui FILE --port 0`: its file, printed URL (with the token) and process."""

    def __init__(self, path: Path, url: str, proc: subprocess.Popen) -> None:
        self.path, self.url, self.proc = path, url, proc
        parts = urlsplit(url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.port = parts.port
        self.token = parts.query.split("token=", 1)[1]


@contextlib.contextmanager
def serve_ui(path: Path) -> Iterator[Served]:
    """`oisp ui` over `path` (the fixtures' events written there first), stopped cleanly after."""
    write_jsonl(path, recorded_events())
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "oisp", "ui", str(path), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), (url, proc.stderr.read() if proc.poll() is not None else "")
        yield Served(path, url, proc)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
