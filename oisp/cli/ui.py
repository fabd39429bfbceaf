"""`oisp ui FILE.jsonl`: the live dashboard over a recorded file, following it while it grows.

The page is the one `oisp record --ui` serves. It listens on 127.0.0.1 unless --host says
otherwise, and answers only requests carrying the token in the printed URL.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def register(sub) -> None:
    from oisp.sinks.ui.server import DEFAULT_PORT

    parser = sub.add_parser("ui", help="the live dashboard over a JSONL file of events",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", metavar="FILE", help="JSONL file of events (read from the start, then followed)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from oisp.sinks.ui import EventStore, Follower, UIServer

    store = EventStore()
    follower = Follower(args.file, store)
    try:
        server = UIServer(store, host=args.host, port=args.port, health=follower.status)
    except OSError as e:
        print(f"oisp ui: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    follower.start()
    server.start()
    print(server.url, flush=True)
    print(f"oisp ui: serving {args.file}; Ctrl-C to stop", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    follower.stop()
    server.stop()
    return 0
