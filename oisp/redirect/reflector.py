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
one hands over what it still holds (see _swap_engine). Past
MAX_FILTER_ADDRESSES the filter names the ports alone, and addresses are
checked here and in the ring.

The fast path (on by default): once a flow is open, the receive ring itself
reflects its packets and passes the proxy's upstream packets, in C without the
GIL (_native/reflect_fast.h), and it passes packets to addresses that are not
AI endpoints (the target set is mirrored into it). Without a process filter it
also opens flows on clients' SYNs, so a new connection's handshake never waits
for Python; the flows it opened are adopted into the flow table here (`_adopt`:
woken by the ring, and by the proxy's lookup should it come first). Only
batches holding a packet of an unknown flow (or, with a process filter, a
client's SYN to an AI address) reach `process` here. The ring's table mirrors
the flow table through its open/remove/close hooks; once a second the flows it
carried are marked seen (idle expiry) with the FINs and RSTs it passed (closing
them).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from oisp.divert.address import OUTBOUND
from oisp.divert.engine import Engine, Verdict
from oisp.divert.errors import DivertError, InvalidFilterError
from oisp.packet import OK, TCP_ACK, TCP_SYN, reflect
from oisp.redirect.flows import FlowEntry, FlowTable, key_address
from oisp.redirect.own_ports import IPV4_BIT, IPV6_BIT, OwnPorts
from oisp.redirect.plain import PlainPorts
from oisp.divert.process_filter import ProcessFilter
from oisp.redirect.processes import ProcessResolver
from oisp.redirect.targets import TargetSet

DEFAULT_PORTS = {443: 8443}  # server port → proxy port
_NOT_OUTBOUND = np.uint32(~OUTBOUND & 0xFFFFFFFF)
log = logging.getLogger(__name__)


SMALL_BATCH = 8  # up to this many rows, decide row by row (see _process_small)
# A filter holds about 250 comparisons (eBPFDivert: 253 addresses alone, measured 2026-11-30;
# WinDivert: 256 objects), and the reflector needs a few for its ports.
MAX_FILTER_ADDRESSES = 200


def reflector_filter(ports: dict[int, int], addresses: list | None = None, plain: PlainPorts | None = None) -> str:
    """Clients' packets to the server ports, from any source port (the proxy's own
    upstream packets match too, and are told apart by their registered port: see
    own_ports.py), and the proxy's packets from its proxy ports. With `addresses`
    (ipaddress objects), only client packets to those addresses. The plaintext ports of
    `plain` (in `ports` too) take the destinations its clause names, whatever
    `addresses` says."""
    proxies = " or ".join(f"tcp.SrcPort == {p}" for p in sorted(ports.values()))
    ai_ports = sorted(p for p in ports if not (plain and p in plain))
    servers = " or ".join(f"tcp.DstPort == {p}" for p in ai_ports) or None
    if servers and addresses is not None:
        if addresses:
            to = " or ".join(f"{'ip' if a.version == 4 else 'ipv6'}.DstAddr == {a}" for a in addresses)
            servers = f"(({servers}) and ({to}))"
        else:
            servers = None
    clauses = [c for c in (servers, plain.clause() if plain else None) if c]
    if not clauses:
        return f"tcp and outbound and ({proxies})"
    servers = " or ".join(f"({c})" for c in clauses) if len(clauses) > 1 else clauses[0]
    return f"tcp and outbound and ({servers} or {proxies})"


def _group(addresses: np.ndarray, ports_a: np.ndarray, ports_b: np.ndarray):
    """Unique (address, port, port) keys of some rows: (keys, first row of each, row → key)."""
    packed = np.empty((len(addresses), 20), dtype=np.uint8)
    packed[:, :16] = addresses
    packed[:, 16:18] = ports_a.astype("<u2").view(np.uint8).reshape(-1, 2)
    packed[:, 18:20] = ports_b.astype("<u2").view(np.uint8).reshape(-1, 2)
    _, first, inverse = np.unique(packed.view("V20").reshape(-1), return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


class SwapBudget:
    """How often a new AI address may swap in a new handle: a token bucket, `burst`
    swaps at once, then one per `every` seconds. Each swap opens a handle (a filter
    compiled and attached) and hands the old one over; whoever can make DNS answers
    name new addresses could otherwise keep the reflector doing nothing else. A
    deferred swap still comes, and takes every address learned meanwhile."""

    def __init__(self, burst: int = 4, every: float = 2.0, clock=time.monotonic):
        self.burst, self.every, self.clock = burst, every, clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()  # taken by the reflector thread, asked by the DNS watcher's hold

    def _refill(self, now: float) -> None:
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) / self.every)
        self._at = now

    def take(self) -> bool:
        """Spend one swap if there is one."""
        with self._lock:
            self._refill(self.clock())
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True

    def ready_in(self) -> float:
        """Seconds until a swap may be taken (0: now)."""
        with self._lock:
            self._refill(self.clock())
            return max(0.0, (1.0 - self._tokens) * self.every)


class Reflector:
    """Runs the reflect loop in a thread: `start()`, `stop()`, or use it as a context manager."""

    def __init__(self, targets: TargetSet, flows: FlowTable, own_ports: OwnPorts, *,
                 ports: dict[int, int] | None = None, processes: ProcessResolver | None = None,
                 process_filter: ProcessFilter | None = None, priority: int = 0, watchdog: float | None = 5.0,
                 fast_path: bool = True, address_filter: bool = True,
                 max_filter_addresses: int = MAX_FILTER_ADDRESSES, address_ttl: float | None = None,
                 plain: PlainPorts | None = None):
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
        self.priority, self.watchdog, self.fast_path = priority, watchdog, fast_path
        # The ring opens flows on SYNs itself unless a process filter must decide them.
        self.open_syns = fast_path and self.process_filter is None
        # Held while state moves from the rings to the flow table (opened flows, FINs and
        # RSTs), so a flow's end is never read before the flow is adopted.
        self._from_rings = threading.Lock()
        # The plaintext clause spends part of the filter's budget.
        self.max_filter_addresses = max(0, max_filter_addresses - (self.plain.cost() if self.plain else 0))
        # An AI address no resolution or DNS answer has named for this long, and no open
        # flow uses, is let go (the filter shrinks). None: addresses stay for good.
        self.address_ttl = address_ttl
        self._ports_for_good = not address_filter  # asked for, or the backend refused a filter
        self._server_port = np.zeros(65536, dtype=bool)
        self._proxy_port = np.zeros(65536, dtype=bool)
        self._proxy_for = np.zeros(65536, dtype=np.uint16)  # server port → its proxy port
        self._server_port[list(self.ports)] = True
        self._any_address = np.zeros(65536, dtype=bool)  # plaintext ports: no AI-address check
        self._any_address[list(self.plain.ports if self.plain else ())] = True
        self._proxy_port[list(self.ports.values())] = True
        self._proxy_for[list(self.ports)] = list(self.ports.values())
        self._server_for_proxy = {proxy: server for server, proxy in self.ports.items()}
        # The live handles, the current one last; two only while one hands over to the next.
        self._engines: tuple[Engine, ...] = ()
        # What the filter names: "addresses" (the AI set; a new address means a new handle)
        # or "ports" (every packet to a server port; the addresses are checked here).
        self.filter = {"mode": "addresses" if address_filter else "ports", "addresses": 0, "handles": 0,
                       "why_ports": None if address_filter else "asked for"}
        self._covered = 0  # the target generation the current filter holds
        self._covered_changed = threading.Condition()
        self._swap_wanted = threading.Event()
        self._swap_budget = SwapBudget()
        self._swap_deferred = False  # a wanted swap waits for the budget (counted once)
        self._retired: dict = {"fast": {}, "engine": {}}  # counts of the handles handed over
        self._unnamed: list[FlowEntry] = []  # opened in this batch, owner not known yet
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._opening = True  # new flows are taken (see stop_opening)
        self.error: BaseException | None = None  # the last error redirection survived
        self.failure: BaseException | None = None  # what ended it: the handles are closed (failed open)
        self.counts = {"reflected_to_proxy": 0, "reflected_to_client": 0, "own_upstream": 0, "excluded": 0,
                       "batch_errors": 0}

    @property
    def engine(self) -> Engine | None:
        """The current handle: the one new packets are queued for."""
        return self._engines[-1] if self._engines else None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Reflector:
        self.targets.on_add = self._targets_added  # first, so no address learned meanwhile is missed
        self.flows.on_open, self.flows.on_remove = self._flow_opened, self._flow_removed
        self.flows.on_close = self._flow_closed
        if self.open_syns:
            self.flows.on_miss = self._adopt
        try:
            self._start_engine(self.priority)
        except BaseException:
            self.targets.on_add = None
            raise
        self._thread = threading.Thread(target=self._run, name="oisp-reflector", daemon=True)
        self._thread.start()
        return self

    def stop_opening(self) -> None:
        """New connections go straight to their servers from now on; flows already open
        are still reflected (a clean stop lets the proxy finish or cut them first)."""
        self._opening = False
        if self.fast_path:
            for engine in self._engines:
                engine.ring.fast_open_syns(False)

    def stop(self) -> None:
        self._stopping.set()
        self.targets.on_add = None
        for engine in self._engines:
            engine.stop()
        if self._thread is not None:
            self._thread.join(3.0)
        with self._covered_changed:
            self._covered_changed.notify_all()

    def __enter__(self) -> Reflector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def covers(self, generation: int) -> bool:
        """Whether the filter in force takes every target address of that generation."""
        return self.filter["mode"] == "ports" or self._covered >= generation

    def wait_covered(self, generation: int | None = None, timeout: float = 1.0) -> bool:
        """Wait until the filter takes the target addresses of `generation` (default: all
        known now). The DNS watcher holds an answer naming a new AI address until then,
        so the client's first SYN to it is already diverted."""
        generation = self.targets.generation if generation is None else generation
        if self._swap_budget.ready_in() > timeout:
            timeout = 0.0  # no swap can come in time (see SwapBudget): holding the answer gains nothing
        with self._covered_changed:
            return self._covered_changed.wait_for(
                lambda: self.covers(generation) or self._stopping.is_set() or not self._alive(), timeout) \
                and self.covers(generation)

    def _alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    # -- the handles ----------------------------------------------------------------------
    def _open_engine(self, priority: int) -> tuple[Engine, int]:
        """A handle whose filter names the current AI addresses, or the server ports alone
        once the addresses no longer fit a filter. Returns it with the generation it covers."""
        generation, addresses = self.targets.snapshot()
        if self.filter["mode"] == "addresses" and len(addresses) > self.max_filter_addresses:
            self._filter_by_ports(f"{len(addresses)} AI addresses, more than a filter holds "
                                  f"({self.max_filter_addresses})")
        if self.filter["mode"] == "addresses":
            try:
                return self._engine(reflector_filter(self.ports, addresses, self.plain), priority), generation
            except InvalidFilterError as e:  # e.g. a filter length limit lower than ours
                self._ports_for_good = True
                self._filter_by_ports(f"the address filter was refused: {e}")
        return self._engine(reflector_filter(self.ports, plain=self.plain), priority), generation

    def _engine(self, filter: str, priority: int) -> Engine:
        engine = Engine(filter, priority=priority, policy="block", watchdog=self.watchdog)
        self.filter["handles"] += 1
        handle, ring = engine.handle, engine.ring
        try:
            if self.fast_path:
                ring.fast_enable(self.ports, self.own_ports.mask, self.flows.max_flows + self.targets.max_addresses,
                                 any_address=list(self.plain.ports) if self.plain else ())
                ring.fast_open_syns(self.open_syns and self._opening)
                if self.open_syns:
                    ring.fast_guard(handle.death_pipe())
            entries = self.flows.entries()  # flows carried by the handle this one succeeds
            handle.abort_on_death(*(entry.client_port for entry in entries))
            if self.fast_path:
                for entry in entries:
                    ring.fast_add(*entry.key)
        except BaseException:
            engine.stop()  # half set up: it must not go on diverting
            raise
        return engine

    def _filter_by_ports(self, why: str) -> None:
        self.filter.update(mode="ports", why_ports=why)
        with self._covered_changed:
            self._covered_changed.notify_all()

    def _start_engine(self, priority: int) -> None:
        """Open a handle and make it current; the caller hands the previous one over."""
        engine, generation = self._open_engine(priority)
        self._engines = (*self._engines, engine)  # from here on, new addresses reach its ring too
        if self.fast_path:
            engine.ring.fast_add_targets(self.targets.keys(), enable=True)
        self.filter["addresses"] = len(self.targets) if self.filter["mode"] == "addresses" else 0
        with self._covered_changed:
            self._covered = generation
            self._covered_changed.notify_all()

    def _flow_opened(self, entry: FlowEntry) -> None:
        # A ring that opens a flow has told its guardian already; while two handles live
        # (a swap), either may have, so both are told.
        told = entry.from_ring and len(self._engines) == 1
        for engine in self._engines:
            if not told:  # should this process die, the guardian aborts the client's socket
                engine.handle.abort_on_death(entry.client_port)
            if self.fast_path:
                # A flow the ring opened keeps what it saw since; one opened here is new.
                engine.ring.fast_add(*entry.key, reopen=not entry.from_ring)

    def _flow_closed(self, entry: FlowEntry) -> None:
        """So a ring takes a SYN on this port for a new connection, not a retransmission."""
        if self.fast_path:
            for engine in self._engines:
                engine.ring.fast_mark_closed(*entry.key)

    def _adopt(self) -> None:
        """Take the flows the rings opened on clients' SYNs into the flow table, oldest
        first. The reflector thread does it when a ring wakes it; the proxy's lookup too,
        should the proxy accept the connection first."""
        if not self.open_syns:
            return
        with self._from_rings:
            for engine in self._engines:
                for server, client, client_port, proxy_port, server_port, version, created \
                        in engine.ring.fast_take_opened():
                    entry = FlowEntry(key_address(client, version), client_port, key_address(server, version),
                                      server_port, proxy_port, created=created, from_ring=True)
                    # Named after, by the reflector thread (_name_owners): this may run on the
                    # proxy's event loop, and naming asks the kernel.
                    if self.processes is not None:
                        self._unnamed.append(entry)
                    self.flows.open(entry)

    def _take_touched(self, engine: Engine) -> None:
        """The flows the ring carried since last asked, and the FINs and RSTs it passed."""
        with self._from_rings:
            self.flows.touch(engine.ring.fast_take_touched())

    def _flow_removed(self, entry: FlowEntry) -> None:
        for engine in self._engines:
            if self.fast_path:
                engine.ring.fast_remove(*entry.key)
            engine.handle.forget_on_death(entry.client_port)

    def _targets_added(self, keys: list[bytes]) -> None:
        """New AI addresses (DNS or resolver thread): into every live ring at once; in
        address mode, the reflector thread then swaps in a handle whose filter names them."""
        if self.fast_path:
            for engine in self._engines:
                engine.ring.fast_add_targets(keys)
        if self.filter["mode"] == "addresses":
            self._swap_wanted.set()
            engine = self.engine
            if engine is not None:
                engine.ring.wake()

    def _expire_targets(self) -> None:
        """Let go of AI addresses nobody names any more (see address_ttl). The handle is
        swapped for one whose filter and ring hold only the rest; once few enough are
        left, a port-only filter turns back into an address filter."""
        keep = [entry.key[0] for entry in self.flows.entries()]
        if not self.targets.expire(time.monotonic() - self.address_ttl, keep):
            return
        if self.filter["mode"] == "ports" and not self._ports_for_good \
                and len(self.targets) <= self.max_filter_addresses:
            self.filter.update(mode="addresses", why_ports=None)
        self._swap_engine(force=True)

    def _swap_if_allowed(self, wait: float) -> float:
        """Swap for a new address if the budget allows; else how long to wait for it."""
        self._swap_wanted.clear()  # first: an address added from here on sets it again
        if self.filter["mode"] != "addresses" or self.covers(self.targets.generation):
            return wait
        if not self._swap_budget.take():
            self._swap_wanted.set()
            if not self._swap_deferred:
                self._swap_deferred = True
                self.filter["swaps_deferred"] = self.filter.get("swaps_deferred", 0) + 1
            return min(wait, max(0.01, self._swap_budget.ready_in()))
        self._swap_deferred = False
        self._swap_engine()
        return wait

    def _swap_engine(self, force: bool = False) -> None:
        """Open the successor handle, then hand the old one over: it stops taking new
        packets, and the ones it still holds are decided here as usual, so none passes
        unreflected. The two priorities alternate; either handle decides alike.
        Without `force`, only when the filter names addresses and misses some."""
        self._swap_wanted.clear()
        if not force and (self.filter["mode"] != "addresses" or self.covers(self.targets.generation)):
            return
        old = self.engine
        try:
            self._start_engine(self.priority - 1 if old.handle.priority == self.priority else self.priority)
        except DivertError as e:  # the old handle carries on; the next new address tries again
            self.filter["swap_errors"] = self.filter.get("swap_errors", 0) + 1
            self.error = e
            return
        old.hand_over()
        deadline = time.monotonic() + 2.0
        while not old.handed_over and time.monotonic() < deadline:
            batch = old.next_batch(timeout=0.05)
            if batch is not None:
                self._decide(batch, old)
        self._adopt()
        if self.fast_path:
            self._take_touched(old)
        old.stop()  # a clean close: its guardian leaves the flows' sockets alone
        self._engines = tuple(e for e in self._engines if e is not old)
        _add_counts(self._retired["fast"], self._fast_counts(old))
        _add_counts(self._retired["engine"], old.counters())

    def counters(self) -> dict:
        """Reflected/own counts include the fast path's; `fast_path` has its share alone.
        The fast path's and the engine's counts add up every handle this reflector had."""
        counts = dict(self.counts)
        fast, engine = {}, {}
        if self.fast_path:
            fast = dict(self._retired["fast"])
            for live in self._engines:
                _add_counts(fast, self._fast_counts(live))
            current = self.engine
            if current is not None:
                fast.update(flows=current.ring.fast_flows(), targets=current.ring.fast_targets,
                            targets_failed=current.ring.fast_targets_failed)
            counts["reflected_to_proxy"] += fast.get("to_proxy", 0)
            counts["reflected_to_client"] += fast.get("to_client", 0)
            counts["own_upstream"] += fast.get("own_upstream", 0)
        if self._engines:
            engine = dict(self._retired["engine"])
            for live in self._engines:
                _add_counts(engine, live.counters())
        return {**counts, "fast_path": fast, "filter": {**self.filter, "live": len(self._engines)},
                "own_ports": dict(self.own_ports.counts),
                "flows": len(self.flows), "flow_table": dict(self.flows.counts), "engine": engine}

    @staticmethod
    def _fast_counts(engine: Engine) -> dict:
        ring = engine.ring
        return {"to_proxy": ring.fast_to_proxy, "to_client": ring.fast_to_client, "own_upstream": ring.fast_passed,
                "not_ai": ring.fast_passed_other, "batches": ring.fast_batches, "opened": ring.fast_opened[0]}

    def _run(self) -> None:
        next_expiry = time.monotonic() + 1.0
        # Target expiry: every half TTL, between 1 s and a minute.
        period = None if self.address_ttl is None else min(60.0, max(1.0, self.address_ttl / 2))
        next_target_expiry = next_expiry + (period or 0.0)
        try:
            while not self._stopping.is_set():
                wait = 0.5
                if self._swap_wanted.is_set():
                    wait = self._swap_if_allowed(wait)
                engine = self.engine
                batch = engine.next_batch(timeout=wait)
                if batch is not None:
                    self._decide(batch, engine)
                else:  # a timeout, or the ring opened flows
                    self._adopt()
                    if self._unnamed:
                        self._name_owners()
                if time.monotonic() >= next_expiry:
                    if self.fast_path:
                        self._adopt()
                        for live in self._engines:
                            self._take_touched(live)
                    self.flows.expire()
                    next_expiry = time.monotonic() + 1.0
                    if period is not None and next_expiry >= next_target_expiry:
                        self._expire_targets()
                        next_target_expiry = next_expiry + period
        except BaseException as e:  # whatever it is, redirection must not go on half alive
            if not self._stopping.is_set():
                self._fail(e)
        finally:
            with self._covered_changed:
                self._covered_changed.notify_all()

    def _fail(self, error: BaseException) -> None:
        """Redirection cannot go on (the watchdog failed open, or something unexpected
        broke): close every handle, so traffic flows directly, and keep why."""
        for engine in self._engines:
            try:
                engine.stop()
            except Exception:
                engine.handle.close()  # closing is what matters
        log.error("the reflector stopped (%s: %s); its divert handles are closed, traffic flows directly",
                  type(error).__name__, error, exc_info=error)
        self.error = self.failure = error  # last: who reads it may count on the handles being closed

    def _decide(self, batch, engine: Engine) -> None:
        self._adopt()  # first: the batch may hold packets of flows the ring just opened
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
        rows = batch.rows
        if not len(rows):
            return
        if len(rows) <= SMALL_BATCH:
            return self._process_small(batch, rows)
        valid = (rows["status"] == OK) & batch.outbound()
        src_port, dst_port = rows["src_port"], rows["dst_port"]

        to_server = valid & self._server_port[dst_port]
        # The registered port of the packet's family (a bit each: see own_ports.py).
        family = np.where(rows["ip_version"] == 6, IPV6_BIT, IPV4_BIT).astype(np.uint8)
        own = to_server & ((self.own_ports.mask[src_port] & family) != 0)
        self.counts["own_upstream"] += int(own.sum())
        to_server_rows = np.flatnonzero(to_server & ~own)
        to_server_rows = to_server_rows[self._any_address[dst_port[to_server_rows]]
                                        | self.targets.contains(rows["dst_addr"][to_server_rows])]
        # A row to a server port was judged as a client's above, whatever its source port.
        from_proxy_rows = np.flatnonzero(valid & self._proxy_port[src_port] & ~self._server_port[dst_port])

        taken = np.zeros(len(rows), dtype=bool)
        taken[self._take_to_server(rows, to_server_rows)] = True
        back = self._take_from_proxy(rows, from_proxy_rows)
        taken[back] = True
        if not taken.any():
            return
        for server_port, proxy_port in self.ports.items():
            self.counts["reflected_to_proxy"] += reflect(batch.data, rows, taken & (dst_port == server_port),
                                                         dst_port=proxy_port)
            self.counts["reflected_to_client"] += reflect(batch.data, rows, taken & (src_port == proxy_port),
                                                          src_port=server_port)
        bits = batch.addresses["bits"]
        bits[taken] &= _NOT_OUTBOUND  # re-injected as arriving, so the local stack accepts it
        batch.verdicts[taken] = Verdict.MODIFIED

    def _process_small(self, batch, rows) -> None:
        """The same decisions row by row with Python scalars: at interactive rates batches
        hold 1–3 packets, where numpy's per-call cost (~150 µs a batch) would dominate."""
        outbound = batch.outbound().tolist()
        status, flags = rows["status"].tolist(), rows["tcp_flags"].tolist()
        src_ports, dst_ports = rows["src_port"].tolist(), rows["dst_port"].tolist()
        families = [IPV6_BIT if v == 6 else IPV4_BIT for v in rows["ip_version"].tolist()]
        to_proxy: dict[int, list[int]] = {}  # proxy port → rows
        to_client: dict[int, list[int]] = {}  # server port → rows
        for i, (ok, out, sport, dport, f, family) in enumerate(zip(status, outbound, src_ports, dst_ports,
                                                                    flags, families)):
            if ok != OK or not out:
                continue
            if dport in self.ports:
                if self.own_ports.mask[sport] & family:
                    self.counts["own_upstream"] += 1
                    continue
                address = rows["dst_addr"][i].tobytes()
                if not self._any_address[dport] and address not in self.targets:
                    continue
                proxy_port = self.ports[dport]
                key = (address, sport, proxy_port)
                if f & TCP_SYN and not f & TCP_ACK and not self._syn(rows, i, key):
                    continue
                if self.flows.seen(key, f, from_client=True) is not None:
                    to_proxy.setdefault(proxy_port, []).append(i)
            elif sport in self._server_for_proxy:
                key = (rows["dst_addr"][i].tobytes(), dport, sport)
                if self.flows.seen(key, f, from_client=False) is not None:
                    to_client.setdefault(self._server_for_proxy[sport], []).append(i)
        if not to_proxy and not to_client:
            return
        for proxy_port, selected in to_proxy.items():
            self.counts["reflected_to_proxy"] += reflect(batch.data, rows, selected, dst_port=proxy_port)
        for server_port, selected in to_client.items():
            self.counts["reflected_to_client"] += reflect(batch.data, rows, selected, src_port=server_port)
        taken = [i for selected in (*to_proxy.values(), *to_client.values()) for i in selected]
        bits = batch.addresses["bits"]
        bits[taken] &= _NOT_OUTBOUND  # re-injected as arriving, so the local stack accepts it
        batch.verdicts[taken] = Verdict.MODIFIED

    def _take_to_server(self, rows, index: np.ndarray) -> np.ndarray:
        if not len(index):
            return index
        proxy_ports = self._proxy_for[rows["dst_port"][index]]
        first, inverse = _group(rows["dst_addr"][index], rows["src_port"][index], proxy_ports)
        flags = np.zeros(len(first), dtype=np.uint8)
        np.bitwise_or.at(flags, inverse, rows["tcp_flags"][index])
        keep = np.zeros(len(first), dtype=bool)
        for k, (row, f) in enumerate(zip(index[first], flags)):
            key = (rows["dst_addr"][row].tobytes(), int(rows["src_port"][row]), int(proxy_ports[first[k]]))
            if f & TCP_SYN and not f & TCP_ACK and not self._syn(rows, row, key):
                continue
            keep[k] = self.flows.seen(key, int(f), from_client=True) is not None
        return index[keep[inverse]]

    def _take_from_proxy(self, rows, index: np.ndarray) -> np.ndarray:
        if not len(index):
            return index
        first, inverse = _group(rows["dst_addr"][index], rows["dst_port"][index], rows["src_port"][index])
        flags = np.zeros(len(first), dtype=np.uint8)
        np.bitwise_or.at(flags, inverse, rows["tcp_flags"][index])
        keep = np.zeros(len(first), dtype=bool)
        for k, (row, f) in enumerate(zip(index[first], flags)):
            key = (rows["dst_addr"][row].tobytes(), int(rows["dst_port"][row]), int(rows["src_port"][row]))
            keep[k] = self.flows.seen(key, int(f), from_client=False) is not None
        return index[keep[inverse]]

    def _syn(self, rows, row: int, key) -> bool:
        """A client's SYN: False if its flow is not taken. An open flow goes on (a
        retransmission); a new one, or one that has ended (the rings' FINs and RSTs for
        it are collected first), is opened unless the process filter excludes it."""
        if self.fast_path:
            with self._from_rings:
                for engine in self._engines:
                    ends = engine.ring.fast_take_ends(*key)
                    if ends:
                        self.flows.touch([(key, ends)])
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

    def _name_owners(self) -> None:
        """After a batch is injected (so no SYN waits for it): name the owners of the flows
        opened since (here or by the rings), each the process holding its socket. The
        proxy then finds them named and need not leave its event loop to ask."""
        with self._from_rings:  # the proxy's lookup may be adopting flows meanwhile
            unnamed, self._unnamed = self._unnamed, []
        for entry in unnamed:
            if entry.pid is None:
                entry.pid, entry.process_name = self.processes.new_flow_owner(
                    entry.client_addr, entry.client_port, entry.server_addr, entry.server_port, since=entry.created)


def _add_counts(total: dict, counts: dict) -> None:
    """Add the integer counts of `counts` into `total`."""
    for name, value in counts.items():
        if isinstance(value, int) and not isinstance(value, bool):
            total[name] = total.get(name, 0) + value
