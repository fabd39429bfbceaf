"""The flow table: which reflected connection came from which client, to which server.

After reflection the proxy accepts a socket whose peer is (original server
address, client port) and whose local address is (client address, proxy
port). That is the key here: (server address, client port, proxy port). The
proxy port is part of it because each redirected server port has its own
proxy port, and Linux may reuse one ephemeral client port towards different
server ports.

The engine loop writes and the proxy (another thread) reads, so every method
takes the lock. An entry ends when FIN has been seen in both directions or
RST in either (after `linger`, so the last ACKs are still reflected), or when
it has been idle for `idle_timeout` with no proxy connection open on it (the
proxy holds it: `hold`/`release`; a pooled keep-alive connection may sit idle
far longer than any packet timeout and must still be reflected when reused). The table holds at most `max_flows`;
inserting into a full table evicts the least recently seen entry, counted.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from oisp._native.ring import FastPath
from oisp.divert.address import row_key
from oisp.packet import TCP_FIN, TCP_RST

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
FlowKey = tuple[bytes, int, int]  # (server address as 16 bytes, client port, proxy port)
# How a flow ended, as the ring's fast path reports it (FastPath.take_touched), and as `seen` notes it.
ENDS_FIN_CLIENT, ENDS_FIN_PROXY, ENDS_RST = FastPath.FIN_CLIENT, FastPath.FIN_PROXY, FastPath.RST


def key_address(key: bytes, ip_version: int) -> Address:
    return ipaddress.IPv4Address(key[:4]) if ip_version == 4 else ipaddress.IPv6Address(key)


@dataclass
class FlowEntry:
    client_addr: Address
    client_port: int
    server_addr: Address
    server_port: int
    proxy_port: int
    pid: int | None = None
    process_name: str | None = None
    created: float = field(default_factory=time.time)  # wall clock, for events
    last_seen: float = field(default_factory=time.monotonic)  # monotonic, for expiry
    fin_from_client: bool = False
    fin_from_proxy: bool = False
    closed_at: float | None = None  # monotonic time the flow ended (FIN both ways or RST)
    from_ring: bool = False  # the receive ring opened it on the SYN, and the reflector adopted it
    held: int = 0  # proxy connections open on it: it never idles out meanwhile

    @property
    def key(self) -> FlowKey:
        return row_key(self.server_addr), self.client_port, self.proxy_port


class FlowTable:
    """Reflected flows by (server address, client port, proxy port); thread-safe."""

    def __init__(self, *, max_flows: int = 65536, idle_timeout: float = 300.0, linger: float = 2.0,
                 owner: Callable[..., tuple[int | None, str | None]] | None = None,
                 confirm: Callable[[Address, int, Address, int, int], bool | None] | None = None):
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self.linger = linger
        # owner(client, client port, server, server port, since=the flow's start) fills
        # pid/name on lookup when the reflector could not name them in time.
        self.owner = owner
        # confirm(client, client port, server, server port, pid): False when the socket on
        # the four-tuple now is not the one that pid holds (a new connection reused it).
        self.confirm = confirm
        self._lock = threading.Lock()
        self._flows: OrderedDict[FlowKey, FlowEntry] = OrderedDict()  # least recently seen first
        self.counts = {"created": 0, "closed": 0, "expired_idle": 0, "evicted": 0}
        self.on_open: Callable[[FlowEntry], None] | None = None  # called outside the lock
        self.on_remove: Callable[[FlowEntry], None] | None = None
        self.on_close: Callable[[FlowEntry], None] | None = None  # the flow ended (it lingers)
        # Called when a lookup misses, before looking again: flows opened elsewhere (the
        # receive ring, on the SYN) may not have been adopted yet.
        self.on_miss: Callable[[], None] | None = None

    # -- for the proxy --------------------------------------------------------------------
    def lookup(self, peer_addr, peer_port: int, proxy_port: int, *, name_owner: bool = True) -> FlowEntry | None:
        """The flow behind an accepted socket: `peer_addr, peer_port = sock.getpeername()[:2]`,
        `proxy_port = sock.getsockname()[1]`. With `name_owner`, an entry the reflector
        could not name yet is named now (which may scan /proc: not on an event loop)."""
        key = (row_key(peer_addr), peer_port, proxy_port)
        with self._lock:
            entry = self._flows.get(key)
        # An ended entry is the previous connection from the same port, lingering: the new
        # one may be waiting in a ring, not adopted yet.
        if (entry is None or entry.closed_at is not None) and self.on_miss is not None:
            self.on_miss()
            with self._lock:
                entry = self._flows.get(key)
        if entry is None:
            return None
        if entry.pid is not None and self.confirm is not None and self.confirm(
                entry.client_addr, entry.client_port, entry.server_addr, entry.server_port, entry.pid) is False:
            entry.pid = entry.process_name = None  # the name went with the pid: both are found again
        if name_owner and entry.pid is None and self.owner is not None:
            entry.pid, entry.process_name = self.owner(entry.client_addr, entry.client_port,
                                                       entry.server_addr, entry.server_port, since=entry.created)
        return entry

    def hold(self, entry: FlowEntry) -> None:
        """The proxy has a connection open on this flow (from its lookup)."""
        with self._lock:
            entry.held += 1

    def release(self, entry: FlowEntry, now: float | None = None) -> None:
        """The proxy closed it: from now on the flow idles out as usual."""
        with self._lock:
            entry.held -= 1
            entry.last_seen = time.monotonic() if now is None else now

    # -- for the reflector ----------------------------------------------------------------
    def get(self, key: FlowKey) -> FlowEntry | None:
        with self._lock:
            return self._flows.get(key)

    def open(self, entry: FlowEntry) -> FlowEntry:
        """A new flow (its SYN was seen); replaces a finished one with the same key (for
        which on_open alone is called: the key stays in use)."""
        gone = []
        with self._lock:
            self._flows.pop(entry.key, None)
            while len(self._flows) >= self.max_flows:
                gone.append(self._flows.popitem(last=False)[1])
                self.counts["evicted"] += 1
            self._flows[entry.key] = entry
            self.counts["created"] += 1
        self._notify(gone, entry)
        return entry

    def _notify(self, removed: list[FlowEntry], opened: FlowEntry | None = None) -> None:
        if self.on_remove is not None:
            for entry in removed:
                self.on_remove(entry)
        if opened is not None and self.on_open is not None:
            self.on_open(opened)

    def seen(self, key: FlowKey, tcp_flags: int, from_client: bool, now: float | None = None) -> FlowEntry | None:
        """Packets of a known flow went by (flags OR-ed over them): refresh it, note FIN/RST."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._flows.get(key)
            if entry is None:
                return None
            closed = self._refresh(entry, key, now,
                                   ((ENDS_FIN_CLIENT if from_client else ENDS_FIN_PROXY) if tcp_flags & TCP_FIN else 0)
                                   | (ENDS_RST if tcp_flags & TCP_RST else 0))
        if closed and self.on_close is not None:
            self.on_close(entry)
        return entry

    def touch(self, touched, now: float | None = None) -> None:
        """Flows whose packets went by elsewhere (the ring's fast path): [(key, ends)],
        `ends` as in reflect_fast.h (ENDS_FIN_CLIENT | ENDS_FIN_PROXY | ENDS_RST)."""
        now = time.monotonic() if now is None else now
        closed = []
        with self._lock:
            for key, ends in touched:
                entry = self._flows.get(key)
                if entry is not None and self._refresh(entry, key, now, ends):
                    closed.append(entry)
        if self.on_close is not None:
            for entry in closed:
                self.on_close(entry)

    def _refresh(self, entry: FlowEntry, key: FlowKey, now: float, ends: int) -> bool:
        """True if the flow ends with these packets."""
        entry.last_seen = now
        self._flows.move_to_end(key)
        entry.fin_from_client |= bool(ends & ENDS_FIN_CLIENT)
        entry.fin_from_proxy |= bool(ends & ENDS_FIN_PROXY)
        if entry.closed_at is None and (ends & ENDS_RST or (entry.fin_from_client and entry.fin_from_proxy)):
            entry.closed_at = now
            return True
        return False

    def expire(self, now: float | None = None) -> int:
        """Drop flows that ended more than `linger` ago, or that have been idle too long
        while the proxy holds no connection on them."""
        now = time.monotonic() if now is None else now
        idle_before, closed_before = now - self.idle_timeout, now - self.linger
        removed = []
        with self._lock:
            for key in [k for k, e in self._flows.items()
                        if (e.closed_at is not None and e.closed_at <= closed_before)
                        or (e.last_seen <= idle_before and not e.held)]:
                entry = self._flows.pop(key)
                self.counts["closed" if entry.closed_at is not None else "expired_idle"] += 1
                removed.append(entry)
        self._notify(removed)
        return len(removed)

    def __len__(self) -> int:
        with self._lock:
            return len(self._flows)

    def entries(self) -> list[FlowEntry]:
        with self._lock:
            return list(self._flows.values())
