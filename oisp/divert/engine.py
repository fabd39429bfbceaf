"""The capture engine: a divert handle, a GIL-free receive ring, batches.

    with Engine("tcp.DstPort == 443", policy="block") as engine:
        for batch in engine:                  # or: async for batch in engine
            rows = batch.rows                 # parsed headers, one numpy row per packet
            batch.verdicts[rows["dst_port"] == 80] = Verdict.DROP
            engine.commit(batch)              # inject the rest, hand the slot back

A receiver thread fills preallocated slots in C without the GIL; the consumer
takes one slot at a time and must give it back (`commit` or `release`).
Counters always add up: received = sent + dropped + consumed + drained + held.

Fail open: if the consumer stops giving slots back for `watchdog` seconds, the
handle is shut down and closed so the kernel stops diverting, and the next
call raises `EngineStalled`; if the handle's guardian (Linux: it removes the
filters should this process be killed) dies, likewise, with `GuardianLost`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

import numpy as np

from oisp._native import ring as _ring  # compiled (Cython), no stubs: mypy takes it as Any
from oisp.divert import errors
from oisp.divert.address import ADDRESS_DTYPE, OUTBOUND, event_of, flow_address
from oisp.divert.backend import address_of
from oisp.divert.constants import MAX_BATCH, Event, Flag, Layer, Param, Shutdown
from oisp.divert.errors import EngineStalled, GuardianLost
from oisp.divert.handle import Handle
from oisp.divert.library import WINDOWS


def interface_mtus() -> dict[int, int]:
    """{ifindex: MTU} of this network namespace (Linux). The ring TCP-segments
    diverted packets larger than their interface's MTU before re-injecting
    them: Linux diverts before GSO splits them."""
    import socket
    from pathlib import Path

    mtus = {}
    for ifidx, name in socket.if_nameindex():
        try:
            mtus[ifidx] = int(Path(f"/sys/class/net/{name}/mtu").read_text())
        except (OSError, ValueError):
            pass
    return mtus


class Verdict(IntEnum):
    PASS = _ring.VERDICT_PASS
    DROP = _ring.VERDICT_DROP
    MODIFIED = _ring.VERDICT_MODIFIED  # injected like PASS; says the caller rewrote it


POLICIES = {"block": _ring.POLICY_BLOCK, "drop": _ring.POLICY_DROP}
RECEIVER_EXIT = 5.0  # seconds a stopping engine waits for its receive loop before closing the handle


@dataclass(frozen=True)
class FlowEvent:
    """One FLOW or SOCKET layer event."""

    event: Event
    pid: int
    protocol: int
    local: IPv4Address | IPv6Address
    local_port: int
    remote: IPv4Address | IPv6Address
    remote_port: int
    outbound: bool
    timestamp: int
    endpoint_id: int
    parent_endpoint_id: int


class Batch:
    """One slot's worth of packets, valid until committed or released.

    `data`, `addresses`, `offsets`, `lengths` and `verdicts` are numpy views
    into the ring's slot: no copies. Edit packets in place (e.g. with
    oisp.packet.reflect) and set their verdict to MODIFIED.
    """

    __slots__ = ("engine", "slot", "count", "nbytes", "data", "addresses", "offsets", "lengths", "verdicts",
                 "received_at", "_rows", "_done")

    def __init__(self, engine: Engine, slot: int):
        ring = engine._ring
        self.engine = engine
        self.slot = slot
        self.count = int(ring.counts[slot])
        self.nbytes = int(ring.nbytes[slot])
        self.data = ring.data[slot, : self.nbytes]
        self.addresses = ring.addresses[slot].view(ADDRESS_DTYPE)[: self.count]
        self.offsets = ring.offsets[slot, : self.count]
        self.lengths = ring.lengths[slot, : self.count]
        self.verdicts = ring.verdicts[slot, : self.count]
        self.received_at = time.time()
        self._rows: np.ndarray | None = None
        self._done = False

    def __len__(self) -> int:
        return self.count

    @property
    def rows(self) -> np.ndarray:
        """Parsed headers (oisp.packet.PACKET_DTYPE), parsed on first use into the slot's own rows."""
        if self._rows is None:
            from oisp.packet import parse_batch

            self._rows = parse_batch(self.data, self.nbytes, max_packets=self.count,
                                     out=self.engine._rows_for(self.slot))
        return self._rows

    def packet(self, i: int) -> memoryview:
        offset, length = int(self.offsets[i]), int(self.lengths[i])
        return memoryview(self.data)[offset:offset + length]

    def outbound(self) -> np.ndarray:
        return (self.addresses["bits"] & OUTBOUND) != 0

    def events(self) -> list[FlowEvent]:
        """FLOW/SOCKET events, addresses converted from host-order IPv4-mapped IPv6."""
        out = []
        for address in self.addresses:
            bits = int(address["bits"])
            out.append(FlowEvent(
                event=Event(event_of(bits)), pid=int(address["process_id"]), protocol=int(address["protocol"]),
                local=flow_address(address["local_addr"]), local_port=int(address["local_port"]),
                remote=flow_address(address["remote_addr"]), remote_port=int(address["remote_port"]),
                outbound=bool(bits & OUTBOUND), timestamp=int(address["timestamp"]),
                endpoint_id=int(address["endpoint_id"]), parent_endpoint_id=int(address["parent_endpoint_id"]),
            ))
        return out

    def commit(self) -> int:
        return self.engine.commit(self)

    def release(self) -> None:
        self.engine.release(self)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.engine.release(self)

    def __repr__(self) -> str:
        return f"<Batch slot={self.slot} packets={self.count} bytes={self.nbytes}>"


