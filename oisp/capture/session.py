"""A capture: a sniff engine feeding a pcapng writer, with optional process attribution.

Sniff mode: the kernel hands us copies, so a slow capture delays no traffic; if
we fall behind, the kernel queue overflows and that shows as drops.

With attribution (SOCKET/FLOW events available), each batch is copied and held
for `owners.SETTLE` seconds before it is written, so the event that names its
process has time to arrive; then its packets get "pid N (name)" comments and
`--process` keeps only the chosen process's packets.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from oisp.capture.clock import KernelClock
from oisp.divert.owners import SETTLE, ProcessNames, SocketOwners
from oisp.capture.progress import Progress
from oisp.divert.address import LOOPBACK, OUTBOUND
from oisp.divert.constants import Flag, Layer
from oisp.divert.process_filter import ProcessFilter
from oisp.pcapng.writer import INBOUND, OUTBOUND as PCAPNG_OUTBOUND, PcapngWriter

_TUPLE_DTYPE = np.dtype([("protocol", "u1"), ("src", "u1", 16), ("dst", "u1", 16), ("sport", "<u2"),
                         ("dport", "<u2"), ("bits", "u1")])
_OUT, _LOOP = 1, 2


@dataclass
class CaptureStats:
    packets: int = 0  # written
    bytes: int = 0
    received: int = 0  # sniffed, before the process filter
    dropped: int = 0  # lost to a full queue (ours or the kernel's)
    first: float = 0.0  # monotonic time of the first and last packet written
    last: float = 0.0
    engine: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        span = self.last - self.first
        return self.packets / span if span > 0 else 0.0


def packet_owners(owners: SocketOwners, rows: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each packet, the pid owning its source end and its destination end (0: unknown).

    Only ends that are local are looked up: the source of an outbound packet, the
    destination of an inbound one, both on loopback. One lookup per distinct 5-tuple.
    """
    n = len(rows)
    keys = np.empty(n, dtype=_TUPLE_DTYPE)
    keys["protocol"], keys["src"], keys["dst"] = rows["protocol"], rows["src_addr"], rows["dst_addr"]
    keys["sport"], keys["dport"] = rows["src_port"], rows["dst_port"]
    keys["bits"] = np.where(bits & OUTBOUND, _OUT, 0) | np.where(bits & LOOPBACK, _LOOP, 0)
    unique, which = np.unique(keys.view(f"V{_TUPLE_DTYPE.itemsize}"), return_inverse=True)
    src_pids = np.zeros(len(unique), np.int64)
    dst_pids = np.zeros(len(unique), np.int64)
    for i, key in enumerate(unique.view(_TUPLE_DTYPE)):
        protocol, flags = int(key["protocol"]), int(key["bits"])
        if flags & (_OUT | _LOOP):
            src_pids[i] = owners.owner(protocol, key["src"].tobytes(), int(key["sport"])) or 0
        if not flags & _OUT or flags & _LOOP:
            dst_pids[i] = owners.owner(protocol, key["dst"].tobytes(), int(key["dport"])) or 0
    return src_pids[which.ravel()], dst_pids[which.ravel()]


class ProcessMatcher:
    """`--process NAME|PID` over the pids of packets: ProcessFilter's rule, each pid
    decided once (and its name looked up only when a name can decide)."""

    def __init__(self, spec: str, names: ProcessNames):
        self.filter = ProcessFilter(include=spec)
        self.names = names
        self._cache: dict[int, bool] = {0: False}

    def __call__(self, pid: int) -> bool:
        if pid not in self._cache:
            name = self.names(pid) if self.filter.needs_names else None
            self._cache[pid] = self.filter.allows(pid, name)
        return self._cache[pid]

    def mask(self, pids: np.ndarray) -> np.ndarray:
        return np.fromiter((self(int(p)) for p in pids), bool, len(pids))


@dataclass
class _Held:
    """A batch copied out of its ring slot, waiting for its process events."""

    due: float
    data: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    timestamps: np.ndarray
    bits: np.ndarray
    if_idx: np.ndarray
    rows: np.ndarray


