"""The reflector: outbound TCP to AI endpoints lands on the local proxy, streamdump-style.

One divert handle sees (a) clients' outbound packets to the AI addresses on a
redirected server port and (b) the proxy's outbound packets from its proxy
port. Per batch, in numpy and one native call per direction:

(a) to a known AI address, from a port that is not the proxy's own upstream
    (`OwnPorts`), of a flow the table knows (a SYN creates it): swap the
    addresses, set the destination port to the proxy port, inject inbound.
    The proxy accepts a socket whose peer is (server, client port).
(b) from the proxy port to a flow the table knows: swap the addresses, set the
    source port back to the server port, inject inbound. The client sees the
    server it dialled.

Everything else passes untouched: the proxy's own upstream connections
(loop-free: see own_ports.py), excluded processes, and flows that began before
the reflector (no SYN seen, so no entry). Other destinations are never even
diverted: the filter names the AI addresses. A filter is fixed when a handle
opens, so a new AI address (from DNS) swaps in a successor handle, and the old
one hands over what it still holds. Past MAX_FILTER_ADDRESSES the filter names
the ports alone, and addresses are checked here and in the ring.

The fast path (on by default): once a flow is open, the receive ring itself
reflects its packets and passes the proxy's upstream packets, in C without the
GIL (_native/reflect_fast.h), and it passes packets to addresses that are not
AI endpoints (the target set is mirrored into it). Without a process filter it
also opens flows on clients' SYNs, so a new connection's handshake never waits
for Python; the flows it opened are adopted into the flow table (woken by the
ring, and by the proxy's lookup should it come first). Only batches holding a
packet of an unknown flow (or, with a process filter, a client's SYN to an AI
address) reach `process` here. Once a second the flows the rings carried are
marked seen (idle expiry) with the FINs and RSTs they passed (closing them).

The parts, each with one job: batch_decision.py decides a batch (no I/O),
succession.py keeps the handles and swaps them, fast_mirror.py keeps the rings'
tables in step with the flow table. The Reflector wires them to the flow table,
the target set and its thread, opens flows on clients' SYNs (the process filter)
and names their owners.
"""

from __future__ import annotations

import logging
import threading
import time

from oisp.divert.engine import Engine
from oisp.redirect.batch_decision import BatchDecider, PortMap, apply
from oisp.redirect.fast_mirror import FastMirror
from oisp.redirect.flows import FlowEntry, FlowTable, key_address
from oisp.own_ports import OwnPorts
from oisp.divert.process_filter import ProcessFilter
from oisp.redirect.plain import PlainPorts
from oisp.redirect.processes import ProcessResolver
from oisp.redirect.succession import MAX_FILTER_ADDRESSES, Succession
from oisp.redirect.targets import TargetSet

DEFAULT_PORTS = {443: 8443}  # server port → proxy port
log = logging.getLogger(__name__)


