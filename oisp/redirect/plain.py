"""Plaintext model servers: which destinations on which ports are taken, in plain HTTP.

Local model servers (Ollama :11434, LM Studio :1234, vLLM :8000, llama.cpp :8080, …)
speak plain HTTP, on loopback or to a GPU box on the LAN, so they have no AI
address to match: a port of theirs is taken for every destination in the local
ranges (loopback, private, IPv4 link-local, CGNAT/Tailscale, IPv6 ULA), never for a
public address, unless `--plain HOST:PORT` names the host. The divert filter
itself says this (see `PlainPorts.clause`), so a plaintext port's connections to
the internet never leave the kernel, and the reflector and its ring take every
packet of these ports that reaches them.

Decisions only: parsing `--plain` and building the filter clause. Resolving a named
host is the caller's (`resolve`, bounded).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterable

# The ranges a model server "on this machine or the LAN" lives in. Not IPv6 link-local
# (fe80::/10): the proxy's upstream would need the client's interface (a scope id),
# which a reflected packet does not carry, so such a connection would fail.
LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10",
    "::1/128", "fc00::/7"))
# A named host contributes at most this many addresses (a filter holds ~250 comparisons).
MAX_HOST_ADDRESSES = 8
MAX_NAMED_HOSTS = 16


class PlainSpecError(ValueError):
    """A `--plain` value that is not PORT, HOST:PORT or either with =PROVIDER."""


@dataclass(frozen=True)
class PlainRequest:
    """One `--plain` value: `port`, optionally only `host`, optionally named `provider`."""

    port: int
    host: str | None = None
    provider: str | None = None


def parse_plain(text: str) -> PlainRequest:
    """'11434', 'gpu-box:8000', '[fd00::2]:8000', '9000=vllm', 'box:9000=llamacpp'."""
    spec, _, provider = text.strip().partition("=")
    provider = provider.strip() or None  # type: ignore[assignment]  # None: the default provider
    host: str | None = None
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0 or not spec[end + 1:].startswith(":"):
            raise PlainSpecError(f"{text!r}: an IPv6 address is written [ADDRESS]:PORT")
        host, port_text = spec[1:end], spec[end + 2:]
    elif ":" in spec:
        host, _, port_text = spec.rpartition(":")
        if ":" in host:
            raise PlainSpecError(f"{text!r}: an IPv6 address is written [ADDRESS]:PORT")
    else:
        port_text = spec
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise PlainSpecError(f"{text!r}: {port_text!r} is not a TCP port (1..65535)")
    if host is not None and not host:
        raise PlainSpecError(f"{text!r}: no host before the port")
    return PlainRequest(int(port_text), host, provider)


@dataclass
class PlainPort:
    """What is taken on one server port: the local ranges, and/or named addresses."""

    port: int
    local: bool = False
    addresses: set[str] = field(default_factory=set)
    provider: str | None = None  # the spec provider events name (None: the spec's own choice)


class PlainPorts:
    """The plaintext ports of a recording: the spec's local-server ports plus `--plain`."""

    def __init__(self, ports: Iterable[PlainPort] = ()):
        self.ports: dict[int, PlainPort] = {p.port: p for p in ports}

    @classmethod
    def build(cls, spec_ports: Iterable[int], requests: Iterable[PlainRequest],
              resolve: Callable[[str], list[str]]) -> PlainPorts:
        """The spec's ports, local ranges; each request adds its port (local ranges) or
        its host's addresses on that port. `resolve(host)` gives addresses; an address
        literal is taken as is."""
        ports = {p: PlainPort(p, local=True) for p in spec_ports}
        hosts = 0
        for request in requests:
            entry = ports.setdefault(request.port, PlainPort(request.port))
            if request.provider:
                entry.provider = request.provider
            if request.host is None:
                entry.local = True
                continue
            hosts += 1
            if hosts > MAX_NAMED_HOSTS:
                raise PlainSpecError(f"at most {MAX_NAMED_HOSTS} --plain HOST:PORT values")
            try:
                found = [str(ipaddress.ip_address(request.host))]
            except ValueError:
                found = resolve(request.host)
            if not found:
                raise PlainSpecError(f"{request.host}: no address")
            usable = [ipaddress.ip_address(a.split("%")[0]) for a in found]
            usable = [a for a in usable if not (a.version == 6 and a.is_link_local)]  # see LOCAL_NETWORKS
            if not usable:
                raise PlainSpecError(f"{request.host}: only IPv6 link-local addresses, which cannot be proxied")
            entry.addresses.update(str(a) for a in usable[:MAX_HOST_ADDRESSES])
        return cls(ports.values())

    def __bool__(self) -> bool:
        return bool(self.ports)

    def __contains__(self, port: int) -> bool:
        return port in self.ports

    def clause(self) -> str | None:
        """The divert filter's part for these ports (destination side), or None."""
        local = sorted(p for p, e in self.ports.items() if e.local)
        parts = []
        if local:
            parts.append(f"({_any_port(local)}) and ({_local_ranges()})")
        for port, entry in sorted(self.ports.items()):
            named = sorted(a for a in entry.addresses if not (entry.local and is_local(a)))
            if named:
                parts.append(f"tcp.DstPort == {port} and ({' or '.join(_equals(a) for a in named)})")
        return " or ".join(f"({p})" for p in parts) or None

    def cost(self) -> int:
        """How many comparisons the clause spends of a filter's budget."""
        clause = self.clause() or ""
        return sum(clause.count(op) for op in ("==", ">=", "<="))

    def describe(self) -> list[str]:
        """One line per port: what it takes, for `oisp check` and the start-up banner."""
        lines = []
        for port, entry in sorted(self.ports.items()):
            where = (["local addresses"] if entry.local else []) + sorted(entry.addresses)
            lines.append(f"{port} ({entry.provider or 'no provider named: =ID names one'}): {', '.join(where)}")
        return lines


def is_local(address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    return any(parsed in network for network in LOCAL_NETWORKS if network.version == parsed.version)


def resolve_host(host: str, timeout: float = 5.0) -> list[str]:
    """A named server's addresses (both families), within about `timeout` seconds."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="oisp-resolve-plain")
    future = pool.submit(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout)
    except (OSError, concurrent.futures.TimeoutError) as e:
        raise PlainSpecError(f"{host}: cannot resolve ({e or 'timed out'})") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return list(dict.fromkeys(info[4][0] for info in infos))  # type: ignore[misc]  # an IP socket address: its host is a str


def _any_port(ports: list[int]) -> str:
    return " or ".join(f"tcp.DstPort == {p}" for p in ports)


def _local_ranges() -> str:
    out = []
    for network in LOCAL_NETWORKS:
        field_ = "ip.DstAddr" if network.version == 4 else "ipv6.DstAddr"
        if network.num_addresses == 1:
            out.append(f"{field_} == {network.network_address}")
        else:
            out.append(f"({field_} >= {network.network_address} and {field_} <= {network.broadcast_address})")
    return " or ".join(out)


def _equals(address: str) -> str:
    parsed = ipaddress.ip_address(address)
    return f"{'ip' if parsed.version == 4 else 'ipv6'}.DstAddr == {parsed}"
