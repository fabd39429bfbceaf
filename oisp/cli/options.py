"""The options `oisp record`, `oisp redirector` and `oisp sensor` share, defined once.

The redirector's options decide what is diverted (root's business: which programs,
which ports, QUIC); the sensor's decide what is done with what arrives (outputs,
redaction, TLS upstream); the spec and the plaintext ports matter to both (the
redirector diverts the spec's hosts and ports, the sensor names their providers).
`oisp record` takes all of them and hands each side its own.
"""

from __future__ import annotations

import argparse

from oisp.sinks.options import add_sink_arguments

DEFAULT_PROXY_PORT = 8443


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


def add_selection_options(parser) -> None:
    """Both sides: the spec and the plaintext model-server ports."""
    parser.add_argument("--spec", metavar="FILE", help="AI endpoint spec to use instead of the bundled one")
    parser.add_argument("--plain", action="append", default=[], metavar="[HOST:]PORT[=PROVIDER]",
                        help="also record plaintext HTTP to a model server on this port: on loopback and local "
                             "networks, or only to HOST; PROVIDER (a spec id: ollama, vllm, llamacpp, …) names "
                             "it in events (repeatable). The spec's local server ports are watched already")
    parser.add_argument("--no-local", action="store_true",
                        help="do not watch the spec's local model server ports (11434, 1234, 8000, 8080, …)")


def add_redirector_options(parser) -> None:
    """What is diverted."""
    parser.add_argument("--process", default="", help="only these programs: names or pids, comma-separated")
    parser.add_argument("--exclude", default="", help="never these programs: names or pids, comma-separated")
    parser.add_argument("--allow-quic", action="store_true",
                        help="let QUIC (HTTP/3, UDP 443) to AI addresses through unrecorded; by default it is "
                             "refused, so clients fall back to TCP, where they are recorded")
    parser.add_argument("--proxy-port", type=tcp_port, default=DEFAULT_PROXY_PORT, help="local proxy port (default 8443)")
    parser.add_argument("--flow-idle-timeout", type=seconds, default=300.0, metavar="SECONDS",
                        help="forget a redirected connection after this long without packets, unless the proxy "
                             "still holds it open (default 300)")


def add_sensor_options(parser) -> None:
    """What is done with what arrives."""
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="JSONL file of events (default: events.jsonl in the data directory)")
    parser.add_argument("--upstream-ca", metavar="FILE", help="also trust this CA for upstream servers (lab setups)")
    parser.add_argument("--no-upstream-verify", action="store_true",
                        help="do not verify upstream certificates (unsafe; for lab setups only)")
    parser.add_argument("--keylog", metavar="FILE", help="write TLS keys (SSLKEYLOGFILE format) for Wireshark")
    parser.add_argument("--prices", metavar="FILE",
                        help="prices (USD per million tokens) overriding or adding to the bundled table (default: $OISP_PRICES)")
    parser.add_argument("--redaction", choices=["safe", "full", "minimal"], default="safe")
    parser.add_argument("--streaming-chunks", action="store_true", help="also emit ai.streaming_chunk events")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    add_sink_arguments(parser, default_stdout=False, ui=True)


def add_socket_option(parser, role: str) -> None:
    from oisp.ipc.transport import DEFAULT_ADDRESS

    parser.add_argument("--socket", default=DEFAULT_ADDRESS, metavar="PATH",
                        help=f"the redirector's IPC socket {role} (default {DEFAULT_ADDRESS})")


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
