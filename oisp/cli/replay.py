"""`oisp replay events.jsonl`: re-emit recorded events to the sinks, optionally in real time.

A line that is not one OISP event (not UTF-8 JSON, not an object with an
event_type, longer than MAX_LINE_BYTES) is skipped and counted; the rest of the
file is replayed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Iterator

from oisp.events.redact import RedactionMode, Redactor
from oisp.sinks.options import add_sink_arguments, sinks_from_args

MAX_LINE_BYTES = 16 * 1024 * 1024  # far above any event oisp writes; a longer line is not read into memory
MAX_WAIT = 3600.0  # a longer pause before an event (a clock jump, a damaged ts) is skipped: the pace restarts there


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("replay", help="re-emit events from a JSONL file to the sinks", description=__doc__)
    p.add_argument("file", help="a JSONL file of OISP events ('-' for stdin)")
    p.add_argument("--speed", type=float, default=0.0,
                   help="replay at this multiple of the recorded pace (1 = real time; 0 = as fast as possible, the default)")
    p.add_argument("--redaction", choices=[m.value for m in RedactionMode], default="safe",
                   help="redaction applied again before output (default safe)")
    add_sink_arguments(p, default_stdout=True)
    p.set_defaults(func=run)


def _ts(event: dict[str, Any]) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError, OverflowError, OSError):
        return None


@dataclass
class Unreadable:
    count: int = 0
    first: list[int] = field(default_factory=list)  # the first few line numbers, for the message

    def add(self, line_no: int) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(line_no)


def lines(fh: BinaryIO) -> Iterator[bytes | None]:
    """Each line of ``fh``; None for a line longer than MAX_LINE_BYTES, which is skipped to its end."""
    while line := fh.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        del line
        while (rest := fh.readline(65536)) and not rest.endswith(b"\n"):
            pass
        yield None


def read_events(lines: Iterable[bytes | None], errors: Unreadable) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(lines, 1):
        if line is not None and not line.strip():
            continue
        try:
            event = json.loads(line) if line is not None else None
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep to parse
            event = None
        if isinstance(event, dict) and "event_type" in event:
            yield event
        else:
            errors.add(n)


def run(args: argparse.Namespace) -> int:
    try:
        fh = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as e:
        print(f"oisp replay: {e}", file=sys.stderr)
        return 2
    fan = sinks_from_args(args)
    redactor = Redactor(args.redaction)
    bad = Unreadable()
    count = 0
    try:
        first_ts = start = None
        for event in read_events(lines(fh), bad):
            ts = _ts(event)
            if args.speed > 0 and ts is not None:
                delay = (ts - first_ts) / args.speed - (time.monotonic() - start) if first_ts is not None else None  # type: ignore[operator]
                if delay is None or delay > MAX_WAIT:  # the first event, or one after a jump: the pace is measured from here
                    first_ts, start, delay = ts, time.monotonic(), 0.0
                if delay > 0:
                    time.sleep(delay)
            fan.emit(redactor.apply(event))
            count += 1
    except OSError as e:
        print(f"oisp replay: {args.file}: {e}", file=sys.stderr)
        return 2
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()
        fan.close()
    report = fan.report()
    lost = sum(s["lost"] for s in report.values())
    where = f" (lines {', '.join(map(str, bad.first))}{', ...' if bad.count > len(bad.first) else ''})" if bad.count else ""
    print(f"replayed {count} events; {bad.count} unreadable lines{where}; {lost} lost by sinks", file=sys.stderr)
    return 1 if lost else 0
