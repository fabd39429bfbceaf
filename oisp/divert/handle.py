"""A divert handle: open, batched receive and inject, parameters, orderly stop.

This is the thin, synchronous layer over one backend handle. The capture
engine builds its ring and threads on top of it.
"""

from __future__ import annotations

import threading

import numpy as np

from oisp.divert import errors
from oisp.divert.address import new_addresses
from oisp.divert.backend import INFINITE, Backend, get_backend
from oisp.divert.constants import MAX_BATCH, MTU_MAX, PARAM_LIMITS, Flag, Layer, Param, Shutdown
from oisp.divert.filter import check_filter
from oisp.divert.guardian import Guardian, missing_tools, owned_prog_ids
from oisp.divert.preflight import check_layer, check_privileges


def _timeout_ms(timeout: float | None) -> int:
    return INFINITE if timeout is None else max(0, int(timeout * 1000))


class Handle:
    """One open divert handle.

    >>> with Handle("udp.DstPort == 5353") as h:
    ...     packet, address = h.recv()
    ...     h.send(packet, address)
    """

    def __init__(self, filter: str = "true", layer: int = Layer.NETWORK, priority: int = 0,
                 flags: int = Flag.NONE, *, backend: Backend | None = None):
        if not -30000 <= priority <= 30000:
            raise ValueError(f"priority must be in -30000..30000, not {priority}")
        self.filter = filter
        self.layer = Layer(layer)
        self.priority = priority
        self.flags = Flag(flags)
        self.backend = backend or get_backend()
        self._preflight()
        self._lock = threading.Lock()  # close() must not race a concurrent close()
        self._guardian = None
        self._handle = None
        diverts = self.backend.name == "ebpfdivert" and not self.flags & (Flag.SNIFF | Flag.RECV_ONLY)
        if diverts and not missing_tools():  # else fail-open on a kill is unavailable: preflight.check_guardian
            self._guardian = Guardian()  # first, so a death while the handle opens is covered too
        before = owned_prog_ids() if diverts else set()
        try:
            self._handle = self.backend.open(filter, self.layer, priority, self.flags)
        finally:
            if self._handle is None and self._guardian is not None:
                self._guardian.close()
        if self._guardian is not None:
            self._guardian.guard(owned_prog_ids() - before)
        self._scratch: tuple[bytearray, np.ndarray] | None = None

    def _preflight(self) -> None:
        """Say exactly what is missing before the backend gives a bare EPERM."""
        check_filter(self.filter, self.layer)
        problems = check_privileges() + check_layer(self.layer)
        if problems:
            first = problems[0]
            cls = errors.LayerNotSupportedError if first.what == "cgroup2" else (
                errors.BTFMissingError if first.what == "btf" else errors.PrivilegeError)
            raise cls("cannot open divert handle: " + "; ".join(p.message for p in problems), hint=first.fix)

    # -- state ----------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._handle is not None

    def _live(self):
        handle = self._handle
        if handle is None:
            raise errors.HandleClosedError("the handle is closed", hint="open a new handle")
        return handle

    # -- batched I/O ----------------------------------------------------------------
    def recv_batch(self, buf, addresses: np.ndarray, *, max_packets: int = MAX_BATCH,
                   timeout: float | None = None) -> tuple[int, int]:
        """Receive up to `max_packets` packets packed back to back into `buf`, their
        addresses into `addresses`. Returns (bytes, packets). The backend never waits
        to fill a batch: it returns what is queued once at least one packet is."""
        count = min(max_packets, len(addresses))
        return self.backend.recv_ex(self._live(), buf, len(buf), addresses, count, _timeout_ms(timeout))

    def send_batch(self, buf, nbytes: int, addresses: np.ndarray, count: int) -> int:
        """Inject `count` packets packed back to back in the first `nbytes` of `buf`."""
        if count > len(addresses):
            raise ValueError(f"{count} packets but only {len(addresses)} addresses")
        return self.backend.send_ex(self._live(), buf, nbytes, addresses, count)

    # -- one packet -----------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> tuple[bytes, np.void]:
        """One packet and its address record (convenience; use recv_batch for speed)."""
        if self._scratch is None:
            self._scratch = (bytearray(MTU_MAX), new_addresses(1))
        buf, address = self._scratch
        nbytes = self.backend.recv(self._live(), buf, len(buf), address, _timeout_ms(timeout))
        return bytes(buf[:nbytes]), address[0].copy()

    def send(self, packet: bytes, address) -> int:
        addresses = new_addresses(1)
        addresses[0] = address
        return self.backend.send(self._live(), bytes(packet), len(packet), addresses)

    # -- fail open --------------------------------------------------------------------
    def abort_on_death(self, *ports: int) -> None:
        """If this process dies, abort the local TCP sockets on `ports` (connections this
        handle redirects, which would otherwise wait forever). Linux; a no-op elsewhere."""
        if self._guardian is not None:
            self._guardian.protect(*ports)

    def forget_on_death(self, port: int) -> None:
        if self._guardian is not None:
            self._guardian.forget(port)

    @property
    def guarded(self) -> bool:
        """Whether a guardian removes this handle's filters should this process die."""
        return self._guardian is not None

    @property
    def guardian_died(self) -> bool:
        """Whether the guardian of this open handle has died (a kill would now black-hole
        what it diverts: the engine fails open)."""
        guardian = self._guardian
        return guardian is not None and not guardian.alive

    def death_pipe(self) -> int | None:
        """A new descriptor (the caller closes it) of the pipe that tells the guardian which
        ports to abort, for code outside Python that opens flows (the receive ring writes
        `+PORT\n` lines, each one write). None without a guardian."""
        return self._guardian.dup_pipe() if self._guardian is not None else None

    # -- control --------------------------------------------------------------------
    def set_param(self, param: Param, value: int) -> None:
        low, _, high = PARAM_LIMITS[Param(param)]
        if not low <= value <= high:
            raise ValueError(f"{Param(param).name} must be in {low}..{high}, not {value}")
        self.backend.set_param(self._live(), param, value)

    def get_param(self, param: Param) -> int:
        return self.backend.get_param(self._live(), param)

    def stats(self) -> dict[str, int]:
        """Kernel-side counters where the backend keeps them (eBPFDivert), else {}."""
        return self.backend.handle_stats(self._live())

    def event_fd(self) -> int | None:
        return self.backend.event_fd(self._live())

    def shutdown(self, how: Shutdown = Shutdown.RECV) -> None:
        """Stop receiving (packets stop queueing; queued ones can still be read) and/or sending."""
        self.backend.shutdown(self._live(), how)

    def close(self) -> None:
        """Close once; afterwards the kernel stops diverting to this handle."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            self.backend.close(handle)
        if self._guardian is not None:
            self._guardian.close()
            self._guardian = None

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # A leaked handle would black-hole every packet it matches: close it.
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<Handle {self.layer.name} {self.filter!r} priority={self.priority} {state}>"
