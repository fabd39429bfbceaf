"""The reflector: outbound TCP to AI endpoints lands on the local proxy, streamdump-style.

One divert handle sees (a) clients' outbound packets to a redirected server
port and (b) the proxy's outbound packets from its proxy port. Per batch, in
numpy and one native call per direction:

(a) to a known AI address, from a port that is not the proxy's own upstream
    (`OwnPorts`), of a flow the table knows (a SYN creates it): swap the
    addresses, set the destination port to the proxy port, inject inbound.
    The proxy accepts a socket whose peer is (server, client port).
(b) from the proxy port to a flow the table knows: swap the addresses, set the
    source port back to the server port, inject inbound. The client sees the
    server it dialled.

Everything else passes untouched: unknown destinations, the proxy's own
upstream connections (loop-free: see own_ports.py), excluded processes, and
flows that began before the reflector (no SYN seen, so no entry).

The fast path (on by default): once a flow is open, the receive ring itself
reflects its packets and passes the proxy's upstream packets, in C without the
GIL (_native/reflect_fast.h), and it passes packets to addresses that are not
AI endpoints (the target set is mirrored into it). Only batches holding a
client's SYN to an AI address or a packet of an unknown flow reach `process` here. The ring's table mirrors the flow
table through its open/remove hooks; once a second the flows it carried are
marked seen (idle expiry) with the FINs and RSTs it passed (closing them).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from oisp.divert.address import OUTBOUND
from oisp.divert.engine import Engine, Verdict
from oisp.divert.errors import DivertError
from oisp.packet import OK, TCP_ACK, TCP_SYN, reflect
from oisp.redirect.flows import FlowEntry, FlowTable, key_address
from oisp.redirect.own_ports import OwnPorts
from oisp.redirect.processes import ProcessFilter, ProcessResolver
from oisp.redirect.targets import TargetSet

DEFAULT_PORTS = {443: 8443}  # server port → proxy port
_NOT_OUTBOUND = np.uint32(~OUTBOUND & 0xFFFFFFFF)


SMALL_BATCH = 8  # up to this many rows, decide row by row (see _process_small)


def reflector_filter(ports: dict[int, int], own_range: tuple[int, int] | None = None) -> str:
    """Clients' packets to the server ports (not from the proxy's reserved upstream
    range: see own_ports.py) and the proxy's packets from its proxy ports."""
    servers = " or ".join(f"tcp.DstPort == {p}" for p in sorted(ports))
    proxies = " or ".join(f"tcp.SrcPort == {p}" for p in sorted(ports.values()))
    if own_range is not None:
        low, high = own_range
        outside = f"tcp.SrcPort < {low}" + (f" or tcp.SrcPort > {high}" if high < 65535 else "")
        servers = f"(({servers}) and ({outside}))"
    return f"tcp and outbound and ({servers} or {proxies})"


