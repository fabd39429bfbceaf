"""Which process owns a packet: local sockets mapped to pids from SOCKET and FLOW events.

A packet carries no pid. The SOCKET layer says who binds, connects, listens and
accepts; the FLOW layer says who owns an established flow. Both give the local
address and port, so a packet belongs to the process that owns its local end.
psutil fills in the sockets that existed before we started listening.

Events arrive on their own handles, a little after or before the packets they
explain; callers hold packets for a moment (`SETTLE`) before asking.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections import OrderedDict

from oisp.divert import holders
from oisp.divert.address import row_key
from oisp.divert.constants import Event, Flag, Layer
from oisp.divert.errors import DivertError

SETTLE = 0.3  # seconds a packet waits for the event that names its process
GRACE = 2.0  # a closed socket keeps its late packets (FIN, last ACK) this long

_OWNING = {Event.SOCKET_BIND, Event.SOCKET_CONNECT, Event.SOCKET_LISTEN, Event.SOCKET_ACCEPT,
           Event.FLOW_ESTABLISHED}
_ENDING = {Event.SOCKET_CLOSE, Event.FLOW_DELETED}


def owner_key(address) -> bytes | None:
    """16 bytes as in a parsed packet row (IPv4 in the first 4), None for a wildcard."""
    key = row_key(address)
    return key if any(key) else None


def process_started(pid: int) -> float | None:
    """When a process started, None if it is gone: on Linux from /proc/PID/stat (one read),
    elsewhere from psutil. Only compared with itself: a pid's process is the same one
    while this stays the same."""
    if sys.platform.startswith("linux"):
        return holders.started(pid)
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


class ProcessNames:
    """pid -> process name, looked up once per process (a process may be gone by the time
    we ask). Each name is kept with its process's start time: asked for the `current`
    process, a pid now held by a newer process (pids are reused) is looked up afresh.
    At most MAX_NAMES pids are kept, the least recently asked for going first."""

    MAX_NAMES = 65536

    def __init__(self):
        self._names: OrderedDict[int, tuple[str | None, float | None]] = OrderedDict()  # pid → (name, started)
        self._lock = threading.Lock()  # the event threads and the reflector's ask at once

    def __call__(self, pid: int, current: bool = False, started: float | None = None) -> str | None:
        """`started`: the process's start time as `process_started` gives it, if known."""
        with self._lock:
            cached = self._names.get(pid)
            if cached is not None and not current:
                self._names.move_to_end(pid)
                return cached[0]
        started = process_started(pid) if started is None else started
        if started is not None and cached is not None and cached[1] == started:
            name = cached[0]
        elif started is None and cached is not None:
            return cached[0]  # gone: what we learned while it lived
        else:
            import psutil

            try:
                name = psutil.Process(pid).name()
            except (psutil.Error, OSError):
                name = None
        with self._lock:
            self._names[pid] = (name, started)
            self._names.move_to_end(pid)
            while len(self._names) > self.MAX_NAMES:
                self._names.popitem(last=False)
        return name

    def remember(self, pid: int) -> None:
        """Look the name up now, while the process surely exists."""
        self(pid, current=True)

    def label(self, pid: int) -> str:
        name = self(pid)
        return f"pid {pid} ({name})" if name else f"pid {pid}"


class SocketOwners:
    """(protocol, local address, local port) -> pid, with wildcard binds by port."""

    def __init__(self, names: ProcessNames | None = None):
        self.names = names or ProcessNames()
        self._lock = threading.Lock()
        self._owners: dict[tuple[int, bytes | None, int], int] = {}
        self._closed: dict[tuple[int, bytes | None, int], float] = {}

    def own(self, protocol: int, address, port: int, pid: int) -> None:
        if not port or not pid:
            return  # not bound yet, or the kernel's own
        key = (protocol, owner_key(address), port)
        self.names.remember(pid)
        with self._lock:
            self._owners[key] = pid
            self._closed.pop(key, None)

    def close(self, protocol: int, address, port: int) -> None:
        key = (protocol, owner_key(address), port)
        with self._lock:
            if key in self._owners:
                self._closed[key] = time.monotonic()

    def apply(self, events) -> None:
        for e in events:
            if e.event in _OWNING:
                self.own(e.protocol, e.local, e.local_port, e.pid)
            elif e.event in _ENDING:
                self.close(e.protocol, e.local, e.local_port)
        self._retire()

    def seed_from_system(self) -> None:
        """Sockets that existed before the event handles opened."""
        import psutil

        try:
            connections = psutil.net_connections(kind="inet")
        except (psutil.Error, OSError):
            return
        for c in connections:
            if c.pid and c.laddr:
                self.own(6 if c.type == socket.SOCK_STREAM else 17, c.laddr.ip, c.laddr.port, c.pid)

    def owner(self, protocol: int, address: bytes, port: int) -> int | None:
        owners = self._owners
        return owners.get((protocol, address, port)) or owners.get((protocol, None, port))

    def _retire(self) -> None:
        cutoff = time.monotonic() - GRACE
        with self._lock:
            for key in [k for k, t in self._closed.items() if t < cutoff]:
                del self._closed[key]
                self._owners.pop(key, None)


class EventFeed:
    """Consumes SOCKET and FLOW events (sniff handles) into a SocketOwners, in threads.

    Opening raises the engine's typed errors, e.g. LayerNotSupportedError when
    cgroup v2 is not mounted at /sys/fs/cgroup (Linux).
    """

    def __init__(self, owners: SocketOwners, *, on_events=None):
        from oisp.divert.engine import Engine

        self.owners = owners
        self.on_events = on_events
        self.engines = []
        try:
            for layer in (Layer.SOCKET, Layer.FLOW):
                self.engines.append(Engine("true", layer, flags=Flag.SNIFF | Flag.RECV_ONLY, policy="drop",
                                           watchdog=None))
        except Exception:
            self.stop()
            raise
        owners.seed_from_system()
        self._threads = [threading.Thread(target=self._consume, args=(e,), name=f"oisp-{e.handle.layer.name}",
                                          daemon=True) for e in self.engines]
        for t in self._threads:
            t.start()

    def _consume(self, engine) -> None:
        try:
            for batch in engine:
                events = batch.events()
                engine.release(batch)
                self.owners.apply(events)
                if self.on_events:
                    self.on_events(events)
        except DivertError:
            pass  # the handle closed under us (stop, watchdog): no more events, the capture goes on

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()
        for t in getattr(self, "_threads", ()):
            t.join(2.0)
