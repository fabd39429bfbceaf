"""`oisp flows`: a live table of what each process talks to (FLOW/SOCKET events + sniffed packets)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time


def register(sub) -> None:
    p = sub.add_parser("flows", help="live table: which process talks to which address, how much",
                       description="Watch FLOW/SOCKET events and sniffed packets; each row is one flow of one "
                                   "process: protocol, local and remote address, bytes, packets, first/last seen.")
    p.add_argument("--process", metavar="NAME|PID", help="only these processes (names or pids, comma-separated)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: each flow when it changes")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--filter", default="tcp or udp", help='packets to count (default: "tcp or udp")')
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh every S seconds (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    from oisp.capture.flows import FlowCounters, render
    from oisp.divert.owners import EventFeed, ProcessNames, SocketOwners
    from oisp.capture.session import ProcessMatcher
    from oisp.divert.constants import Flag
    from oisp.divert.engine import Engine
    from oisp.divert.errors import DivertError, InvalidFilterError

    def note(message: str) -> None:
        print(f"oisp flows: {message}", file=sys.stderr, flush=True)

    names = ProcessNames()
    owners = SocketOwners(names)
    table = FlowCounters(owners, names)
    matcher = ProcessMatcher(args.process, names) if args.process else None
    try:
        engine = Engine(args.filter, flags=Flag.SNIFF, policy="drop", watchdog=None)
    except InvalidFilterError as exc:
        note(str(exc))
        return 2
    except DivertError as exc:
        note(str(exc))
        return 1
    try:
        feed = EventFeed(owners, on_events=table.add_events)
    except DivertError as exc:
        if args.process:
            engine.stop()
            note(str(exc))
            return 1
        feed = None
        note(f"no process names: {exc}")

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    live_table = not args.json and sys.stdout.isatty()
    note(f"watching {args.filter!r}" + (f" for process {args.process}" if args.process else ""))

    def show(final: bool) -> None:
        if args.json:
            for row in table.rows(only_changed=True, matcher=matcher):
                print(json.dumps(row), flush=True)
        elif live_table:
            print("\x1b[H\x1b[2J" + render(table.rows(matcher=matcher)), flush=True)  # clear, redraw
        elif final:
            print(render(table.rows(matcher=matcher)), flush=True)

    deadline = time.monotonic() + args.duration if args.duration is not None else None
    next_show = time.monotonic() + args.interval
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            batch = engine.next_batch(0.1)
            if batch is not None:
                try:
                    table.add_packets(batch.rows, batch.addresses["bits"], time.time())
                finally:
                    engine.release(batch)
            if time.monotonic() >= next_show:
                show(final=False)
                next_show = time.monotonic() + args.interval
    except BrokenPipeError:
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        engine.stop()
        if feed:
            feed.stop()
    show(final=True)
    return 0
