"""`oisp sensor`: the unprivileged half of `oisp record`. The transparent proxy, TLS,
the decoders, events, redaction, sinks, the dashboard and the status line, run as an
ordinary user; it asks the redirector (`oisp redirector`, root) over its IPC socket
where each connection was going.

It listens where the redirector reflects (told on connecting), shows the redirector
that it holds those ports, and only then does the redirector reflect anything to it.
While the redirector is away it says so and waits (traffic flows directly meanwhile);
when it is back, recording resumes without a restart.

It refuses to run with any effective capability (as root, say) unless --allow-root:
the point of the split is that the code reading bytes other programs and providers
control holds no privilege. `sudo oisp record` starts it as the invoking user.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from oisp.cli.options import add_selection_options, add_sensor_options, add_socket_option
from oisp.cli.configured import add_config_option
from oisp.sinks.options import sinks_from_args

DRAIN = 2.0  # seconds a clean stop gives connections in flight before cutting them
HTTPS_PORT = 443  # every other server port the redirector reflects is a plaintext model server's


def register(sub) -> None:
    parser = sub.add_parser("sensor", help="the unprivileged half of record: proxy, decoding, events (as a user)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sensor_arguments(parser)
    add_socket_option(parser, "to connect to")
    parser.add_argument("--allow-root", action="store_true",
                        help="run even with effective capabilities (as root): not what the split is for")
    # `oisp record` starts the sensor with this: its lines say "oisp record", and it stops
    # when its standard input closes (record, its parent, has gone).
    parser.add_argument("--from-record", action="store_true", help=argparse.SUPPRESS)
    add_config_option(parser)
    parser.set_defaults(func=run)


def add_sensor_arguments(parser) -> None:
    add_sensor_options(parser)
    add_selection_options(parser)


def sensor_parser() -> argparse.ArgumentParser:
    """The sensor's own options alone, for `oisp record` to hand them on (argv_of)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_sensor_arguments(parser)
    return parser


def argv_of(parser: argparse.ArgumentParser, args) -> list[str]:
    """The options of `parser` that `args` sets away from their defaults, as argv again."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                out += [flag, str(item)]
        elif action.nargs == "?" and value == action.const:
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


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


def quic_refused_event(flow: dict) -> dict:
    """The network.connect event of a QUIC connection attempt refused (see oisp.redirect.quic)."""
    from oisp.events import make_event

    data = {"dest": {"ip": flow["server"][0], "port": flow["server"][1]},
            "src": {"ip": flow["client"][0], "port": flow["client"][1]}, "protocol": "udp", "success": False}
    return make_event("network.connect", data, flow["ts"], completeness="partial",
                      reasons=["quic_refused: QUIC to an AI address was refused so the client falls back to TCP, "
                               "where it is recorded"])


def held_privileges() -> str | None:
    """What privilege this process holds, said for a person (None: none). Linux: any
    effective capability (/proc/self/status CapEff); Windows: an elevated token (written
    to the documented IsUserAnAdmin, never run here); elsewhere: euid 0."""
    if sys.platform == "win32":
        import ctypes

        return "an elevated token" if ctypes.windll.shell32.IsUserAnAdmin() else None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    mask = int(line.split()[1], 16)
                    return f"effective capabilities {mask:#x}" if mask else None
    except OSError:
        pass
    import os

    return "uid 0" if os.geteuid() == 0 else None


def no_new_privileges() -> None:
    """PR_SET_NO_NEW_PRIVS: nothing this process runs (a set-uid helper) gains privilege."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, from linux/prctl.h


