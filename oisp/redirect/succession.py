"""The reflector's divert handles over time: which filter the current one holds, and the
succession that swaps in a new one when the AI addresses change.

A filter is fixed when a handle opens, so a new AI address (from DNS) means a
successor handle: it opens, becomes current, and the old one hands over what it still
holds, decided as usual, so no packet passes unreflected (see `swap`). The two
priorities alternate; either handle decides alike. Past `max_filter_addresses` the
filter names the server ports alone ("ports" mode), and the addresses are checked by
the reflector and the rings instead. Swaps are rationed (SwapBudget): whoever can make
DNS answers name new addresses must not keep the reflector doing nothing else.

What a handle needs besides its filter (the fast path, the guardian told of the open
flows) and what is done with the batches the old one still holds are the reflector's:
it passes them in as callables.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from oisp.divert.engine import Engine
from oisp.divert.errors import DivertError, InvalidFilterError
from oisp.redirect.plain import PlainPorts
from oisp.redirect.targets import TargetSet

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


class Succession:
    """The live handles (the current one last; two only while one hands over to the
    next), the filter they hold, and the swaps. Every method but `want_swap`, `covers`
    and `wait_covered` runs on the reflector thread (or before it starts)."""

    def __init__(self, targets: TargetSet, ports: dict[int, int], plain: PlainPorts | None, *, priority: int,
                 watchdog: float | None, address_filter: bool, max_filter_addresses: int,
                 prepare: Callable[[Engine], None], joined: Callable[[Engine], None],
                 decide: Callable[[object, Engine], None], leaving: Callable[[Engine], None],
                 left: Callable[[Engine], None], survived: Callable[[BaseException], None]):
        """`prepare(engine)`: set up a new handle before it is current (on failure it is
        stopped); `joined(engine)`: it is current; `decide(batch, engine)`: a batch the
        old handle still holds; `leaving(engine)`: the old handle has handed everything
        over, before it stops; `left(engine)`: it has stopped; `survived(error)`: a swap
        failed, and the old handle carries on."""
        self.targets, self.ports, self.plain = targets, ports, plain
        self.priority, self.watchdog = priority, watchdog
        self._prepare, self._joined, self._decide, self._leaving, self._left = prepare, joined, decide, leaving, left
        self._survived = survived
        # The plaintext clause spends part of the filter's budget.
        self.max_filter_addresses = max(0, max_filter_addresses - (plain.cost() if plain else 0))
        self.ports_for_good = not address_filter  # asked for, or the backend refused a filter
        self.engines: tuple[Engine, ...] = ()
        # What the filter names: "addresses" (the AI set; a new address means a new handle)
        # or "ports" (every packet to a server port; the addresses are checked elsewhere).
        self.filter = {"mode": "addresses" if address_filter else "ports", "addresses": 0, "handles": 0,
                       "why_ports": None if address_filter else "asked for"}
        self.covered = 0  # the target generation the current filter holds
        self.covered_changed = threading.Condition()
        self.swap_wanted = threading.Event()
        self.budget = SwapBudget()
        self._swap_deferred = False  # a wanted swap waits for the budget (counted once)
        self._retired: dict = {}  # engine counts of the handles handed over

    @property
    def engine(self) -> Engine | None:
        """The current handle: the one new packets are queued for."""
        return self.engines[-1] if self.engines else None

    # -- coverage -------------------------------------------------------------------------
    def covers(self, generation: int) -> bool:
        """Whether the filter in force takes every target address of that generation."""
        return self.filter["mode"] == "ports" or self.covered >= generation

    def wait_covered(self, generation: int, timeout: float, give_up: Callable[[], bool]) -> bool:
        """Wait until the filter takes the target addresses of `generation`, or `give_up()`."""
        if self.budget.ready_in() > timeout:
            timeout = 0.0  # no swap can come in time (see SwapBudget): holding the answer gains nothing
        with self.covered_changed:
            return self.covered_changed.wait_for(lambda: self.covers(generation) or give_up(), timeout) \
                and self.covers(generation)

    def wake_waiters(self) -> None:
        with self.covered_changed:
            self.covered_changed.notify_all()

    def filter_by_ports(self, why: str) -> None:
        self.filter.update(mode="ports", why_ports=why)
        self.wake_waiters()

    # -- opening ----------------------------------------------------------------------------
    def _open(self, priority: int) -> tuple[Engine, int]:
        """A handle whose filter names the current AI addresses, or the server ports alone
        once the addresses no longer fit a filter. Returns it with the generation it covers."""
        generation, addresses = self.targets.snapshot()
        if self.filter["mode"] == "addresses" and len(addresses) > self.max_filter_addresses:
            self.filter_by_ports(f"{len(addresses)} AI addresses, more than a filter holds "
                                 f"({self.max_filter_addresses})")
        if self.filter["mode"] == "addresses":
            try:
                return self._engine(reflector_filter(self.ports, addresses, self.plain), priority), generation
            except InvalidFilterError as e:  # e.g. a filter length limit lower than ours
                self.ports_for_good = True
                self.filter_by_ports(f"the address filter was refused: {e}")
        return self._engine(reflector_filter(self.ports, plain=self.plain), priority), generation

    def _engine(self, filter: str, priority: int) -> Engine:
        engine = Engine(filter, priority=priority, policy="block", watchdog=self.watchdog)
        self.filter["handles"] += 1
        try:
            self._prepare(engine)
        except BaseException:
            engine.stop()  # half set up: it must not go on diverting
            raise
        return engine

    def start(self, priority: int | None = None) -> None:
        """Open a handle and make it current; the caller hands the previous one over."""
        engine, generation = self._open(self.priority if priority is None else priority)
        self.engines = (*self.engines, engine)  # from here on, new addresses reach its ring too
        self._joined(engine)
        self.filter["addresses"] = len(self.targets) if self.filter["mode"] == "addresses" else 0
        with self.covered_changed:
            self.covered = generation
            self.covered_changed.notify_all()

    # -- swapping ---------------------------------------------------------------------------
    def want_swap(self) -> None:
        """New AI addresses: in address mode, the reflector thread swaps in a handle whose
        filter names them (woken now if it waits for packets)."""
        if self.filter["mode"] == "addresses":
            self.swap_wanted.set()
            engine = self.engine
            if engine is not None:
                engine.ring.wake()

    def swap_if_allowed(self, wait: float) -> float:
        """Swap for a new address if the budget allows; else how long to wait for it."""
        self.swap_wanted.clear()  # first: an address added from here on sets it again
        if self.filter["mode"] != "addresses" or self.covers(self.targets.generation):
            return wait
        if not self.budget.take():
            self.swap_wanted.set()
            if not self._swap_deferred:
                self._swap_deferred = True
                self.filter["swaps_deferred"] = self.filter.get("swaps_deferred", 0) + 1
            return min(wait, max(0.01, self.budget.ready_in()))
        self._swap_deferred = False
        self.swap()
        return wait

    def swap(self, force: bool = False) -> None:
        """Open the successor handle, then hand the old one over: it stops taking new
        packets, and the ones it still holds are decided as usual, so none passes
        unreflected. Without `force`, only when the filter names addresses and misses some."""
        self.swap_wanted.clear()
        if not force and (self.filter["mode"] != "addresses" or self.covers(self.targets.generation)):
            return
        old = self.engine
        try:
            self.start(self.priority - 1 if old.handle.priority == self.priority else self.priority)
        except DivertError as e:  # the old handle carries on; the next new address tries again
            self.filter["swap_errors"] = self.filter.get("swap_errors", 0) + 1
            self._survived(e)
            return
        old.hand_over()
        deadline = time.monotonic() + 2.0
        while not old.handed_over and time.monotonic() < deadline:
            batch = old.next_batch(timeout=0.05)
            if batch is not None:
                self._decide(batch, old)
        self._leaving(old)
        old.stop()  # a clean close: its guardian leaves the flows' sockets alone
        self.engines = tuple(e for e in self.engines if e is not old)
        self._left(old)
        add_counts(self._retired, old.counters())

    def expire_targets(self, before: float, keep: list[bytes]) -> None:
        """Let go of AI addresses nobody named since `before` and no flow in `keep` uses:
        the handle is swapped for one whose filter and ring hold only the rest; once few
        enough are left, a port-only filter turns back into an address filter."""
        if not self.targets.expire(before, keep):
            return
        if self.filter["mode"] == "ports" and not self.ports_for_good \
                and len(self.targets) <= self.max_filter_addresses:
            self.filter.update(mode="addresses", why_ports=None)
        self.swap(force=True)

    # -- the end ----------------------------------------------------------------------------
    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    def close_all(self) -> None:
        """Failing open: every handle closed, whatever else goes wrong."""
        for engine in self.engines:
            try:
                engine.stop()
            except Exception:
                engine.handle.close()  # closing is what matters

    def counters(self) -> dict:
        """The engine counts of every handle this succession had ({} before the first)."""
        if not self.engines:
            return {}
        engine = dict(self._retired)
        for live in self.engines:
            add_counts(engine, live.counters())
        return engine


def add_counts(total: dict, counts: dict) -> None:
    """Add the integer counts of `counts` into `total`."""
    for name, value in counts.items():
        if isinstance(value, int) and not isinstance(value, bool):
            total[name] = total.get(name, 0) + value
