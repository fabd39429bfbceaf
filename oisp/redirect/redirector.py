"""Everything the redirector needs, wired together for `oisp record`.

    redirector = Redirector(proxy_ports={443: 8443}, exclude="chrome").start()
    ...                                     # the proxy, on an accepted socket:
    entry = redirector.flows.lookup(*sock.getpeername()[:2], sock.getsockname()[1])
    family = socket.AF_INET6 if entry.server_addr.version == 6 else socket.AF_INET
    upstream = upstream_socket(family, redirector.own_ports)  # its port registered before the connect
    await loop.sock_connect(upstream, (str(entry.server_addr), entry.server_port))
    ...
    redirector.stop()

Start order matters: the DNS sniffer and the process events first, so the
answers and connects that follow are not missed; the start-up resolution
next; the reflector last.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Iterable

from oisp.divert.errors import DivertError
from oisp.redirect.flows import FlowTable
from oisp.own_ports import OwnPorts
from oisp.divert.process_filter import ProcessFilter
from oisp.redirect.processes import ProcessResolver
from oisp.redirect.reflector import DEFAULT_PORTS, Reflector
from oisp.redirect.targets import DnsSniffer, TargetSet, resolve_hosts

if TYPE_CHECKING:
    from oisp.redirect.quic import QuicRefuser


class Redirector:
    def __init__(self, spec=None, *, proxy_ports: dict[int, int] | None = None, include: str | Iterable[str | int] = (),
                 exclude: str | Iterable[str | int] = (), addresses: Iterable = (), resolve: bool = True,
                 resolve_timeout: float = 5.0, sniff_dns: bool = True, process_events: bool = True,
                 max_flows: int = 65536, idle_timeout: float = 300.0, watchdog: float | None = 5.0,
                 address_ttl: float | None = 3600.0, refresh: float | None = 600.0, plain=None,
                 refuse_quic: bool = False, on_quic_refused=None, opening: bool = True):
        """`plain`: the plaintext model servers' ports (oisp.redirect.plain.PlainPorts),
        each also in `proxy_ports`. `refuse_quic`: QUIC to the AI addresses is refused
        (oisp.redirect.quic), each refused flow told to `on_quic_refused`. Without
        `opening`, nothing new is reflected until `opening_changed(True)` (a sensor in
        another process has shown it listens: oisp.redirect.listeners)."""
        if spec is None:
            from oisp.spec import default_spec

            spec = default_spec()
        self.spec = spec
        self.targets = TargetSet(addresses)
        self.own_ports = OwnPorts()
        self.processes = ProcessResolver()
        self.process_filter = ProcessFilter(include, exclude)
        self.flows = FlowTable(max_flows=max_flows, idle_timeout=idle_timeout, owner=self.processes.owner,
                               confirm=self.processes.confirms)
        self.proxy_ports = dict(proxy_ports or DEFAULT_PORTS)
        self.plain = plain
        self.refuse_quic, self.on_quic_refused = refuse_quic, on_quic_refused
        self.quic: QuicRefuser | None = None
        self.resolve, self.resolve_timeout = resolve, resolve_timeout
        self.sniff_dns, self.process_events, self.watchdog = sniff_dns, process_events, watchdog
        # Learned addresses nobody has named for address_ttl seconds are let go, so the
        # filter stays small; the spec's hosts are resolved again every `refresh` seconds.
        self.address_ttl, self.refresh = address_ttl, refresh
        self._stopping = threading.Event()
        self.dns: DnsSniffer | None = None
        self.reflector: Reflector | None = None
        self.resolution: dict = {}
        self.notes: list[str] = []  # what runs degraded, and why
        self._opening = opening

    def start(self) -> Redirector:
        try:
            if self.sniff_dns:
                try:
                    self.dns = DnsSniffer(self.targets, self.spec.matches_host, hold=self._until_diverted)
                except DivertError as e:
                    self.notes.append(f"DNS answers are not watched: {e}")
            if self.process_events and not self.processes.start_events():
                self.notes.append(f"processes are named by psutil only: {self.processes.events_error}")
            if self.resolve:
                self.resolution = resolve_hosts(self.spec.hosts(), self.targets, timeout=self.resolve_timeout)
            # Set before it starts, so a DNS answer arriving meanwhile already waits for it.
            self.reflector = Reflector(self.targets, self.flows, self.own_ports, ports=self.proxy_ports,
                                       processes=self.processes, process_filter=self.process_filter,
                                       watchdog=self.watchdog, address_ttl=self.address_ttl, plain=self.plain,
                                       opening=self._opening)
            self.reflector.start()
            if self.refuse_quic:
                from oisp.redirect.quic import QuicRefuser

                try:
                    self.quic = QuicRefuser(self.targets, on_refused=self.on_quic_refused,
                                            watchdog=self.watchdog).start()
                except DivertError as e:
                    self.notes.append(f"QUIC to AI addresses is not refused: {e}")
            if self.reflector.filter["mode"] == "ports":
                self.notes.append(f"the filter names the port alone ({self.reflector.filter['why_ports']}): "
                                  f"all other traffic to port {', '.join(map(str, self._ai_ports()))} crosses "
                                  f"user space too")
            if self.resolve and self.refresh:
                threading.Thread(target=self._refresh_loop, name="oisp-resolve-again", daemon=True).start()
        except BaseException:
            self.stop()
            raise
        return self

    def opening_changed(self, opening: bool) -> None:
        """Take new connections (True) or let them go straight to their servers (False);
        flows already open are reflected either way."""
        self._opening = opening
        if self.reflector is not None:
            (self.reflector.resume_opening if opening else self.reflector.stop_opening)()

    def _ai_ports(self) -> list[int]:
        return sorted(p for p in self.proxy_ports if not (self.plain and p in self.plain))

    def _until_diverted(self, generation: int) -> None:
        """The DNS watcher's hold: an answer naming a new AI address waits (up to 1 s) for
        the reflector's filter to take it."""
        deadline = time.monotonic() + 1.0
        if self.reflector is not None:
            self.reflector.wait_covered(generation, timeout=1.0)
        if self.quic is not None:
            self.quic.wait_covered(generation, timeout=max(0.0, deadline - time.monotonic()))

    def _refresh_loop(self) -> None:
        while not self._stopping.wait(self.refresh):
            self.resolution = resolve_hosts(self.spec.hosts(), self.targets, timeout=self.resolve_timeout)

    def stop(self) -> None:
        """The reflector first, so no flow is left half-redirected behind a stopped sniffer."""
        self._stopping.set()
        for part in (self.reflector, self.quic, self.dns, self.processes):
            if part is not None:
                part.stop()

    @property
    def failure(self) -> str | None:
        """What died, if a part did (it has closed its handles: traffic flows directly); else None."""
        # The QUIC refuser is not here: should it die, its handle is closed and QUIC flows
        # directly (counted in counters()["quic"]), while TCP goes on being recorded.
        for name, part in (("the reflector", self.reflector), ("the DNS watcher", self.dns)):
            error = part.failure if part is not None else None
            if error is not None:
                return f"{name} died ({type(error).__name__}: {error})"
        return None

    def __enter__(self) -> Redirector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def counters(self) -> dict:
        return {
            "reflector": self.reflector.counters() if self.reflector else {},
            "targets": {"addresses": len(self.targets), **self.targets.counts},
            "dns": self.dns.counters() if self.dns else {},
            "quic": dict(self.quic.counts) if self.quic else {},
            "processes": dict(self.processes.counts),
            "resolution": dict(self.resolution),
        }
