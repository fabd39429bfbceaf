"""`oisp decode capture.pcapng`: run the decoders over the plaintext TCP in a capture.

Each TCP connection in the file is reassembled and fed to the same
FlowRecorder the live proxy uses, so the events are the ones a live capture
of that traffic would emit (e.g. local Ollama on port 11434 over loopback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from oisp.decode import Direction, FlowContext
from oisp.events import FlowRecorder, RedactionMode, Redactor
from oisp.events.attribution import ProcessAttributor
from oisp.pcapng import CaptureFormatError, FlowClosed, FlowData, TcpReassembler, parse_segment, read_packets
from oisp.pcapng.reader import ReadStats
from oisp.sinks.options import add_sink_arguments, sinks_from_args
from oisp.spec import load_spec


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("decode", help="decode AI traffic from a pcapng/pcap capture", description=__doc__)
    p.add_argument("capture", help="a pcapng or pcap file")
    p.add_argument("--port", type=int, action="append", default=[], help="only TCP connections to this server port (repeatable)")
    p.add_argument("--all-http", action="store_true", help="emit network.flow for every HTTP exchange, not only AI ones")
    p.add_argument("--streaming-chunks", action="store_true", help="emit one ai.streaming_chunk event per streamed piece")
    p.add_argument("--redaction", choices=[m.value for m in RedactionMode], default="safe")
    p.add_argument("--spec", help="AI endpoint spec file (default: $OISP_SPEC or the bundled one)")
    add_sink_arguments(p, default_stdout=True)
    p.set_defaults(func=run)


def decode_capture(path: str, emit, *, ports: list[int] | None = None, spec=None, redactor=None, all_http: bool = False,
                   streaming_chunks: bool = False) -> dict[str, Any]:
    """Decode every TCP connection of a capture; ``emit(event)`` receives each event. Returns counters.

    A capture damaged part way is decoded up to the damage, its connections
    closed there, and the reason returned as ``counts["damaged"]``; a file that
    is no capture at all raises CaptureFormatError.
    """
    spec = spec or load_spec()
    redactor = redactor or Redactor()
    attributor = ProcessAttributor()
    recorders: dict[int, FlowRecorder] = {}
    held_connect: dict[int, dict] = {}
    counts: dict[str, Any] = {"packets": 0, "connections": 0, "events": 0, "decode_errors": 0, "skipped_blocks": 0, "tcp_gaps": 0,
                              "damaged": None}
    read_stats = ReadStats()

    def segments():
        packets = read_packets(path, read_stats)
        try:
            for pkt in packets:
                seg = parse_segment(pkt)
                if seg is not None:
                    counts["packets"] += 1
                    yield seg
        except CaptureFormatError as e:
            if not counts["packets"] and not read_stats.skipped:
                raise  # nothing was readable: not a capture
            counts["damaged"] = str(e)

    reassembler = TcpReassembler()
    for item in reassembler.segments(segments()):
        flow = item.flow
        if ports and flow.server[1] not in ports:
            continue
        rec = recorders.get(id(flow))
        if rec is None:
            ctx = FlowContext(client=flow.client, server=flow.server, start_ts=flow.start_ts,
                              flow_id=f"{flow.client[0]}:{flow.client[1]}-{flow.server[0]}:{flow.server[1]}")
            rec = recorders[id(flow)] = FlowRecorder(ctx, spec=spec, redactor=redactor, attributor=attributor,
                                                     streaming_chunks=streaming_chunks, capture_method="other", all_http=all_http)
            counts["connections"] += 1
        if isinstance(item, FlowData):
            events = rec.feed(Direction.REQUEST if item.from_client else Direction.RESPONSE, item.data, item.ts)
        else:
            assert isinstance(item, FlowClosed)
            events = rec.close(item.ts)
            counts["decode_errors"] += rec.stats.decode_errors
        # A capture holds every connection, the proxy only the intercepted ones: a connection's
        # network.connect is emitted once it has produced an event of its own.
        for event in events:
            if event["event_type"] == "network.connect":
                held_connect[id(flow)] = event
                continue
            connect = held_connect.pop(id(flow), None)
            for out in (connect, event) if connect else (event,):
                emit(out)
                counts["events"] += 1
    counts["skipped_blocks"], counts["tcp_gaps"] = read_stats.skipped, reassembler.gaps
    counts["problems"] = read_stats.problems
    return counts


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec) if args.spec else None
    except OSError as e:
        print(f"oisp decode: {e}", file=sys.stderr)
        return 2
    except (ValueError, LookupError, TypeError, AttributeError) as e:  # what Spec.from_dict meets in a file of another shape
        print(f"oisp decode: {args.spec}: not an AI endpoint spec ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    fan = sinks_from_args(args)
    try:
        counts = decode_capture(
            args.capture, fan.emit, ports=args.port, spec=spec, redactor=Redactor(args.redaction),
            all_http=args.all_http, streaming_chunks=args.streaming_chunks,
        )
    except (OSError, CaptureFormatError) as e:
        print(f"oisp decode: {e}", file=sys.stderr)
        return 2
    finally:
        fan.close()
    print(
        f"{counts['packets']} TCP packets, {counts['connections']} connections, {counts['events']} events, "
        f"{counts['decode_errors']} decode errors, "
        f"{counts['skipped_blocks']} unreadable blocks skipped, {counts['tcp_gaps']} gaps in TCP streams",
        file=sys.stderr,
    )
    for problem in counts["problems"]:
        print(f"oisp decode: skipped: {problem}", file=sys.stderr)
    if counts["damaged"]:
        print(f"oisp decode: {args.capture}: {counts['damaged']}; decoded what came before", file=sys.stderr)
        return 1
    return 0