def run(args) -> int:
    from oisp.events.cost import PriceTableError, load_prices

    label = "oisp record" if args.from_record else "oisp sensor"
    privileged = held_privileges()
    if privileged and not args.allow_root:
        print(f"{label}: this process holds privileges ({privileged}); the sensor runs as an ordinary user"
              f"\n  run it as one (sudo -u USER oisp sensor …), let `sudo oisp record` start it, "
              f"or pass --allow-root", file=sys.stderr)
        return 3
    no_new_privileges()
    try:
        args.price_table = load_prices(args.prices)
    except PriceTableError as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 2
    if args.jsonl is None:
        args.jsonl = args.output or ""
    raise_open_file_limit()
    from oisp.cli.remote import RemoteRedirector

    try:
        return asyncio.run(record_events(args, lambda spec, plain, emit: RemoteRedirector(args.socket, label, emit),
                                         label=label, parent_pipe=args.from_record))
    except KeyboardInterrupt:
        return 0


def raise_open_file_limit() -> None:
    """Each proxied connection holds two descriptors (client and upstream): the usual soft
    limit of 1024 runs out near 500 connections. The hard limit is ours to take."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # the soft limit stays: the proxy copes with running out (see ACCEPT_GIVE_UP)


async def record_events(args, make_backend, *, label: str, parent_pipe: bool = False) -> int:
    """The sensor's work, whichever side the redirector is on: `make_backend(spec, plain,
    emit)` gives the redirector's part (oisp.cli.record's in-process one, or
    oisp.cli.remote's over the IPC).

    Order matters for failing open: the proxy listens before any flow is reflected to
    it, and on stop the redirector first stops taking new connections, the proxy drains
    and then cuts the ones in flight, and only then does the redirector go, so no
    connection is reflected into a proxy that is not there, nor left waiting on one."""
    from oisp.cli.options import plain_ports
    from oisp.events import Redactor
    from oisp.proxy.ca import CertificateAuthority
    from oisp.proxy.certs import LeafIssuer
    from oisp.proxy.server import TransparentProxy
    from oisp.redirect.plain import PlainSpecError
    from oisp.spec import load_spec

    spec = load_spec(args.spec)
    # `oisp sensor` has no --proxy-port (the redirector says where to listen): only 443 is
    # reserved then; under `oisp record --single-process` the proxy's own port too.
    reserved = {443, getattr(args, "proxy_port", 443)}
    try:
        spec, plain = plain_ports(spec, args.plain, local=not args.no_local, reserved=reserved)
    except (PlainSpecError, KeyError) as e:
        print(f"{label}: --plain: {e}", file=sys.stderr)
        return 2
    ca = CertificateAuthority.load_or_create()
    print(f"{label}: CA {ca.cert_path}\n  trust it system-wide: sudo oisp ca install"
          f"\n  or per shell: eval \"$(oisp ca env)\"", file=sys.stderr)
    sinks = sinks_from_args(args)
    status = Status()

    def emit(events: list[dict]) -> None:
        for event in events:
            status.see(event)
            sinks.emit(event)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    proxy_failed: list[str] = []  # kept: the proxy's own failure clears once it serves again
    backend = make_backend(spec, plain, lambda flow: loop.call_soon_threadsafe(emit, [quic_refused_event(flow)]))
    issuer = LeafIssuer(ca, keylog_filename=args.keylog)
    proxy = TransparentProxy(
        flows=backend.flows, issuer=issuer, spec=spec,
        upstream_verify=not args.no_upstream_verify, upstream_cafile=args.upstream_ca,
        keylog=issuer.keylog_filename,  # the safely opened key log, never the path as given
        on_events=emit, recorder_options={"redactor": Redactor(args.redaction, spec=spec), "prices": args.price_table,
                                          "streaming_chunks": args.streaming_chunks},
        on_failure=lambda why: (proxy_failed.append(why), stop.set()))  # cannot serve: stop redirecting (fail open)
    by_server: dict = {}  # server port → its Listener

    async def listen(wanted: dict[int, int]) -> dict[int, int]:
        """Listeners where `wanted` says (server port → port; 0: any free one), the ones
        no longer wanted closed. One per server port: a reply's port names its server's."""
        for server_port, listener in list(by_server.items()):
            if wanted.get(server_port) not in (0, listener.port):
                proxy.close_listener(by_server.pop(server_port))
        for server_port, port in sorted(wanted.items()):
            if server_port not in by_server:
                await proxy.start(port, plain=server_port != HTTPS_PORT)
                by_server[server_port] = proxy.listeners[-1]
        return {server_port: listener.port for server_port, listener in by_server.items()}

    backend.on_listen = listen
    ui = next((sink for sink in sinks.sinks if sink.name == "ui"), None)
    if ui is not None:
        from oisp.sinks.ui.health import ca_trusted, record_status

        trusted = ca_trusted(ca)

        def ui_status() -> None:
            ui.set_status(record_status(proxy=proxy, redirector=backend, sinks=sinks, status=status, ca=ca,
                                        trusted=trusted))

        print(f"{label}: dashboard {ui.url}", file=sys.stderr, flush=True)
    otlp = next((sink for sink in sinks.sinks if sink.name == "otlp"), None)
    if otlp is not None:
        print(f"{label}: exporting OTLP ({otlp.target.protocol}) to {otlp.display_url}"
              f"{' with content' if otlp.content else ''}", file=sys.stderr, flush=True)
        if args.redaction == "minimal":
            print(f"{label}: warning: --redaction minimal scrubs no secrets, and --otlp sends the events to "
                  "another machine", file=sys.stderr, flush=True)

        def otlp_health() -> None:  # read here, on the recorder's loop; the metric reader's thread reads the copy
            engine = backend.counters()["reflector"].get("engine", {})
            otlp.set_health({"flows": dict(proxy.stats), "drops": engine.get("dropped", 0), "sinks": sinks.report()})

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if parent_pipe:  # `oisp record` holds the other end: EOF when it is gone, whatever killed it
        _stop_at_eof(loop, stop)
    try:
        started = await backend.start(stop)
    except (OSError, RuntimeError) as e:  # a port the redirector reflects to is taken, or refused
        print(f"{label}: cannot record: {e}", file=sys.stderr)
        started = False
    if not started:
        await proxy.stop()
        await backend.close()
        sinks.close()
        return 0 if stop.is_set() else 1
    for note in backend.notes:
        print(f"{label}: note: {note}", file=sys.stderr)
    if plain:
        print(f"{label}: plaintext model servers watched (port, provider: where):\n  "
              + "\n  ".join(plain.describe()), file=sys.stderr)
    https = by_server.get(HTTPS_PORT)
    print(f"{label}: recording (proxy :{https.port if https else '-'}); Ctrl-C to stop", file=sys.stderr, flush=True)
    started = time.monotonic()
    live = sys.stderr.isatty()
    failure = None
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            failure = backend.failure
            if failure:
                print(f"\n{label}: {failure}; stopped diverting, traffic flows directly", file=sys.stderr)
                break
            if args.duration and time.monotonic() - started >= args.duration:
                break
            await backend.refresh()
            if ui is not None:
                ui_status()
            if otlp is not None:
                otlp_health()
            if live:
                counters = backend.counters()
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
        await backend.stop_opening()
        await proxy.stop()
        await proxy.drain(timeout=DRAIN)
        await asyncio.sleep(0.2)  # the resets' packets cross the reflector
        await backend.close()
        if otlp is not None:
            otlp_health()  # the final figures, which the metric reader exports as the sink closes
        sinks.close()
        for name, stats in sinks.report().items():
            if stats["lost"]:
                print(f"{label}: sink {name} lost {stats['lost']} events ({stats['last_error']})", file=sys.stderr)
        if live:
            print(file=sys.stderr)
        print(f"{label}: {status.requests} requests, {status.responses} responses, {status.tokens} tokens, "
              f"cost {status.cost} (estimate)", file=sys.stderr)
    if proxy_failed:
        print(f"{label}: stopped: the proxy could not serve ({proxy_failed[0]}); connections went "
              f"straight to their servers from then on", file=sys.stderr)
        return 1
    return 1 if failure else 0


def _stop_at_eof(loop, stop: asyncio.Event) -> None:
    def readable() -> None:
        try:
            data = sys.stdin.buffer.raw.read(4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), readable)