def _group(addresses: np.ndarray, ports_a: np.ndarray, ports_b: np.ndarray):
    """Unique (address, port, port) keys of some rows: (keys, first row of each, row → key)."""
    packed = np.empty((len(addresses), 20), dtype=np.uint8)
    packed[:, :16] = addresses
    packed[:, 16:18] = ports_a.astype("<u2").view(np.uint8).reshape(-1, 2)
    packed[:, 18:20] = ports_b.astype("<u2").view(np.uint8).reshape(-1, 2)
    _, first, inverse = np.unique(packed.view("V20").reshape(-1), return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


class Reflector:
    """Runs the reflect loop in a thread: `start()`, `stop()`, or use it as a context manager."""

    def __init__(self, targets: TargetSet, flows: FlowTable, own_ports: OwnPorts, *,
                 ports: dict[int, int] | None = None, processes: ProcessResolver | None = None,
                 process_filter: ProcessFilter | None = None, priority: int = 0, watchdog: float | None = 5.0,
                 fast_path: bool = True):
        self.targets, self.flows, self.own_ports = targets, flows, own_ports
        self.ports = dict(ports or DEFAULT_PORTS)
        self.processes = processes
        self.process_filter = process_filter if process_filter and process_filter.active else None
        if self.process_filter and processes is None:
            raise ValueError("a process filter needs a ProcessResolver")
        self.priority, self.watchdog, self.fast_path = priority, watchdog, fast_path
        self._server_port = np.zeros(65536, dtype=bool)
        self._proxy_port = np.zeros(65536, dtype=bool)
        self._proxy_for = np.zeros(65536, dtype=np.uint16)  # server port → its proxy port
        self._server_port[list(self.ports)] = True
        self._proxy_port[list(self.ports.values())] = True
        self._proxy_for[list(self.ports)] = list(self.ports.values())
        self._server_for_proxy = {proxy: server for server, proxy in self.ports.items()}
        self.engine = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.counts = {"reflected_to_proxy": 0, "reflected_to_client": 0, "own_upstream": 0, "excluded": 0,
                       "batch_errors": 0}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Reflector:
        self.engine = Engine(reflector_filter(self.ports, self.own_ports.range), priority=self.priority,
                             policy="block", watchdog=self.watchdog)
        # Should this process die, the guardian aborts the clients' redirected sockets.
        handle, ring = self.engine.handle, self.engine.ring
        if self.fast_path:
            ring.fast_enable(self.ports, self.own_ports.mask, self.flows.max_flows + self.targets.max_addresses)
            self.targets.on_add = ring.fast_add_targets  # first, so no address learned meanwhile is missed
            ring.fast_add_targets(self.targets.keys(), enable=True)

        def opened(entry: FlowEntry) -> None:
            handle.abort_on_death(entry.client_port)
            if self.fast_path:
                ring.fast_add(*entry.key)

        def removed(entry: FlowEntry) -> None:
            if self.fast_path:
                ring.fast_remove(*entry.key)
            handle.forget_on_death(entry.client_port)

        self.flows.on_open, self.flows.on_remove = opened, removed
        self._thread = threading.Thread(target=self._run, name="oisp-reflector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self.fast_path:
            self.targets.on_add = None
        if self.engine is not None:
            self.engine.stop()
        if self._thread is not None:
            self._thread.join(3.0)

    def __enter__(self) -> Reflector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def counters(self) -> dict:
        """Reflected/own counts include the fast path's; `fast_path` has its share alone."""
        counts = dict(self.counts)
        fast = {}
        if self.engine is not None and self.fast_path:
            ring = self.engine.ring
            fast = {"to_proxy": ring.fast_to_proxy, "to_client": ring.fast_to_client,
                    "own_upstream": ring.fast_passed, "not_ai": ring.fast_passed_other, "batches": ring.fast_batches,
                    "flows": ring.fast_flows(), "targets": ring.fast_targets,
                    "targets_failed": ring.fast_targets_failed}
            counts["reflected_to_proxy"] += fast["to_proxy"]
            counts["reflected_to_client"] += fast["to_client"]
            counts["own_upstream"] += fast["own_upstream"]
        return {**counts, "fast_path": fast, "own_ports": dict(self.own_ports.counts), "flows": len(self.flows), "flow_table": dict(self.flows.counts),
                "engine": self.engine.counters() if self.engine else {}}

    def _run(self) -> None:
        next_expiry = time.monotonic() + 1.0
        try:
            while not self._stopping.is_set():
                batch = self.engine.next_batch(timeout=0.5)
                if batch is not None:
                    try:
                        self.process(batch)
                    except Exception as e:  # one bad batch must not stop redirection
                        self.counts["batch_errors"] += 1
                        self.error = e
                    self.engine.commit(batch)
                if time.monotonic() >= next_expiry:
                    if self.fast_path:
                        self.flows.touch(self.engine.ring.fast_take_touched())
                    self.flows.expire()
                    next_expiry = time.monotonic() + 1.0
        except DivertError as e:
            if not self._stopping.is_set():
                self.error = e  # e.g. the watchdog failed open: traffic flows unredirected

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
        own = to_server & self.own_ports.mask[src_port]
        self.counts["own_upstream"] += int(own.sum())
        to_server_rows = np.flatnonzero(to_server & ~own)
        to_server_rows = to_server_rows[self.targets.contains(rows["dst_addr"][to_server_rows])]
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
        to_proxy: dict[int, list[int]] = {}  # proxy port → rows
        to_client: dict[int, list[int]] = {}  # server port → rows
        for i, (ok, out, sport, dport, f) in enumerate(zip(status, outbound, src_ports, dst_ports, flags)):
            if ok != OK or not out:
                continue
            if dport in self.ports:
                if self.own_ports.mask[sport]:
                    self.counts["own_upstream"] += 1
                    continue
                address = rows["dst_addr"][i].tobytes()
                if address not in self.targets:
                    continue
                proxy_port = self.ports[dport]
                key = (address, sport, proxy_port)
                if f & TCP_SYN and not f & TCP_ACK:
                    self._collect_ends(key)
                    entry = self.flows.get(key)
                    if (entry is None or entry.closed_at is not None) and not self._open(rows, i, key):
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
            if f & TCP_SYN and not f & TCP_ACK:
                self._collect_ends(key)
                entry = self.flows.get(key)
                if (entry is None or entry.closed_at is not None) and not self._open(rows, row, key):
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

    def _collect_ends(self, key) -> None:
        """Before deciding on a client's SYN: the FIN/RST the ring saw for this flow, so
        a flow that ended there is re-opened, not continued."""
        if self.fast_path and self.engine is not None:
            ends = self.engine.ring.fast_take_ends(*key)
            if ends:
                self.flows.touch([(key, ends)])

    def _open(self, rows, row: int, key) -> bool:
        """A client's SYN: create its flow unless the process filter excludes it."""
        version = int(rows["ip_version"][row])
        client = key_address(rows["src_addr"][row].tobytes(), version)
        server = key_address(key[0], version)
        client_port, server_port = key[1], int(rows["dst_port"][row])
        pid = name = None
        if self.processes is not None:
            exact = self.process_filter is not None  # a decision may not rest on a guess
            pid, name = self.processes.owner(client, client_port, server, server_port,
                                             guess=not exact, use_psutil=exact)
            if exact and not self.process_filter.allows(pid, name):
                self.counts["excluded"] += 1
                return False
        self.flows.open(FlowEntry(client, client_port, server, server_port, key[2], pid, name))
        return True
