"""`oisp record`: the main job. Redirects the connections of local programs to AI
endpoints into the TLS-terminating proxy and writes what they send and receive
as OISP events.

Order matters for failing open: the proxy listens before any flow is
reflected to it, and on stop the redirector goes first, so no connection is
ever reflected into a proxy that is not there.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from oisp.sinks.options import add_sink_arguments, sinks_from_args

DEFAULT_PROXY_PORT = 8443


def register(sub) -> None:
    parser = sub.add_parser("record", help="record what local programs send to AI providers (needs root)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="JSONL file of events (default: events.jsonl in the data directory)")
    parser.add_argument("--process", default="", help="only these programs: names or pids, comma-separated")
    parser.add_argument("--exclude", default="", help="never these programs: names or pids, comma-separated")
    parser.add_argument("--upstream-ca", metavar="FILE", help="also trust this CA for upstream servers (lab setups)")
    parser.add_argument("--no-upstream-verify", action="store_true",
                        help="do not verify upstream certificates (unsafe; for lab setups only)")
    parser.add_argument("--keylog", metavar="FILE", help="write TLS keys (SSLKEYLOGFILE format) for Wireshark")
    parser.add_argument("--spec", metavar="FILE", help="AI endpoint spec to use instead of the bundled one")
    parser.add_argument("--proxy-port", type=int, default=DEFAULT_PROXY_PORT, help="local proxy port (default 8443)")
    parser.add_argument("--redaction", choices=["safe", "full", "minimal"], default="safe")
    parser.add_argument("--streaming-chunks", action="store_true", help="also emit ai.streaming_chunk events")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    add_sink_arguments(parser, default_stdout=False, ui=True)
    parser.set_defaults(func=run)


class Status:
    """Counts for the live status line."""

    def __init__(self):
        self.requests = self.responses = self.tokens = 0

    def see(self, event: dict) -> None:
        kind = event.get("event_type")
        if kind == "ai.request":
            self.requests += 1
        elif kind == "ai.response":
            self.responses += 1
            self.tokens += int((event.get("data", {}).get("usage") or {}).get("total_tokens") or 0)


def run(args) -> int:
    from oisp.divert.preflight import check_privileges

    problems = check_privileges()
    if problems:
        for problem in problems:
            print(f"oisp record: {problem.message}\n  fix: {problem.fix}", file=sys.stderr)
        return 3
    if args.jsonl is None:
        args.jsonl = args.output or ""
    # The reflector thread decides each new flow's SYN in Python: with the default 5 ms
    # switch interval it waits for the event loop's longer stretches (decoding) to end.
    # 0.2 ms: new connections +8 %, kept-alive +2 %, concurrent unchanged (A/B, lean lab).
    sys.setswitchinterval(0.0002)
    try:
        return asyncio.run(_record(args))
    except KeyboardInterrupt:
        return 0


async def _record(args) -> int:
    from oisp.events import Redactor
    from oisp.proxy.ca import CertificateAuthority
    from oisp.proxy.certs import LeafIssuer
    from oisp.proxy.server import Target, TransparentProxy
    from oisp.redirect import Redirector
    from oisp.spec import load_spec

    spec = load_spec(args.spec)
    ca = CertificateAuthority.load_or_create()
    print(f"oisp record: CA {ca.cert_path}\n  trust it system-wide: sudo oisp ca install"
          f"\n  or per shell: eval \"$(oisp ca env)\"", file=sys.stderr)
    sinks = sinks_from_args(args)
    status = Status()

    def emit(events: list[dict]) -> None:
        for event in events:
            status.see(event)
            sinks.emit(event)

    redirector = Redirector(spec, proxy_ports={443: args.proxy_port}, include=args.process, exclude=args.exclude)

    def lookup(peer_addr: str, peer_port: int, name_owner: bool = False):
        entry = redirector.flows.lookup(peer_addr, peer_port, args.proxy_port, name_owner=name_owner)
        if entry is None:
            return None
        return Target(client=(str(entry.client_addr), entry.client_port),
                      server=(str(entry.server_addr), entry.server_port), pid=entry.pid,
                      process_name=entry.process_name)

    proxy = TransparentProxy(
        lookup=lookup, name_owner=lambda peer_addr, peer_port: lookup(peer_addr, peer_port, True),
        issuer=LeafIssuer(ca, keylog_filename=args.keylog), spec=spec,
        own_ports=redirector.own_ports,
        upstream_verify=not args.no_upstream_verify, upstream_cafile=args.upstream_ca, keylog=args.keylog,
        on_events=emit, recorder_options={"redactor": Redactor(args.redaction),
                                          "streaming_chunks": args.streaming_chunks})
    await proxy.start(args.proxy_port)
    ui = next((sink for sink in sinks.sinks if sink.name == "ui"), None)
    if ui is not None:
        from oisp.sinks.ui.health import ca_trusted, record_status

        trusted = ca_trusted(ca)

        def ui_status() -> None:
            ui.set_status(record_status(proxy=proxy, redirector=redirector, sinks=sinks, status=status, ca=ca,
                                        trusted=trusted))

        print(f"oisp record: dashboard {ui.url}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, redirector.start)
    for note in redirector.notes:
        print(f"oisp record: note: {note}", file=sys.stderr)
    print(f"oisp record: recording (proxy :{args.proxy_port}); Ctrl-C to stop", file=sys.stderr, flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    live = sys.stderr.isatty()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            if args.duration and time.monotonic() - started >= args.duration:
                break
            if ui is not None:
                ui_status()
            if live:
                engine = redirector.counters()["reflector"].get("engine", {})
                print(f"\rflows {proxy.stats['intercepted']}+{proxy.stats['passed_through']}  "
                      f"requests {status.requests}  responses {status.responses}  tokens {status.tokens}  "
                      f"drops {engine.get('dropped', 0)}   ", end="", file=sys.stderr, flush=True)
    finally:
        await loop.run_in_executor(None, redirector.stop)  # first: nothing new reaches the proxy
        await proxy.stop()
        await proxy.drain(timeout=2.0)
        sinks.close()
        for name, stats in sinks.report().items():
            if stats["lost"]:
                print(f"oisp record: sink {name} lost {stats['lost']} events ({stats['last_error']})", file=sys.stderr)
        if live:
            print(file=sys.stderr)
        print(f"oisp record: {status.requests} requests, {status.responses} responses, {status.tokens} tokens",
              file=sys.stderr)
    return 0
