"""`oisp replay`: events from a JSONL file back to the sinks, redacted again, at a chosen pace."""

from __future__ import annotations

import json
import time

from oisp.cli import main
from oisp.events import make_event


def write_events(path, n: int, gap: float, secret: str = "") -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps(make_event("network.connect", {"dest": {"ip": "1.2.3.4", "port": 443, "domain": f"h{i}{secret}"}},
                                           1700000000 + i * gap)) + "\n")
        fh.write("not json\n")


def test_replay_to_jsonl_and_stdout(tmp_path, capsys) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_events(src, 5, 0.0, secret=" sk-proj-ReplayedSecret000000000000")
    assert main(["replay", str(src), "--jsonl", str(dst)]) == 0
    out = capsys.readouterr()
    printed = [json.loads(line) for line in out.out.splitlines()]
    stored = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(printed) == len(stored) == 5
    assert "ReplayedSecret" not in out.out + dst.read_text()
    assert "1 unreadable lines" in out.err


def test_replay_speed(tmp_path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    write_events(src, 3, 0.5)
    t0 = time.monotonic()
    assert main(["replay", str(src), "--speed", "2", "--quiet"]) == 0
    assert 0.45 <= time.monotonic() - t0 < 2.0  # 1 s of recording at 2× speed
    t0 = time.monotonic()
    main(["replay", str(src), "--quiet"])
    assert time.monotonic() - t0 < 0.4


def test_damaged_lines_are_counted_and_the_rest_replayed(tmp_path, capsys) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_events(src, 2, 0.0)  # two events and "not json"
    good = src.read_bytes()
    damaged = [
        b"\xff\xfe not utf-8 \x80\n",  # bytes that are no text
        b"[" * 100_000 + b"\n",  # nested deeper than the parser recurses
        b'{"event_type": "x", "data": ' + b"1" * (17 * 1024 * 1024) + b"}\n",  # longer than MAX_LINE_BYTES
        b"[1, 2]\n",  # JSON, but no event
    ]
    src.write_bytes(good + b"".join(damaged) + good)
    assert main(["replay", str(src), "--jsonl", str(dst), "--quiet"]) == 0
    assert len(dst.read_text().splitlines()) == 4
    assert "6 unreadable lines" in capsys.readouterr().err


def test_an_overlong_line_is_not_read_into_memory(tmp_path, capsys) -> None:
    import tracemalloc

    src = tmp_path / "in.jsonl"
    with src.open("wb") as fh:
        fh.write(b'{"event_type": "network.connect", "data": "' + b"x" * (64 * 1024 * 1024) + b'"}\n')
    write_events(tmp_path / "tail.jsonl", 1, 0.0)
    with src.open("ab") as fh:
        fh.write((tmp_path / "tail.jsonl").read_bytes())
    tracemalloc.start()
    try:
        assert main(["replay", str(src), "--quiet"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024, f"peak {peak >> 20} MiB"  # the 64 MiB line was skipped in pieces
    assert "replayed 1 events; 2 unreadable lines" in capsys.readouterr().err


def test_missing_file_is_a_clean_error(tmp_path, capsys) -> None:
    assert main(["replay", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_a_jump_in_time_is_not_waited_for(tmp_path, capsys) -> None:
    """An event years after the one before (a damaged ts) restarts the pace instead of sleeping for years."""
    src = tmp_path / "in.jsonl"
    events = [make_event("network.connect", {"dest": {"ip": "1.2.3.4", "port": 443}}, ts) for ts in (1700000000.0, 1700000000.2)]
    late = make_event("network.connect", {"dest": {"ip": "1.2.3.4", "port": 443}}, 1700000000.0)
    late["ts"] = "9999-12-31T23:59:59Z"
    src.write_text("".join(json.dumps(e) + "\n" for e in (*events, late)))
    t0 = time.monotonic()
    assert main(["replay", str(src), "--speed", "1", "--quiet"]) == 0
    assert 0.15 <= time.monotonic() - t0 < 2.0
    assert "replayed 3 events" in capsys.readouterr().err
