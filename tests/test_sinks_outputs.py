"""Sinks: rotated JSONL under the data dir, stdout, a webhook against a real local HTTP server."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oisp.sinks import FanOut, JsonlSink, StdoutSink, WebhookSink, default_events_path


def ev(i: int) -> dict:
    return {"event_type": "network.connect", "ts": "2025-01-01T00:00:00.000000Z", "event_id": f"E{i}",
            "data": {"dest": {"ip": "1.1.1.1", "port": 443}, "i": i}}


def test_default_path_follows_xdg(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_events_path() == tmp_path / "oisp" / "events.jsonl"
    sink = JsonlSink()
    sink.emit(ev(1))
    sink.close()
    assert json.loads((tmp_path / "oisp" / "events.jsonl").read_text())["event_id"] == "E1"


def test_jsonl_rotates_by_size(tmp_path) -> None:
    path = tmp_path / "e.jsonl"
    sink = JsonlSink(path, max_bytes=500, backups=2)
    for i in range(40):
        sink.emit(ev(i))
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
    assert all(p.stat().st_size <= 500 for p in tmp_path.iterdir())
    lines = [json.loads(ln) for name in ("e.jsonl.2", "e.jsonl.1", "e.jsonl")
             for ln in (tmp_path / name).read_text().splitlines()]
    ids = [e["data"]["i"] for e in lines]
    assert ids == sorted(ids)
    assert ids[-1] == 39


def test_fan_out_writes_one_encoding_to_the_file_and_the_dashboard(tmp_path) -> None:
    """The JSONL file and the dashboard get the same line, made once; an event holding a lone
    surrogate (a client's "\\ud800" escape, decoded) is kept in both as valid JSON, not lost."""
    from oisp.sinks.ui import EventStore
    from oisp.sinks.ui.sink import UISink

    store = EventStore()
    ui = UISink(port=0, store=store)
    jsonl = JsonlSink(tmp_path / "e.jsonl")
    fan = FanOut([jsonl, ui])
    odd = {**ev(2), "data": {"text": json.loads('"a\\ud800b"'), "name": "Zoë"}}
    fan.emit(ev(1))
    fan.emit(odd)
    fan.emit({"event_type": "ai.streaming_chunk", "data": {}})  # the file keeps chunks, the page does not need them
    fan.close()
    lines = (tmp_path / "e.jsonl").read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [ev(1), odd, {"event_type": "ai.streaming_chunk", "data": {}}]
    assert store.since(0)[0] == lines[:2]
    assert fan.report()["jsonl"]["lost"] == fan.report()["ui"]["lost"] == 0


def test_stdout_json_and_pretty() -> None:
    buf = io.StringIO()
    StdoutSink(buf).emit(ev(1))
    assert json.loads(buf.getvalue())["event_id"] == "E1"
    buf = io.StringIO()
    StdoutSink(buf, pretty=True).emit(ev(2))
    assert "network.connect" in buf.getvalue()
    assert "1.1.1.1:443" in buf.getvalue()


class _Collector(BaseHTTPRequestHandler):
    received: list = []
    fail_first = 0
    calls = 0

    def do_POST(self) -> None:
        cls = type(self)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls.calls += 1
        if cls.calls <= cls.fail_first:
            self.send_response(503)
            self.end_headers()
            return
        cls.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    handler = type("H", (_Collector,), {"received": [], "fail_first": 0, "calls": 0})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, handler
    srv.shutdown()
    srv.server_close()


def test_webhook_batches_and_retries(server) -> None:
    srv, handler = server
    handler.fail_first = 2
    sink = WebhookSink(f"http://127.0.0.1:{srv.server_port}/events", batch_size=10, flush_interval=0.2, backoff=0.05)
    for i in range(25):
        sink.emit(ev(i))
    sink.close(timeout=10)
    got = [e["data"]["i"] for batch in handler.received for e in batch]
    assert got == list(range(25))
    assert all(len(b) <= 10 for b in handler.received)
    assert sink.stats.emitted == 25
    assert sink.stats.lost == 0
    assert sink.stats.errors == 2


def test_webhook_down_counts_losses_without_blocking_capture() -> None:
    sink = WebhookSink("http://127.0.0.1:9/never", batch_size=5, flush_interval=0.05, max_retries=2, backoff=0.01, timeout=0.5)
    t0 = time.monotonic()
    for i in range(12):
        sink.emit(ev(i))
    assert time.monotonic() - t0 < 0.5  # emit does not wait for the network
    sink.close(timeout=20)
    assert sink.stats.lost == 12
    assert sink.stats.emitted == 0
    assert sink.stats.errors >= 3


def test_fanout_isolates_a_failing_sink(tmp_path) -> None:
    class Broken:
        name = "broken"

        def __init__(self) -> None:
            from oisp.sinks import SinkStats

            self.stats = SinkStats()

        def emit(self, event):
            raise OSError("disk full")

        def flush(self):
            pass

        def close(self):
            raise OSError("still full")

    good = JsonlSink(tmp_path / "ok.jsonl")
    fan = FanOut([Broken(), good])
    for i in range(3):
        fan.emit(ev(i))
    fan.close()
    report = fan.report()
    assert report["broken"]["lost"] == 3
    assert report["jsonl"]["emitted"] == 3
    assert len((tmp_path / "ok.jsonl").read_text().splitlines()) == 3


# -- the webhook URL is a secret (issue 11 item 13) ----------------------------------------------

def test_webhook_url_from_the_environment_or_a_file_keeps_it_out_of_ps(tmp_path, monkeypatch, capsys) -> None:
    from oisp.sinks.webhook import webhook_url

    url = "https://hooks.example/services/T0K3Nsecret?token=abc123"
    monkeypatch.setenv("OISP_WEBHOOK_URL", url)
    assert webhook_url(None) == url
    (tmp_path / "hook").write_text(url + "\n")
    assert webhook_url(f"@{tmp_path / 'hook'}") == url
    assert capsys.readouterr().err == ""
    assert webhook_url(url) == url  # still accepted on the command line, with a warning that does not repeat it
    err = capsys.readouterr().err
    assert "visible to every user" in err
    assert "T0K3N" not in err
    monkeypatch.delenv("OISP_WEBHOOK_URL")
    assert webhook_url(None) is None


def test_webhook_shows_only_scheme_and_host(caplog) -> None:
    from oisp.sinks.webhook import display_url

    assert display_url("https://user:pw@hooks.example:8443/p/SECRET?t=SECRET2") == "https://hooks.example:8443"
    assert display_url("http://[::1]:9/x") == "http://[::1]:9"
    sink = WebhookSink("http://127.0.0.1:9/hook/PATHSECRET?token=QUERYSECRET", max_retries=0, flush_interval=0.01)
    sink.emit(ev(1))
    with caplog.at_level("DEBUG"):
        sink.close(timeout=5)
    shown = caplog.text + repr(sink) + str(sink.stats.last_error)
    assert sink.stats.lost == 1
    assert "127.0.0.1:9" in caplog.text
    assert "PATHSECRET" not in shown
    assert "QUERYSECRET" not in shown


# -- item 14: terminal escapes in --pretty, a webhook that never answers -------------------------

HOSTILE = "\x1b]0;pwned\x07\x1b[2J"  # sets the terminal's title, then clears the screen
CONTROLS = [chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))]