class Engine:
    """A divert handle plus its receive ring, watchdog and counters."""

    def __init__(self, filter: str = "true", layer: int = Layer.NETWORK, priority: int = 0,
                 flags: int = Flag.NONE, *, slots: int = 16, batch: int = MAX_BATCH, slot_bytes: int = 0,
                 policy: str = "block", watchdog: float | None = 5.0, queue_length: int | None = None,
                 queue_time: int | None = None, queue_size: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.handle = Handle(filter, layer, priority, flags)
        self.sniff = bool(self.handle.flags & (Flag.SNIFF | Flag.RECV_ONLY))
        try:
            for param, value in ((Param.QUEUE_LENGTH, queue_length), (Param.QUEUE_TIME, queue_time),
                                 (Param.QUEUE_SIZE, queue_size)):
                if value is not None:
                    self.handle.set_param(param, value)
        except Exception:
            self.handle.close()
            raise
        backend = self.handle.backend
        self._ring = _ring.ReceiveRing(
            backend.kind, backend.recv_ex_fn, 0 if self.sniff else backend.send_ex_fn,
            address_of(self.handle._handle), nslots=slots, batch=batch, slot_bytes=slot_bytes,
            policy=POLICIES[policy])
        self.policy = policy
        self.watchdog = watchdog
        if not self.sniff and not WINDOWS:
            for ifidx, mtu in interface_mtus().items():
                if ifidx < 1024:
                    self._ring.set_mtu(ifidx, mtu)
        self._rows: np.ndarray | None = None
        self._io_lock = threading.Lock()  # no inject may race the handle's close
        self._closed = False
        self._stopping = False  # from the start of stop(): the handle's errors are ours, not failures
        self._handing_over = False
        self._stalled: errors.DivertError | None = None  # EngineStalled or GuardianLost
        self._last_send_error: str | None = None
        self._final_kernel_stats: dict[str, int] = {}
        self._passed_untaken = 0  # packets in batches nobody took, passed on at stop
        self._receiver = threading.Thread(target=self._ring.run, name="oisp-receiver", daemon=True)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._receiver.start()
        self.guardian_deaths = 0
        self._watchdog_thread = None
        if watchdog or self.handle.guarded:
            self._watchdog_thread = threading.Thread(target=self._watch, name="oisp-watchdog", daemon=True)
            self._watchdog_thread.start()

    # -- consuming --------------------------------------------------------------
    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch; None on timeout, or once the engine has stopped and is empty."""
        self._raise_if_failed()
        timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
        slot = self._ring.take(timeout_ms)
        if slot < 0:
            self._raise_if_failed()
            return None
        return Batch(self, slot)

    def __iter__(self):
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    async def next_batch_async(self, timeout: float | None = None) -> Batch | None:
        """As next_batch, without blocking the event loop (the wait runs in a helper thread)."""
        batch = self.next_batch(0)
        if batch is not None:
            return batch
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="oisp-wait")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.next_batch, timeout)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Batch:
        batch = await self.next_batch_async()
        if batch is None:
            raise StopAsyncIteration
        return batch

    def commit(self, batch: Batch) -> int:
        """Inject the batch's packets whose verdict is PASS or MODIFIED (none in sniff mode),
        then hand the slot back. Returns the number injected. A failed inject does not
        raise: it is counted in `send_errors` and described in `last_send_error`, so one
        bad packet never stops the consumer."""
        self._finish(batch)
        if self.sniff:
            self._ring.release_consumed(batch.slot)
            return 0
        with self._io_lock:
            if self._closed:
                self._ring.release_dropped(batch.slot)
                raise errors.HandleClosedError("inject: the engine has stopped", hint="commit before stop()")
            result = self._ring.commit(batch.slot)
        if result < 0:
            self._last_send_error = str(self.handle.backend.error(-result, "inject"))
            return 0
        return result

    def release(self, batch: Batch) -> None:
        """Hand the slot back without injecting: sniffed packets count as consumed,
        diverted ones as dropped."""
        self._finish(batch)
        if self.sniff:
            self._ring.release_consumed(batch.slot)
        else:
            self._ring.release_dropped(batch.slot)

    def _finish(self, batch: Batch) -> None:
        if batch.engine is not self:  # its slot number means another slot here
            raise ValueError(f"{batch!r} belongs to another engine")
        if batch._done:
            raise ValueError(f"{batch!r} was already handed back")
        batch._done = True

    def _rows_for(self, slot: int) -> np.ndarray:
        if self._rows is None:
            from oisp.packet import PACKET_DTYPE

            self._rows = np.zeros((self._ring.nslots, self._ring.batch), dtype=PACKET_DTYPE)
        return self._rows[slot]

    # -- state ------------------------------------------------------------------
    @property
    def ring(self):
        """The native receive ring, for work that runs inside it (the reflector's fast path)."""
        return self._ring

    def counters(self) -> dict:
        ring = self._ring
        ready, held_slots = ring.occupancy()
        fast_error = ring.fast.send_error if ring.fast is not None else 0
        counters = {
            "received": ring.received,
            "sent": ring.sent - self._passed_untaken,  # those are counted as drained
            "dropped": ring.dropped_overflow + ring.dropped_verdict + ring.dropped_drain + ring.send_errors,
            "dropped_overflow": ring.dropped_overflow,
            "dropped_verdict": ring.dropped_verdict,
            "send_errors": ring.send_errors,
            "segmented": ring.segmented,
            "last_send_error": self._last_send_error or (
                str(self.handle.backend.error(fast_error, "inject")) if fast_error else None),
            "consumed": ring.consumed,
            "drained": ring.drained + self._passed_untaken,  # passed unexamined because stopping
            "held": ring.held_packets(),
            "batches": ring.batches,
            "ring_slots": ring.nslots,
            "ring_occupancy": ready + held_slots,
            "ring_high_water": ring.high_water,
            "guardian_deaths": self.guardian_deaths,
            "kernel": {},
        }
        with self._io_lock:
            counters["kernel"] = self._final_kernel_stats if self._closed else self.handle.stats()
        return counters

    def _raise_if_failed(self) -> None:
        if self._stalled is not None:
            raise self._stalled
        code = self._ring.error
        if code and not self._stopping:
            error = self.handle.backend.error(code, "receive")
            if not (self._handing_over and isinstance(error, errors.HandleClosedError)):
                raise error

    # -- handing over to a successor handle -------------------------------------
    def hand_over(self) -> None:
        """Stop new packets being queued for this handle: from now on they go to the
        other handles (a successor opened with another filter). What is already queued
        is still received, taken and committed as usual; `handed_over` turns true once
        it is all taken. Then `stop()`. Unlike stop(), nothing queued passes untouched."""
        with self._io_lock:  # not while the watchdog closes the handle (fail open)
            self._handing_over = True
            self.handle.shutdown(Shutdown.RECV)

    @property
    def handed_over(self) -> bool:
        """After hand_over(): the receive loop has ended and no batch is left to take."""
        return self._handing_over and self._ring.wait_stopped(0) and self._ring.occupancy()[0] == 0

    def _watch(self) -> None:
        """Close the handle if slots stop coming back while packets wait, or if its
        guardian dies (from then on a kill of this process would black-hole traffic)."""
        interval = min(0.1, self.watchdog / 4) if self.watchdog else 0.1
        last_releases, last_progress = self._ring.releases, time.monotonic()
        while not self._closed:
            time.sleep(interval)
            if self.handle.guardian_died and not self._closed:
                self.guardian_deaths += 1
                self._fail_open(GuardianLost(
                    "the guardian process, which removes this handle's filters should oisp be killed, died",
                    hint="the divert handle was closed so traffic flows again; restart the capture"))
                return
            if not self.watchdog:
                continue
            releases = self._ring.releases
            ready, held = self._ring.occupancy()
            now = time.monotonic()
            if releases != last_releases or ready + held == 0:
                last_releases, last_progress = releases, now
            elif now - last_progress > self.watchdog:
                self._fail_open(EngineStalled(
                    f"the consumer returned no batch for {now - last_progress:.1f} s",
                    hint="the divert handle was closed so traffic flows again; restart the capture"))
                return

    def _fail_open(self, why: errors.DivertError) -> None:
        self._stalled = why
        self._shutdown(drain=False)

    # -- stopping ---------------------------------------------------------------
    def stop(self, timeout: float = 2.0) -> None:
        """Orderly stop: no new packets are queued for us, the ones still queued are
        passed through, batches nobody took are injected, then the handle closes.
        Batches the consumer still holds can no longer be committed."""
        self._shutdown(drain=True, timeout=timeout)

    def _shutdown(self, drain: bool, timeout: float = 2.0) -> None:
        with self._io_lock:
            if self._closed:
                return
            self._stopping = True
            try:
                if drain:
                    self._ring.drain()
                    self.handle.shutdown(Shutdown.RECV)
                    self._receiver.join(timeout)
                self._ring.stop()
                self._pass_untaken()
                self.handle.shutdown(Shutdown.BOTH)
            except errors.DivertError:
                pass  # closing below is what matters
            finally:
                self._ring.stop()  # also when a shutdown above failed: the loop must end first
                # Stopped and shut down, the loop leaves within one receive (100 ms); closing
                # before it has would free the handle under a call in progress. Only a hung
                # backend call outlasts RECEIVER_EXIT: then close anyway (fail open).
                self._receiver.join(max(timeout, RECEIVER_EXIT))
                try:
                    self._final_kernel_stats = self.handle.stats()
                except errors.DivertError:
                    pass
                self._closed = True
                self.handle.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _pass_untaken(self) -> None:
        while (slot := self._ring.take(0)) >= 0:
            if self.sniff:
                self._ring.release_dropped(slot)
            else:
                self._passed_untaken += max(self._ring.commit(slot), 0)

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Engine {self.handle!r} policy={self.policy}>"
