"""`oisp replay events.jsonl`: re-emit recorded events to the sinks, optionally in real time."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from typing import Any, Iterator

from oisp.events.redact import RedactionMode, Redactor
from oisp.sinks.options import add_sink_arguments, sinks_from_args


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("replay", help="re-emit events from a JSONL file to the sinks", description=__doc__)
    p.add_argument("file", help="a JSONL file of OISP events ('-' for stdin)")
    p.add_argument("--speed", type=float, default=0.0, help="replay at this multiple of the recorded pace (1 = real time; 0 = as fast as possible, the default)")
    p.add_argument("--redaction", choices=[m.value for m in RedactionMode], default="safe", help="redaction applied again before output (default safe)")
    add_sink_arguments(p, default_stdout=True)
    p.set_defaults(func=run)


def _ts(event: dict[str, Any]) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def read_events(lines: Iterator[str], errors: list[int]) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            errors.append(n)
            continue
        if isinstance(event, dict) and "event_type" in event:
            yield event
        else:
            errors.append(n)


def run(args: argparse.Namespace) -> int:
    fan = sinks_from_args(args)
    redactor = Redactor(args.redaction)
    bad_lines: list[int] = []
    count = 0
    fh = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    try:
        first_ts = start = None
        for event in read_events(iter(fh), bad_lines):
            ts = _ts(event)
            if args.speed > 0 and ts is not None:
                if first_ts is None:
                    first_ts, start = ts, time.monotonic()
                delay = (ts - first_ts) / args.speed - (time.monotonic() - start)  # type: ignore[operator]
                if delay > 0:
                    time.sleep(delay)
            fan.emit(redactor.apply(event))
            count += 1
    finally:
        if fh is not sys.stdin:
            fh.close()
        fan.close()
    report = fan.report()
    lost = sum(s["lost"] for s in report.values())
    print(f"replayed {count} events; {len(bad_lines)} unreadable lines; {lost} lost by sinks", file=sys.stderr)
    return 1 if lost else 0
