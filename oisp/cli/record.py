"""`oisp record`: the main job. Redirects the connections of local programs to AI
endpoints into the TLS-terminating proxy and writes what they send and receive
as OISP events.

Order matters for failing open: the proxy listens before any flow is
reflected to it, and on stop the redirector first stops taking new
connections, the proxy drains and then cuts the ones in flight, and only then
does the redirector go, so no connection is reflected into a proxy that is
not there, nor left waiting on one.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from oisp.cli.configured import add_config_option
from oisp.sinks.options import add_sink_arguments, sinks_from_args

DEFAULT_PROXY_PORT = 8443
DRAIN = 2.0  # seconds a clean stop gives connections in flight before cutting them


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
    parser.add_argument("--prices", metavar="FILE",
                        help="prices (USD per million tokens) overriding or adding to the bundled table (default: $OISP_PRICES)")
    parser.add_argument("--plain", action="append", default=[], metavar="[HOST:]PORT[=PROVIDER]",
                        help="also record plaintext HTTP to a model server on this port: on loopback and local "
                             "networks, or only to HOST; PROVIDER (a spec id: ollama, vllm, llamacpp, …) names "
                             "it in events (repeatable). The spec's local server ports are watched already")
    parser.add_argument("--no-local", action="store_true",
                        help="do not watch the spec's local model server ports (11434, 1234, 8000, 8080, …)")
    parser.add_argument("--allow-quic", action="store_true",
                        help="let QUIC (HTTP/3, UDP 443) to AI addresses through unrecorded; by default it is "
                             "refused, so clients fall back to TCP, where they are recorded")
    parser.add_argument("--proxy-port", type=tcp_port, default=DEFAULT_PROXY_PORT, help="local proxy port (default 8443)")
    parser.add_argument("--flow-idle-timeout", type=seconds, default=300.0, metavar="SECONDS",
                        help="forget a redirected connection after this long without packets, unless the proxy "
                             "still holds it open (default 300)")
    parser.add_argument("--redaction", choices=["safe", "full", "minimal"], default="safe")
    parser.add_argument("--streaming-chunks", action="store_true", help="also emit ai.streaming_chunk events")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    add_sink_arguments(parser, default_stdout=False, ui=True)
    add_config_option(parser)
    parser.set_defaults(func=run)


def plain_ports(spec, values: list[str], *, local: bool = True, reserved=frozenset()):
    """The spec (with `=PROVIDER` choices applied) and the plaintext ports to watch: the
    spec's local server ports unless not `local`, plus each `--plain` value."""
    from oisp.redirect.plain import PlainPorts, PlainSpecError, parse_plain, resolve_host

    requests = [parse_plain(v) for v in values]
    clash = sorted({r.port for r in requests} & set(reserved))
    if clash:
        raise PlainSpecError(f"port {clash[0]} is the HTTPS path's (443) or the proxy's own")
    spec = spec.with_port_providers({r.port: r.provider for r in requests if r.provider})
    ports = [p for p in spec.local_ports() if p not in reserved] if local else []
    plain = PlainPorts.build(ports, requests, resolve_host)
    for port, entry in plain.ports.items():  # named in the banner: the provider events will name
        found = spec.provider_for(None, port)
        entry.provider = entry.provider or (found.id if found else None)
    return spec, plain


def quic_refused_event(flow: dict) -> dict:
    """The network.connect event of a QUIC connection attempt refused (see oisp.redirect.quic)."""
    from oisp.events import make_event

    data = {"dest": {"ip": flow["server"][0], "port": flow["server"][1]},
            "src": {"ip": flow["client"][0], "port": flow["client"][1]}, "protocol": "udp", "success": False}
    return make_event("network.connect", data, flow["ts"], completeness="partial",
                      reasons=["quic_refused: QUIC to an AI address was refused so the client falls back to TCP, "
                               "where it is recorded"])


