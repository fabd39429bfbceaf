"""Command-line options shared by every command that writes events, and the sinks they build."""

from __future__ import annotations

import argparse

from oisp.sinks.base import FanOut, Sink
from oisp.sinks.jsonl import JsonlSink
from oisp.sinks.stdout import StdoutSink
from oisp.sinks.webhook import WebhookSink, webhook_url


def add_sink_arguments(parser: argparse.ArgumentParser, *, default_stdout: bool, ui: bool = False) -> None:
    """``ui``: offer the live dashboard (commands that keep running, like record)."""
    g = parser.add_argument_group("output")
    g.add_argument("--jsonl", metavar="PATH", nargs="?", const="",
                   help="append events to a JSONL file (no PATH: the default file in the data directory)")
    g.add_argument("--jsonl-max-mb", type=float, default=64.0, help="rotate the JSONL file at this size (default 64)")
    g.add_argument("--webhook", metavar="URL|@FILE", help="POST batches of events to this URL, or to the one in FILE "
                   "(default: $OISP_WEBHOOK_URL); a URL on the command line is visible to every user in ps")
    g.add_argument("--otlp", metavar="URL", nargs="?", const="",
                   help="export spans, log records and metrics over OTLP to this base URL (no URL: "
                        "$OTEL_EXPORTER_OTLP_ENDPOINT, else localhost); the OTEL_EXPORTER_OTLP_* variables apply")
    g.add_argument("--otlp-protocol", choices=["http/protobuf", "grpc"],
                   help="OTLP transport (default: $OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf)")
    g.add_argument("--otlp-content", action="store_true",
                   help="also export conversation content (messages, completions, tools) over OTLP, redacted "
                        "(default: only its length; also $OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true)")
    g.add_argument("--stdout", action="store_true", default=default_stdout,
                   help="print events as JSON lines" + (" (default)" if default_stdout else ""))
    g.add_argument("--pretty", action="store_true", help="print one readable line per event instead of JSON")
    g.add_argument("--quiet", action="store_true", help="print nothing to stdout")
    if ui:
        from oisp.sinks.ui.server import DEFAULT_PORT

        g.add_argument("--ui", metavar="PORT", type=int, nargs="?", const=DEFAULT_PORT,
                       help=f"serve the live dashboard on this port (no PORT: {DEFAULT_PORT}; 0: any free port)")
        g.add_argument("--ui-host", metavar="ADDRESS", default="127.0.0.1",
                       help="address the dashboard listens on (default 127.0.0.1: this machine only)")


def sinks_from_args(args: argparse.Namespace) -> FanOut:
    sinks: list[Sink] = []
    if args.jsonl is not None:
        sinks.append(JsonlSink(args.jsonl or None, max_bytes=int(args.jsonl_max_mb * 1024 * 1024)))
    url = webhook_url(args.webhook)
    if url:
        sinks.append(WebhookSink(url))
    if getattr(args, "otlp", None) is not None:
        from oisp.sinks.otlp import OtlpSink, config

        try:
            target = config.resolve(args.otlp, getattr(args, "otlp_protocol", None))
        except config.OtlpConfigError as e:
            raise SystemExit(f"oisp: {e}") from None
        # its stats are an OtlpStats, a SinkStats (mypy holds a protocol's attribute to its exact type)
        sinks.append(OtlpSink(target, content=config.content_opt_in(getattr(args, "otlp_content", False))))  # type: ignore[arg-type]
    if (args.stdout or args.pretty) and not args.quiet:
        sinks.append(StdoutSink(pretty=args.pretty))
    if getattr(args, "ui", None) is not None:
        from oisp.sinks.ui import UISink

        sinks.append(UISink(host=args.ui_host, port=args.ui))
    return FanOut(sinks)