def _hostile_events() -> list[dict]:
    """Real events from the recorder: a prompt, a model name, a reply and a process name carrying escape
    sequences (HTTP itself refuses them in a path or a header)."""
    from oisp.decode import Direction, FlowContext
    from oisp.events import FlowRecorder

    body = json.dumps({"model": f"gpt-4o{HOSTILE}", "messages": [{"role": "user", "content": f"hi {HOSTILE}\x9b2J"}]})
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nUser-Agent: ua\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n\r\n{body}").encode()
    reply = json.dumps({"id": "c1", "model": f"gpt-4o{HOSTILE}", "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": f"{HOSTILE}\x9b2J\x7f echoed"}}]}).encode()
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(reply) + reply
    rec = FlowRecorder(FlowContext(("10.0.0.2", 1), ("10.0.0.3", 443), 1.0, sni="api.openai.com",
                                   process_name=f"evil{HOSTILE}"))
    events = rec.feed(Direction.REQUEST, request, 2.0) + rec.feed(Direction.RESPONSE, response, 3.0) + rec.close(4.0)
    events.append({**ev(9), "event_type": "process.exec", "data": {"note": f"x{HOSTILE}\x9b"}})
    return events


def test_pretty_output_shows_control_characters_escaped() -> None:
    events = _hostile_events()
    assert {e["event_type"] for e in events} >= {"ai.request", "ai.response", "network.flow", "network.connect"}
    buf = io.StringIO()
    sink = StdoutSink(buf, pretty=True)
    for event in events:
        sink.emit(event)
    out = buf.getvalue()
    assert not [c for c in CONTROLS if c in out], repr(out)
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in out  # shown, harmlessly
    assert out.count("\n") == len(events)


def test_json_to_a_terminal_shows_c1_and_del_escaped_and_stays_json() -> None:
    import os

    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            sink = StdoutSink(tty)
            for event in _hostile_events():
                sink.emit(event)
            tty.flush()
        os.set_blocking(primary, False)
        out = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except BlockingIOError:
                break
            out += chunk
    finally:
        os.close(primary)
        os.close(secondary)
    text = out.decode().replace("\r\n", "\n")
    assert not [c for c in CONTROLS if c in text], repr(text)
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(HOSTILE in json.dumps(line) or "\\u001b" in json.dumps(line) for line in lines)
    assert any("\x9b2J\x7f echoed" in (e["data"].get("choices") or [{}])[0].get("message", {}).get("content", "")
               for e in lines if e["event_type"] == "ai.response")  # the content itself is intact


@pytest.fixture()
def silent_server():
    """Accepts connections and reads them, but never answers."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held: list = []
    stop = threading.Event()

    def run() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield listener.getsockname()[1], held
    stop.set()
    t.join(2)
    for conn in held:
        conn.close()
    listener.close()


def test_webhook_close_is_bounded_and_counts_what_is_left_as_lost(silent_server) -> None:
    port, held = silent_server
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", batch_size=5, flush_interval=0.05, timeout=60)
    for i in range(5):
        sink.emit(ev(i))  # a full batch: sent at once, then waits for an answer that never comes
    deadline = time.monotonic() + 5
    while not held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held, "the webhook never connected"
    for i in range(5, 8):
        sink.emit(ev(i))  # queued behind it
    t0 = time.monotonic()
    sink.close(timeout=1.0)
    took = time.monotonic() - t0
    assert 0.9 <= took < 3.0
    assert sink.stats.lost == 8
    assert sink.stats.emitted == 0


def test_webhook_close_without_a_timeout_argument_is_bounded_too(silent_server) -> None:
    port, held = silent_server
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", batch_size=1, flush_interval=0.05, timeout=60)
    sink.emit(ev(1))
    closer = threading.Thread(target=sink.close, daemon=True)
    t0 = time.monotonic()
    closer.start()
    closer.join(15)
    assert not closer.is_alive()
    assert time.monotonic() - t0 < 10
    assert sink.stats.lost == 1