def tcp_port(text: str) -> int:
    """A port a client's connection can be reflected to: 1..65535 (0 would mean "any" to
    bind, but the reflector must know the port before the proxy listens)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1..65535)")
    return port


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


class Status:
    """Counts for the live status line."""

    def __init__(self):
        self.requests = self.responses = self.tokens = self.unpriced = 0
        self.usd = 0.0

    def see(self, event: dict) -> None:
        kind = event.get("event_type")
        if kind == "ai.request":
            self.requests += 1
        elif kind == "ai.response":
            self.responses += 1
            usage = event.get("data", {}).get("usage") or {}
            self.tokens += int(usage.get("total_tokens") or 0)
            if "cost" in usage:
                self.usd += usage["cost"]["usd"]
            elif usage:  # tokens were spent on a model the price table does not know
                self.unpriced += 1

    @property
    def cost(self) -> str:
        """The running estimate; "+?" says some calls had no price."""
        return f"~${self.usd:.{4 if self.usd >= 0.01 else 6}f}" + ("+?" if self.unpriced else "")


def run(args) -> int:
    from oisp.divert.preflight import check_fail_open, check_privileges, sweep_orphaned_filters

    from oisp.events.cost import PriceTableError, load_prices

    try:
        args.price_table = load_prices(args.prices)
    except PriceTableError as e:
        print(f"oisp record: {e}", file=sys.stderr)
        return 2
    problems = check_privileges()
    if problems:
        for problem in problems:
            print(f"oisp record: {problem.message}\n  fix: {problem.fix}", file=sys.stderr)
        return 3
    if removed := sweep_orphaned_filters():  # black-holing traffic since their process died
        print(f"oisp record: removed {removed} eBPFDivert filters a dead process had left", file=sys.stderr)
    for problem in check_fail_open():
        print(f"oisp record: note: {problem.message}\n  fix: {problem.fix}", file=sys.stderr)
    if args.jsonl is None:
        args.jsonl = args.output or ""
    # The reflector thread decides each new flow's SYN in Python: with the default 5 ms
    # switch interval it waits for the event loop's longer stretches (decoding) to end.
    # 0.2 ms: new connections +8 %, kept-alive +2 %, concurrent unchanged (A/B, lean lab).
    sys.setswitchinterval(0.0002)
    _raise_open_file_limit()
    try:
        return asyncio.run(_record(args))
    except KeyboardInterrupt:
        return 0


def _raise_open_file_limit() -> None:
    """Each proxied connection holds two descriptors (client and upstream): the usual soft
    limit of 1024 runs out near 500 connections. The hard limit is ours to take."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # the soft limit stays: the proxy copes with running out (see ACCEPT_GIVE_UP)