class Capture:
    def __init__(self, writer: PcapngWriter, filter: str = "true", *, count: int | None = None,
                 duration: float | None = None, process: str | None = None, attribute: bool = True,
                 progress: Progress | None = None, on_note=None):
        from oisp.divert.owners import EventFeed
        from oisp.divert.engine import Engine

        self.writer = writer
        self.count = count
        self.duration = duration
        self.progress = progress or Progress(enabled=False)
        self.stats = CaptureStats()
        self.stop_requested = threading.Event()
        self.clock = KernelClock()
        self.names = ProcessNames()
        self.matcher = ProcessMatcher(process, self.names) if process else None
        self._interfaces: dict[int, int] = {}
        self._held: deque[_Held] = deque()
        self.feed = None
        self.owners = None
        # The packet handle first: a bad filter fails before anything else is opened.
        self.engine = Engine(filter, Layer.NETWORK, flags=Flag.SNIFF, policy="block", watchdog=None)
        if attribute or process:
            self.owners = SocketOwners(self.names)
            try:
                self.feed = EventFeed(self.owners)
            except Exception as exc:
                if process:
                    self.engine.stop()
                    raise  # --process cannot work without the events
                self.owners = None
                if on_note:
                    on_note(f"no process comments: {exc}")

    def run(self) -> CaptureStats:
        deadline = time.monotonic() + self.duration if self.duration is not None else None
        try:
            while not self.stop_requested.is_set() and not self._count_reached():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
                batch = self.engine.next_batch(wait)
                if batch is not None:
                    self._take(batch)
                self._write_due(time.monotonic())
                if self.progress.due():
                    self._update_drops()
                    self.progress.draw(self.stats.packets, self.stats.bytes, self.stats.dropped)
        finally:
            self._finish()
        return self.stats

    def _count_reached(self) -> bool:
        return self.count is not None and self.stats.packets >= self.count

    def _take(self, batch) -> None:
        """Write the batch now, or (attributing) copy it out to write after SETTLE."""
        self.stats.received += batch.count
        addresses = batch.addresses
        try:
            if self.owners is None:
                self._write(batch.data, batch.offsets, batch.lengths, addresses["timestamp"], addresses["bits"],
                            addresses["if_idx"], None)
            else:
                self._held.append(_Held(time.monotonic() + SETTLE, batch.data.copy(), batch.offsets.copy(),
                                        batch.lengths.copy(), addresses["timestamp"].copy(),
                                        addresses["bits"].copy(), addresses["if_idx"].copy(), batch.rows.copy()))
        finally:
            self.engine.release(batch)

    def _write_due(self, now: float) -> None:
        while self._held and self._held[0].due <= now and not self._count_reached():
            h = self._held.popleft()
            self._write(h.data, h.offsets, h.lengths, h.timestamps, h.bits, h.if_idx, h.rows)

    def _write(self, data, offsets, lengths, timestamps, bits, if_idx, rows) -> None:
        comments, comment_ids = [], None
        select = None
        if rows is not None:
            src_pids, dst_pids = packet_owners(self.owners, rows, bits)  # type: ignore[arg-type]  # rows come only with owners
            pids = np.where(src_pids != 0, src_pids, dst_pids)  # the sender, if it is local
            if self.matcher:
                src_match = self.matcher.mask(src_pids)
                select = src_match | self.matcher.mask(dst_pids)
                pids = np.where(src_match, src_pids, dst_pids)  # name the chosen end (loopback has two)
            known, comment_ids = np.unique(pids, return_inverse=True)
            comments = [self.names.label(int(p)) if p else None for p in known]
            comment_ids = np.where(pids != 0, comment_ids.ravel(), -1)
        if self.count is not None:
            room = self.count - self.stats.packets
            keep = np.ones(len(offsets), bool) if select is None else select
            keep &= np.cumsum(keep) <= room
            select = keep
        if select is not None:
            offsets, lengths, timestamps, bits, if_idx = (a[select] for a in (offsets, lengths, timestamps, bits,
                                                                              if_idx))
            comment_ids = comment_ids[select] if comment_ids is not None else None
        if not len(offsets):
            return
        self.writer.write_batch(data, offsets, lengths, interfaces=self._interface_ids(if_idx, bits),
                                timestamps=self.clock.wall_ns(timestamps),
                                directions=np.where(bits & OUTBOUND, PCAPNG_OUTBOUND, INBOUND),
                                comments=comments, comment_ids=comment_ids)
        now = time.monotonic()
        self.stats.first = self.stats.first or now
        self.stats.last = now
        self.stats.packets += len(offsets)
        self.stats.bytes += int(lengths.sum())

    def _interface_ids(self, if_idx: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """pcapng interface ids, one Interface Description Block per divert interface index."""
        indexes, which = np.unique(if_idx, return_inverse=True)
        ids = np.empty(len(indexes), np.int64)
        for i, index in enumerate(indexes.tolist()):
            if index not in self._interfaces:
                loopback = bool(bits[which.ravel() == i][0] & LOOPBACK)
                try:
                    os_name = socket.if_indextoname(index)
                except OSError:
                    os_name = None
                self._interfaces[index] = self.writer.add_interface(
                    "loopback" if loopback else f"ifIdx {index}",
                    description=f"{os_name} (ifIdx {index})" if os_name else None)
            ids[i] = self._interfaces[index]
        return ids[which.ravel()]

    def _update_drops(self) -> None:
        counters = self.engine.counters()
        kernel = counters.get("kernel") or {}
        self.stats.engine = counters
        self.stats.dropped = counters["dropped"] + kernel.get("ringbuf_full", 0) + kernel.get("queue_full", 0)

    def _finish(self) -> None:
        try:
            self._update_drops()
        finally:
            self.engine.stop()
        if self._held and not self._count_reached():
            time.sleep(max(0.0, self._held[-1].due - time.monotonic()))  # let late events name the last packets
        self._write_due(float("inf"))
        if self.feed:
            self.feed.stop()
        self.writer.flush()
        self.progress.finish()
