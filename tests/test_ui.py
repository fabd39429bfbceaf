"""The dashboard's parts without a browser: the bounded store, the JSONL follower, and the sink,
whose emit() must never wait for a page (a real server and a real socket that never reads)."""

from __future__ import annotations

import json
import os
import socket
import time
from urllib.parse import urlsplit

from oisp.sinks import FanOut
from oisp.sinks.ui import EventStore, Follower, UISink
from oisp.sinks.ui.server import allowed_hosts


def ev(i: int, size: int = 0) -> dict:
    return {"event_type": "ai.request", "ts": "2026-12-02T00:00:00Z", "data": {"request_id": f"r{i}", "pad": "x" * size}}


def seqs(lines: list[bytes]) -> list[str]:
    return [json.loads(line)["data"]["request_id"] for line in lines]


def test_store_keeps_the_newest_within_its_count_and_counts_the_rest() -> None:
    store = EventStore(max_events=100)
    for i in range(1000):
        store.add_events([ev(i)])
    assert len(store) <= 100
    assert store.evicted == 1000 - len(store)
    lines, last, skipped = store.since(0, max_bytes=1 << 30)
    assert seqs(lines) == [f"r{i}" for i in range(1000 - len(store), 1000)]
    assert last == 1000
    assert skipped == store.evicted
    assert store.since(last) == ([], last, 0)
    assert store.add_events([{"event_type": "ai.streaming_chunk", "data": {}}]) == 0  # not kept: the page has no use


def test_store_bounds_bytes_and_batches_reads() -> None:
    store = EventStore(max_events=10**6, max_bytes=100_000)
    store.add_events(ev(i, 1000) for i in range(500))
    assert sum(len(line) for line in store.since(0, max_bytes=1 << 30)[0]) <= 100_000
    lines, last, _ = store.since(store.last_seq - 50, max_bytes=5000)
    assert 1 <= len(lines) <= 5
    assert last == store.last_seq - 50 + len(lines)


def test_follower_reads_whole_lines_and_survives_truncation_rotation_and_garbage(tmp_path) -> None:
    path = tmp_path / "e.jsonl"
    store = EventStore()
    f = Follower(path, store, max_line=5000)
    f.poll_once()  # no file yet: nothing, no error
    with open(path, "wb") as fh:
        fh.write(json.dumps(ev(1)).encode() + b"\nnot json\n" + json.dumps(ev(2)).encode()[:10])
    f.poll_once()
    assert seqs(store.since(0)[0]) == ["r1"]
    assert f.counts["bad_lines"] == 1
    with open(path, "ab") as fh:
        fh.write(json.dumps(ev(2)).encode()[10:] + b"\n" + b"y" * 6000 + b"\n" + json.dumps(ev(3)).encode() + b"\n")
    f.poll_once()
    assert seqs(store.since(0)[0]) == ["r1", "r2", "r3"]
    assert f.counts["too_long"] == 1

    os.truncate(path, 0)  # truncated and rewritten shorter
    with open(path, "ab") as fh:
        fh.write(json.dumps(ev(4)).encode() + b"\n")
    f.poll_once()
    assert f.counts["truncations"] == 1
    assert seqs(store.since(3)[0]) == ["r4"]

    with open(path, "ab") as fh:  # written just before the rotation: still read
        fh.write(json.dumps(ev(5)).encode() + b"\n")
    os.replace(path, tmp_path / "e.jsonl.1")
    with open(path, "wb") as fh:
        fh.write(json.dumps(ev(6)).encode() + b"\n")
    f.poll_once()
    assert f.counts["rotations"] == 1
    assert seqs(store.since(4)[0]) == ["r5", "r6"]
    f.stop()


def test_emit_never_waits_for_a_page_that_does_not_read() -> None:
    """A page that opened the stream and stopped reading, and a queue the pump cannot keep up
    with: emit() stays quick, and what is dropped is counted, never blocked on."""
    sink = UISink(port=0, max_pending=1000)
    parts = urlsplit(sink.url)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", parts.port))
    stuck.sendall(f"GET /api/stream?{parts.query} HTTP/1.1\r\nHost: 127.0.0.1:{parts.port}\r\n\r\n".encode())
    fan = FanOut([sink])
    n, slowest = 50_000, 0.0
    started = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        fan.emit(ev(i, 2000))  # ~100 MB for a page that reads nothing
        slowest = max(slowest, time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    sink.close()  # the pump's last move: everything queued is in the store
    stuck.close()
    report = fan.report()["ui"]
    assert report["emitted"] + report["lost"] == n
    assert sink.store.last_seq == report["emitted"]
    assert report["lost"] > 0  # 50,000 emits outran a 1,000-deep queue emptied every 50 ms
    # generous bounds: a blocked emit would take the whole socket timeout (30 s)
    assert slowest < 1.0, (slowest, elapsed)
    assert elapsed < 20, (slowest, elapsed)


def test_allowed_hosts() -> None:
    assert allowed_hosts("127.0.0.1", 7878) == {"127.0.0.1:7878", "localhost:7878", "[::1]:7878"}
    assert "192.168.1.5:80" in allowed_hosts("192.168.1.5", 80)
    assert "[fd00::1]:80" in allowed_hosts("fd00::1", 80)
    assert allowed_hosts("0.0.0.0", 80) == allowed_hosts("127.0.0.1", 80)