async def _record(args) -> int:
    from oisp.events import Redactor
    from oisp.proxy.ca import CertificateAuthority
    from oisp.proxy.certs import LeafIssuer
    from oisp.proxy.server import Destination, TransparentProxy
    from oisp.redirect import Redirector
    from oisp.spec import load_spec

    from oisp.redirect.plain import PlainSpecError

    spec = load_spec(args.spec)
    try:
        spec, plain = plain_ports(spec, args.plain, local=not args.no_local, reserved={443, args.proxy_port})
    except (PlainSpecError, KeyError) as e:
        print(f"oisp record: --plain: {e}", file=sys.stderr)
        return 2
    ca = CertificateAuthority.load_or_create()
    print(f"oisp record: CA {ca.cert_path}\n  trust it system-wide: sudo oisp ca install"
          f"\n  or per shell: eval \"$(oisp ca env)\"", file=sys.stderr)
    sinks = sinks_from_args(args)
    status = Status()

    def emit(events: list[dict]) -> None:
        for event in events:
            status.see(event)
            sinks.emit(event)

    stop = asyncio.Event()
    proxy_failed: list[str] = []  # kept: the proxy's own failure clears once it serves again
    redirector = Redirector(spec, proxy_ports={443: args.proxy_port}, include=args.process, exclude=args.exclude,
                            idle_timeout=args.flow_idle_timeout, plain=plain, refuse_quic=not args.allow_quic,
                            on_quic_refused=lambda flow: loop.call_soon_threadsafe(emit, [quic_refused_event(flow)]))
    loop = asyncio.get_running_loop()

    def lookup(peer_addr: str, peer_port: int, name_owner: bool = False, proxy_port: int = args.proxy_port):
        entry = redirector.flows.lookup(peer_addr, peer_port, proxy_port, name_owner=name_owner)
        if entry is None:
            return None
        return Destination(client=(str(entry.client_addr), entry.client_port),
                      server=(str(entry.server_addr), entry.server_port), pid=entry.pid,
                      process_name=entry.process_name, flow=entry)

    issuer = LeafIssuer(ca, keylog_filename=args.keylog)
    proxy = TransparentProxy(
        lookup=lookup, name_owner=lambda peer_addr, peer_port: lookup(peer_addr, peer_port, True),
        issuer=issuer, spec=spec, own_ports=redirector.own_ports,
        upstream_verify=not args.no_upstream_verify, upstream_cafile=args.upstream_ca,
        keylog=issuer.keylog_filename,  # the safely opened key log, never the path as given
        on_events=emit, recorder_options={"redactor": Redactor(args.redaction, spec=spec), "prices": args.price_table,
                                          "streaming_chunks": args.streaming_chunks},
        on_failure=lambda why: (proxy_failed.append(why), stop.set()),  # cannot serve: stop redirecting (fail open)
        # A flow the proxy holds open never idles out (a pooled keep-alive connection).
        on_connection=lambda target, open_: (redirector.flows.hold if open_ else redirector.flows.release)(target.flow))
    await proxy.start(args.proxy_port)
    for server_port in sorted(plain.ports):  # one listener each: its port tells a reply's server port
        listener_port = await proxy.start(0, plain=True)
        redirector.proxy_ports[server_port] = listener_port
        proxy.listeners[-1].lookup = lambda a, p, port=listener_port: lookup(a, p, proxy_port=port)
        proxy.listeners[-1].name_owner = lambda a, p, port=listener_port: lookup(a, p, True, proxy_port=port)
    ui = next((sink for sink in sinks.sinks if sink.name == "ui"), None)
    if ui is not None:
        from oisp.sinks.ui.health import ca_trusted, record_status

        trusted = ca_trusted(ca)

        def ui_status() -> None:
            ui.set_status(record_status(proxy=proxy, redirector=redirector, sinks=sinks, status=status, ca=ca,
                                        trusted=trusted))

        print(f"oisp record: dashboard {ui.url}", file=sys.stderr, flush=True)
    otlp = next((sink for sink in sinks.sinks if sink.name == "otlp"), None)
    if otlp is not None:
        print(f"oisp record: exporting OTLP ({otlp.target.protocol}) to {otlp.display_url}"
              f"{' with content' if otlp.content else ''}", file=sys.stderr, flush=True)
        if args.redaction == "minimal":
            print("oisp record: warning: --redaction minimal scrubs no secrets, and --otlp sends the events to "
                  "another machine", file=sys.stderr, flush=True)

        def otlp_health() -> None:  # read here, on the recorder's loop; the metric reader's thread reads the copy
            engine = redirector.counters()["reflector"].get("engine", {})
            otlp.set_health({"flows": dict(proxy.stats), "drops": engine.get("dropped", 0), "sinks": sinks.report()})

    await loop.run_in_executor(None, redirector.start)
    for note in redirector.notes:
        print(f"oisp record: note: {note}", file=sys.stderr)
    if plain:
        print("oisp record: plaintext model servers watched (port, provider: where):\n  "
              + "\n  ".join(plain.describe()), file=sys.stderr)
    print(f"oisp record: recording (proxy :{args.proxy_port}); Ctrl-C to stop", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    live = sys.stderr.isatty()
    failure = None
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            failure = redirector.failure
            if failure:
                print(f"\noisp record: {failure}; stopped diverting, traffic flows directly", file=sys.stderr)
                break
            if args.duration and time.monotonic() - started >= args.duration:
                break
            if ui is not None:
                ui_status()
            if otlp is not None:
                otlp_health()
            if live:
                counters = redirector.counters()
                engine = counters["reflector"].get("engine", {})
                print(f"\rflows {proxy.stats['intercepted']}+{proxy.stats['passed_through']}  "
                      f"plain {proxy.stats['plain_ai']}/{proxy.stats['plain']}  "
                      f"quic refused {counters['quic'].get('refused', 0)}  "
                      f"requests {status.requests}  responses {status.responses}  tokens {status.tokens}  cost {status.cost}  "
                      f"pinned {proxy.pinning.active(time.monotonic())}  "
                      f"drops {engine.get('dropped', 0)}   ", end="", file=sys.stderr, flush=True)
    finally:
        # New connections go straight to their servers; those in flight get a moment, then
        # are cut (resets reach their clients through the still-running reflector), then
        # the redirector goes. Stopping it first left in-flight clients waiting for their
        # own read timeouts.
        if redirector.reflector is not None:
            redirector.reflector.stop_opening()
        await proxy.stop()
        await proxy.drain(timeout=DRAIN)
        await asyncio.sleep(0.2)  # the resets' packets cross the reflector
        await loop.run_in_executor(None, redirector.stop)
        if otlp is not None:
            otlp_health()  # the final figures, which the metric reader exports as the sink closes
        sinks.close()
        for name, stats in sinks.report().items():
            if stats["lost"]:
                print(f"oisp record: sink {name} lost {stats['lost']} events ({stats['last_error']})", file=sys.stderr)
        if live:
            print(file=sys.stderr)
        print(f"oisp record: {status.requests} requests, {status.responses} responses, {status.tokens} tokens, "
              f"cost {status.cost} (estimate)", file=sys.stderr)
    if proxy_failed:
        print(f"oisp record: stopped: the proxy could not serve ({proxy_failed[0]}); connections went "
              f"straight to their servers from then on", file=sys.stderr)
        return 1
    return 1 if failure else 0
