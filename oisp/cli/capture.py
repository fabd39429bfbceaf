"""`oisp capture -w FILE`: matching packets to pcapng, in sniff mode (nothing is delayed)."""

from __future__ import annotations

import signal
import sys


def register(sub) -> None:
    p = sub.add_parser("capture", help="write matching packets to a pcapng file",
                       description="Capture packets to pcapng (readable by tshark and Wireshark), with interface, "
                                   "direction and, where known, the process as a packet comment.")
    p.add_argument("-w", "--write", required=True, metavar="FILE", help='pcapng file to write, "-" for stdout')
    p.add_argument("--filter", default="true", help='WinDivert filter language (default: "true", everything)')
    p.add_argument("--process", metavar="NAME|PID", help="keep only packets of these processes (names or pids, comma-separated)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N packets")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--progress", action="store_true", default=None,
                   help="show the live progress line even when stderr is not a terminal")
    p.add_argument("--no-process-info", dest="attribute", action="store_false",
                   help="do not watch SOCKET/FLOW events to name each packet's process")
    p.set_defaults(func=run)


def run(args) -> int:
    from oisp.capture.progress import Progress, human_bytes
    from oisp.capture.session import Capture
    from oisp.divert.errors import DivertError, InvalidFilterError
    from oisp.pcapng.writer import PcapngWriter

    def note(message: str) -> None:
        print(f"oisp capture: {message}", file=sys.stderr)

    if args.write == "-" and sys.stdout.isatty():
        note("refusing to write pcapng to a terminal; redirect stdout or use -w FILE")
        return 2
    try:
        writer = PcapngWriter.open(args.write)
    except OSError as exc:
        note(f"cannot write {args.write}: {exc.strerror or exc}")
        return 2
    try:
        capture = Capture(writer, args.filter, count=args.count, duration=args.duration, process=args.process,
                          attribute=args.attribute, progress=Progress(enabled=args.progress), on_note=note)
    except InvalidFilterError as exc:
        writer.close()
        note(str(exc))
        return 2
    except DivertError as exc:
        writer.close()
        note(str(exc))
        return 1

    note(f"capturing {args.filter!r} to {'stdout' if args.write == '-' else args.write}")  # ready, like tcpdump's line

    def stop(signum, frame):
        capture.stop_requested.set()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stats = capture.run()
    except BrokenPipeError:
        return 0  # the reader of -w - went away: that ends the capture
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            writer.close()
        except BrokenPipeError:
            pass
    note(f"{stats.packets:,} packets ({human_bytes(stats.bytes)}) written to "
         f"{'stdout' if args.write == '-' else args.write}; {stats.received:,} seen, {stats.dropped:,} dropped")
    return 0