class Reflector:
    """Runs the reflect loop in a thread: `start()`, `stop()`, or use it as a context manager."""

    def __init__(self, targets: TargetSet, flows: FlowTable, own_ports: OwnPorts, *,
                 ports: dict[int, int] | None = None, processes: ProcessResolver | None = None,
                 process_filter: ProcessFilter | None = None, priority: int = 0, watchdog: float | None = 5.0,
                 fast_path: bool = True, address_filter: bool = True,
                 max_filter_addresses: int = MAX_FILTER_ADDRESSES, address_ttl: float | None = None,
                 plain: PlainPorts | None = None, opening: bool = True):
        self.targets, self.flows, self.own_ports = targets, flows, own_ports
        self.ports = dict(ports or DEFAULT_PORTS)
        # Plaintext model servers' ports: every destination the filter lets through is taken.
        self.plain = plain if plain else None
        missing = [p for p in (self.plain.ports if self.plain else ()) if p not in self.ports]
        if missing:
            raise ValueError(f"plaintext ports without a proxy port: {missing}")
        self.processes = processes
        self.process_filter = process_filter if process_filter and process_filter.active else None
        if self.process_filter and processes is None:
            raise ValueError("a process filter needs a ProcessResolver")
        self.fast_path = fast_path
        # An AI address no resolution or DNS answer has named for this long, and no open
        # flow uses, is let go (the filter shrinks). None: addresses stay for good.
        self.address_ttl = address_ttl
        self.decider = BatchDecider(PortMap(self.ports, self.plain.ports if self.plain else ()), own_ports, targets)
        self.succession = Succession(targets, self.ports, self.plain, priority=priority, watchdog=watchdog,
                                     address_filter=address_filter, max_filter_addresses=max_filter_addresses,
                                     prepare=self._prepare, joined=self._joined, decide=self._decide,
                                     leaving=self._leaving, left=self._left, survived=self._survived)
        # The ring opens flows on SYNs itself unless a process filter must decide them.
        self.mirror = FastMirror(flows, targets, lambda: self.succession.engines, enabled=fast_path,
                                 open_syns=self.process_filter is None,
                                 adopted=self._name_later if processes is not None else None)
        self._unnamed: list[FlowEntry] = []  # opened in this batch, owner not known yet
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._opening = opening  # new flows are taken (see stop_opening)
        self.error: BaseException | None = None  # the last error redirection survived
        self.failure: BaseException | None = None  # what ended it: the handles are closed (failed open)
        self.counts = {"reflected_to_proxy": 0, "reflected_to_client": 0, "own_upstream": 0, "excluded": 0,
                       "batch_errors": 0}

    @property
    def engine(self) -> Engine | None:
        """The current handle: the one new packets are queued for."""
        return self.succession.engine

    @property
    def filter(self) -> dict:
        """What the filter in force names: mode "addresses" or "ports", and its counts."""
        return self.succession.filter

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Reflector:
        self.targets.on_add = self._targets_added  # first, so no address learned meanwhile is missed
        self.flows.on_open, self.flows.on_remove = self._flow_opened, self._flow_removed
        self.flows.on_close = self.mirror.flow_closed
        if self.mirror.open_syns:
            self.flows.on_miss = self.mirror.adopt
        try:
            self.succession.start()
        except BaseException:
            self.targets.on_add = None
            raise
        self._thread = threading.Thread(target=self._run, name="oisp-reflector", daemon=True)
        self._thread.start()
        return self

    def stop_opening(self) -> None:
        """New connections go straight to their servers from now on; flows already open
        are still reflected (a clean stop lets the proxy finish or cut them first; a
        sensor that died has its connections' resets reflected back to their clients)."""
        self._opening = False
        self.mirror.stop_opening()

    def resume_opening(self) -> None:
        """New connections are taken again (a sensor listens once more)."""
        self._opening = True
        self.mirror.resume_opening()

    def stop(self) -> None:
        self._stopping.set()
        self.targets.on_add = None
        self.succession.stop()
        if self._thread is not None:
            self._thread.join(3.0)
        self.succession.wake_waiters()

    def __enter__(self) -> Reflector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def covers(self, generation: int) -> bool:
        """Whether the filter in force takes every target address of that generation."""
        return self.succession.covers(generation)

    def wait_covered(self, generation: int | None = None, timeout: float = 1.0) -> bool:
        """Wait until the filter takes the target addresses of `generation` (default: all
        known now). The DNS watcher holds an answer naming a new AI address until then,
        so the client's first SYN to it is already diverted."""
        generation = self.targets.generation if generation is None else generation
        return self.succession.wait_covered(generation, timeout,
                                            lambda: self._stopping.is_set() or not self._alive())

    def _alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    # -- the handles (called by the succession) ---------------------------------------------
    def _prepare(self, engine: Engine) -> None:
        """A new handle: its fast path, and the flows already open (those of the handle it
        succeeds) guarded and in its ring."""
        self.mirror.enable(engine, self.ports, self.own_ports.mask, self.plain.ports if self.plain else (),
                           opening=self._opening)
        entries = self.flows.entries()
        engine.handle.abort_on_death(*(entry.client_port for entry in entries))
        self.mirror.add_flows(engine, entries)

    def _joined(self, engine: Engine) -> None:
        self.mirror.current(engine)

    def _leaving(self, engine: Engine) -> None:
        self.mirror.adopt()
        self.mirror.take_touched(engine)

    def _left(self, engine: Engine) -> None:
        self.mirror.retired(engine)

    def _survived(self, error: BaseException) -> None:
        self.error = error

    # -- the flow table's and the targets' hooks ---------------------------------------------
    def _flow_opened(self, entry: FlowEntry) -> None:
        # A ring that opens a flow has told its guardian already; while two handles live
        # (a swap), either may have, so both are told.
        engines = self.succession.engines
        if not (entry.from_ring and len(engines) == 1):
            for engine in engines:  # should this process die, the guardian aborts the client's socket
                engine.handle.abort_on_death(entry.client_port)
        self.mirror.flow_opened(entry)

    def _flow_removed(self, entry: FlowEntry) -> None:
        self.mirror.flow_removed(entry)
        for engine in self.succession.engines:
            engine.handle.forget_on_death(entry.client_port)

    def _targets_added(self, keys: list[bytes]) -> None:
        """New AI addresses (DNS or resolver thread): into every live ring at once; in
        address mode, the reflector thread then swaps in a handle whose filter names them."""
        self.mirror.targets_added(keys)
        self.succession.want_swap()

    def _expire_targets(self) -> None:
        """Let go of AI addresses nobody names any more (see address_ttl)."""
        keep = [entry.key[0] for entry in self.flows.entries()]
        self.succession.expire_targets(time.monotonic() - self.address_ttl, keep)

    def counters(self) -> dict:
        """Reflected/own counts include the fast path's; `fast_path` has its share alone.
        The fast path's and the engine's counts add up every handle this reflector had."""
        counts = dict(self.counts)
        fast = self.mirror.counters()
        counts["reflected_to_proxy"] += fast.get("to_proxy", 0)
        counts["reflected_to_client"] += fast.get("to_client", 0)
        counts["own_upstream"] += fast.get("own_upstream", 0)
        return {**counts, "fast_path": fast, "filter": {**self.filter, "live": len(self.succession.engines)},
                "own_ports": dict(self.own_ports.counts),
                "flows": len(self.flows), "flow_table": dict(self.flows.counts),
                "engine": self.succession.counters()}

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        next_expiry = time.monotonic() + 1.0
        # Target expiry: every half TTL, between 1 s and a minute.
        period = None if self.address_ttl is None else min(60.0, max(1.0, self.address_ttl / 2))
        next_target_expiry = next_expiry + (period or 0.0)
        succession = self.succession
        try:
            while not self._stopping.is_set():
                wait = 0.5
                if succession.swap_wanted.is_set():
                    wait = succession.swap_if_allowed(wait)
                engine = succession.engine
                batch = engine.next_batch(timeout=wait)
                if batch is not None:
                    self._decide(batch, engine)
                else:  # a timeout, or the ring opened flows
                    self.mirror.adopt()
                    if self._unnamed:
                        self._name_owners()
                if time.monotonic() >= next_expiry:
                    if self.fast_path:
                        self.mirror.adopt()
                        for live in succession.engines:
                            self.mirror.take_touched(live)
                    self.flows.expire()
                    next_expiry = time.monotonic() + 1.0
                    if period is not None and next_expiry >= next_target_expiry:
                        self._expire_targets()
                        next_target_expiry = next_expiry + period
        except BaseException as e:  # whatever it is, redirection must not go on half alive
            if not self._stopping.is_set():
                self._fail(e)
        finally:
            succession.wake_waiters()

    def _fail(self, error: BaseException) -> None:
        """Redirection cannot go on (the watchdog failed open, or something unexpected
        broke): close every handle, so traffic flows directly, and keep why."""
        self.succession.close_all()
        log.error("the reflector stopped (%s: %s); its divert handles are closed, traffic flows directly",
                  type(error).__name__, error, exc_info=error)
        self.error = self.failure = error  # last: who reads it may count on the handles being closed

    def _decide(self, batch, engine: Engine) -> None:
        self.mirror.adopt()  # first: the batch may hold packets of flows the ring just opened
        try:
            self.process(batch)
        except Exception as e:  # one bad batch must not stop redirection
            self.counts["batch_errors"] += 1
            self.error = e
        engine.commit(batch)
        if self._unnamed:
            self._name_owners()

    # -- one batch ------------------------------------------------------------------------
    def process(self, batch) -> None:
        """Decide, rewrite and set verdicts for one batch (the caller commits it)."""
        verdicts = self.decider.decide(batch.rows, batch.outbound(), self.flows.seen, self._syn)
        self.counts["own_upstream"] += verdicts.own_upstream
        to_proxy, to_client = apply(batch, verdicts)
        self.counts["reflected_to_proxy"] += to_proxy
        self.counts["reflected_to_client"] += to_client

    def _syn(self, rows, row: int, key) -> bool:
        """A client's SYN: False if its flow is not taken. An open flow goes on (a
        retransmission); a new one, or one that has ended (the rings' FINs and RSTs for
        it are collected first), is opened unless the process filter excludes it."""
        self.mirror.take_ends(key)
        entry = self.flows.get(key)
        if entry is not None and entry.closed_at is None:
            return True
        if not self._opening:
            return False
        version = int(rows["ip_version"][row])
        client = key_address(rows["src_addr"][row].tobytes(), version)
        server = key_address(key[0], version)
        client_port, server_port = key[1], int(rows["dst_port"][row])
        pid = name = None
        created = time.time()
        if self.process_filter is not None:  # decided now, by the process shown to hold the socket
            pid, name = self.processes.owner(client, client_port, server, server_port, since=created)
            if not self.process_filter.allows(pid, name):
                self.counts["excluded"] += 1
                return False
        # Otherwise named after the batch is injected (_name_owners): no SYN waits for it.
        entry = self.flows.open(FlowEntry(client, client_port, server, server_port, key[2], pid, name,
                                          created=created))
        if pid is None and self.processes is not None:
            self._unnamed.append(entry)
        return True

    def _name_later(self, entry: FlowEntry) -> None:
        """A flow a ring opened: named after, by the reflector thread (_name_owners), since
        adopting may run on the proxy's event loop, and naming asks the kernel."""
        self._unnamed.append(entry)

    def _name_owners(self) -> None:
        """After a batch is injected (so no SYN waits for it): name the owners of the flows
        opened since (here or by the rings), each the process holding its socket. The
        proxy then finds them named and need not leave its event loop to ask."""
        with self.mirror.lock:  # the proxy's lookup may be adopting flows meanwhile
            unnamed, self._unnamed = self._unnamed, []
        for entry in unnamed:
            if entry.pid is None:
                entry.pid, entry.process_name = self.processes.new_flow_owner(
                    entry.client_addr, entry.client_port, entry.server_addr, entry.server_port, since=entry.created)
