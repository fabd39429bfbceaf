"""The flow table and the AI addresses mirrored into the rings' fast paths, and what the
rings did taken back into the flow table.

Each live handle's ring has a fast path (FastPath, _native/reflect_fast.h) with its own
table; while one handle hands over to the next, two do. Python's flow table stays the
record: its open/close/remove hooks and every new AI address reach every live table
here; the flows a ring opened on clients' SYNs are adopted into the flow table
(`adopt`), and the packets a ring carried mark their flows seen, with the FINs and
RSTs it passed (`take_touched`, `take_ends`).

`lock` is held while state moves from the rings to the flow table, so a flow's end is
never read before the flow is adopted. Without a fast path (`enabled` False) every
call does nothing.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

from oisp.divert.engine import Engine
from oisp.redirect.flows import FlowEntry, FlowTable, key_address
from oisp.redirect.succession import add_counts
from oisp.redirect.targets import TargetSet


class FastMirror:
    def __init__(self, flows: FlowTable, targets: TargetSet, live: Callable[[], tuple[Engine, ...]], *,
                 enabled: bool, open_syns: bool, adopted: Callable[[FlowEntry], None] | None = None):
        """`live`: the live handles, the current one last. `open_syns`: the rings open
        flows on clients' SYNs themselves (no process filter). `adopted`: told of each
        flow a ring opened, before it enters the flow table."""
        self.flows, self.targets, self._live = flows, targets, live
        self.enabled = enabled
        self.open_syns = enabled and open_syns
        self.adopted = adopted
        self.lock = threading.Lock()
        self._retired: dict = {}  # the counts of the handles handed over

    def _paths(self):
        return [engine.ring.fast for engine in self._live()] if self.enabled else []

    # -- a new handle ---------------------------------------------------------------------
    def enable(self, engine: Engine, ports: dict[int, int], own_mask, any_address: Iterable[int], *,
               opening: bool) -> None:
        """Give a new handle's ring its fast path. `opening`: new flows are taken (see
        stop_opening); a ring that opens flows itself tells the handle's guardian."""
        if not self.enabled:
            return
        fast = engine.ring.enable_fast(ports, own_mask, self.flows.max_flows + self.targets.max_addresses,
                                       any_address=list(any_address))
        fast.open_syns(self.open_syns and opening)
        if self.open_syns:
            fast.guard(engine.handle.death_pipe())

    def add_flows(self, engine: Engine, entries: list[FlowEntry]) -> None:
        """The flows already open (those of the handle this one succeeds), into its ring."""
        if self.enabled:
            fast = engine.ring.fast
            for entry in entries:
                fast.add(*entry.key)

    def current(self, engine: Engine) -> None:
        """The handle is live now: from here on new addresses reach its ring, so it is given
        every one known (and, each fitting, passes packets to other addresses in C)."""
        if self.enabled:
            engine.ring.fast.add_targets(self.targets.keys(), enable=True)

    def retired(self, engine: Engine) -> None:
        """The handle has handed over and stopped: its counts stay in the totals."""
        if self.enabled:
            add_counts(self._retired, self.counts(engine))

    # -- the flow table's hooks and the targets' ------------------------------------------
    def flow_opened(self, entry: FlowEntry) -> None:
        for fast in self._paths():
            # A flow the ring opened keeps what it saw since; one opened here is new.
            fast.add(*entry.key, reopen=not entry.from_ring)

    def flow_closed(self, entry: FlowEntry) -> None:
        """So a ring takes a SYN on this port for a new connection, not a retransmission."""
        for fast in self._paths():
            fast.mark_closed(*entry.key)

    def flow_removed(self, entry: FlowEntry) -> None:
        for fast in self._paths():
            fast.remove(*entry.key)

    def targets_added(self, keys: list[bytes]) -> None:
        for fast in self._paths():
            fast.add_targets(keys)

    def stop_opening(self) -> None:
        for fast in self._paths():
            fast.open_syns(False)

    def resume_opening(self) -> None:
        for fast in self._paths():
            fast.open_syns(self.open_syns)

    # -- from the rings ---------------------------------------------------------------------
    def adopt(self) -> None:
        """Take the flows the rings opened on clients' SYNs into the flow table, oldest
        first. The reflector thread does it when a ring wakes it; the proxy's lookup too,
        should the proxy accept the connection first."""
        if not self.open_syns:
            return
        with self.lock:
            for engine in self._live():
                for server, client, client_port, proxy_port, server_port, version, created \
                        in engine.ring.fast.take_opened():
                    entry = FlowEntry(key_address(client, version), client_port, key_address(server, version),
                                      server_port, proxy_port, created=created, from_ring=True)
                    if self.adopted is not None:
                        self.adopted(entry)
                    self.flows.open(entry)

    def take_touched(self, engine: Engine) -> None:
        """The flows the ring carried since last asked, and the FINs and RSTs it passed."""
        if not self.enabled:
            return
        with self.lock:
            self.flows.touch(engine.ring.fast.take_touched())

    def take_ends(self, key) -> None:
        """One flow's FINs and RSTs the rings passed, into the flow table now (before a SYN
        on its port is judged: a new connection, or a retransmission)."""
        if not self.enabled:
            return
        with self.lock:
            for fast in self._paths():
                ends = fast.take_ends(*key)
                if ends:
                    self.flows.touch([(key, ends)])

    # -- counts -----------------------------------------------------------------------------
    @staticmethod
    def counts(engine: Engine) -> dict:
        fast = engine.ring.fast
        if fast is None:
            return {}
        return {"to_proxy": fast.to_proxy, "to_client": fast.to_client, "own_upstream": fast.passed,
                "not_ai": fast.passed_other, "batches": fast.batches, "opened": fast.opened[0]}

    def counters(self) -> dict:
        """Every handle's counts added up (those handed over too), and the current table's
        size; {} without a fast path."""
        if not self.enabled:
            return {}
        fast = dict(self._retired)
        live = self._live()
        for engine in live:
            add_counts(fast, self.counts(engine))
        if live:
            current = live[-1].ring.fast
            fast.update(flows=current.flows(), targets=current.targets, targets_failed=current.targets_failed)
        return fast

