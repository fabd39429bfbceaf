"""`oisp replay`: events from a JSONL file back to the sinks, redacted again, at a chosen pace."""

from __future__ import annotations

import json
import time

from oisp.cli import main
from oisp.events import make_event


def write_events(path, n: int, gap: float, secret: str = "") -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps(make_event("network.connect", {"dest": {"ip": "1.2.3.4", "port": 443, "domain": f"h{i}{secret}"}}, 1700000000 + i * gap)) + "\n")
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
