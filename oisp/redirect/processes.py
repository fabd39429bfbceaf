"""Which process opened a flow (whether its flows are taken: oisp/divert/process_filter.py).

The reflector must decide on a flow's first SYN, and a packet carries no pid.
Linux answers exactly: the client socket's inode, from an exact sock_diag lookup
of the four-tuple (or /proc/net/tcp), and the process holding that inode, which
had started by the time of the SYN (oisp/divert/holders.py). Every other source only says
where to look first: the SOCKET/FLOW events (a sniff handle; on Linux it needs
cgroup v2), the processes that connected to the same server a moment ago, the
owners of recent flows, and last every process, newest first. So a port reused
by the next client, a CONNECT of the previous one or an inode cache can only
make the search shorter, never its answer wrong: a candidate that does not hold
the socket is refused (counted), and when no process can be shown to hold it
(the socket closed first) the owner is unknown rather than a guess.

Elsewhere (Windows: no /proc) the events are the source, bound to the connection:
an event counts only for the exact four-tuple, only while that socket is open,
and only if it came no earlier than LEAD before the flow's SYN (so not from the
connection that had the four-tuple before); a CONNECT of a socket not yet bound
names no local port, so it never answers there. psutil's table, matched on the
four-tuple, is the fallback. A candidate must be alive and have started by the SYN.
"""

from __future__ import annotations

import collections
import ipaddress
import socket
import sys
import threading
import time
from dataclasses import dataclass

from oisp.divert import holders
from oisp.divert.address import unmapped
from oisp.divert.constants import Event
from oisp.divert.errors import DivertError
from oisp.divert.owners import EventFeed, ProcessNames, SocketOwners
from oisp.redirect import sock_diag
from oisp.divert.address import row_key

CONNECT_WINDOW = 2.0  # seconds a CONNECT to a server points at its process for a new flow there
# Unverified platforms: how long before the SYN (as the ring saw it) an owning event of the
# same connection may have been taken in (connect() precedes the SYN by microseconds; the
# event and the packet travel on different handles).
LEAD = 0.25
BORN_SLACK = 0.1  # psutil's start times (unverified platforms) against the SYN's time
RECENT_OWNERS = 16  # processes whose fds are searched first for a new flow's socket
KNOWN_INODES = 65536  # socket inode → the process shown to hold it (a socket keeps its inode)
KNOWN_TUPLES = 65536  # owning events kept by four-tuple (an end event may be lost: oldest go first)
_OWNING = {Event.SOCKET_CONNECT, Event.FLOW_ESTABLISHED}
_ENDING = {Event.SOCKET_CLOSE, Event.FLOW_DELETED}


@dataclass(frozen=True)
class _Search:
    """How far an owner search goes past the candidates the events name."""

    connectors: bool  # Linux: the processes that connected to the same server lately, as candidates
    every_process: bool  # Linux: the recent owners, then every process, newest first
    psutil_table: bool  # elsewhere: psutil's table of every socket (~8-30 ms)


_FULL = _Search(connectors=False, every_process=True, psutil_table=True)
_NEW_FLOW = _Search(connectors=True, every_process=True, psutil_table=False)
_HINTS = _Search(connectors=True, every_process=False, psutil_table=False)


def _kernel_answers() -> bool:
    """Linux with /proc: the holder of a socket's inode can be asked."""
    return sys.platform.startswith("linux") and holders.started(1) is not None


class ProcessResolver:
    """Client (address, port) → (pid, name). Call `start_events()` to use SOCKET/FLOW
    events; without them (or until they arrive) /proc (Linux) or psutil answers."""

    def __init__(self, *, verify: bool | None = None):
        self.names = ProcessNames()
        self.owners = SocketOwners(self.names)
        self.feed: EventFeed | None = None
        self.events_error: str | None = None
        # Whether answers are checked against the kernel (see the module docstring).
        self.verifies = _kernel_answers() if verify is None else verify
        self._lock = threading.Lock()
        self._connects: dict[tuple[bytes, int], collections.deque] = {}
        # Owning events by four-tuple (local address None: a wildcard bind):
        # (local, local port, remote, remote port) → [noted (monotonic), pid, closed].
        self._tuples: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self._ended: collections.deque = collections.deque()  # (noted, key) of ended sockets, oldest first
        self._recent_pids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._inodes: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.counts = {"by_event": 0, "by_connect": 0, "by_inode": 0, "by_recent_owner": 0, "by_proc_scan": 0,
                       "by_psutil": 0, "unknown": 0, "socket_gone": 0, "refused": 0}

    def start_events(self) -> bool:
        """Open the SOCKET/FLOW sniff handles; False (reason in `events_error`) when the
        layers are unavailable, e.g. no cgroup v2 on Linux."""
        try:
            self.feed = EventFeed(self.owners, on_events=self._note_events)
        except DivertError as e:
            self.events_error = str(e)
            return False
        return True

    def stop(self) -> None:
        if self.feed is not None:
            self.feed.stop()

    def _note_events(self, events, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for e in events:
                if e.protocol != socket.IPPROTO_TCP:
                    continue
                if e.event == Event.SOCKET_CONNECT and e.pid:
                    self.names.remember(e.pid)
                    server = (row_key(e.remote), e.remote_port)
                    self._connects.setdefault(server, collections.deque(maxlen=64)).append((now, e.pid))
                if not e.local_port:
                    continue  # a CONNECT from a socket not bound yet: the FLOW event names it
                key = (_local_key(e.local), e.local_port, row_key(e.remote), e.remote_port)
                if e.event in _OWNING and e.pid:
                    known = self._tuples.get(key)
                    if known is not None and known[2] and known[1] == e.pid:
                        # The ended socket's own CONNECT, late (it travels on the SOCKET
                        # handle, its end on FLOW): it must not make the socket live again.
                        continue
                    self.names.remember(e.pid)
                    self._tuples[key] = [now, e.pid, False]
                    self._tuples.move_to_end(key)
                    while len(self._tuples) > KNOWN_TUPLES:
                        self._tuples.popitem(last=False)
                elif e.event in _ENDING and key in self._tuples:
                    self._tuples[key][0] = now
                    self._tuples[key][2] = True
                    self._ended.append((now, key))
            for server in [k for k, q in self._connects.items() if q[-1][0] < now - CONNECT_WINDOW]:
                del self._connects[server]
            # An ended socket's entry stays a while (never an answer; it keeps its late CONNECT
            # from passing for a live socket), then goes, unless another owner took the key since.
            while self._ended and self._ended[0][0] < now - CONNECT_WINDOW:
                noted, key = self._ended.popleft()
                entry = self._tuples.get(key)
                if entry is not None and entry[2] and entry[0] == noted:
                    del self._tuples[key]

    def owner(self, client_addr, client_port: int, server_addr=None, server_port: int | None = None,
              *, since: float | None = None) -> tuple[int | None, str | None]:
        """The owner of a client socket whose flow began at `since` (wall clock; None: no
        bound on the owner's start), searched as far as it takes. Where the kernel answers
        (Linux), the process holding the socket: the candidates the events name, then the
        recent owners and every process. Elsewhere an owning event of the four-tuple, then
        psutil's table of every socket (~8-30 ms), matched on the four-tuple."""
        return self._owner(client_addr, client_port, server_addr, server_port, since, _FULL)

    def new_flow_owner(self, client_addr, client_port: int, server_addr, server_port: int, *,
                       since: float) -> tuple[int | None, str | None]:
        """The owner of a flow just opened, asked on the redirector's thread: as `owner`,
        with the processes that just connected to the same server tried early (Linux: as
        candidates, each checked like the rest), and never psutil's table (elsewhere: too
        slow for that thread; the proxy's lookup asks `owner` for what stays unknown)."""
        return self._owner(client_addr, client_port, server_addr, server_port, since, _NEW_FLOW)

    def hinted_owner(self, client_addr, client_port: int, server_addr=None, server_port: int | None = None,
                     *, since: float | None = None) -> tuple[int | None, str | None]:
        """What the hints alone show: the candidates the events name and the processes that
        just connected to the same server (Linux: each checked like the rest), no search of
        every process or socket."""
        return self._owner(client_addr, client_port, server_addr, server_port, since, _HINTS)

    def _owner(self, client_addr, client_port, server_addr, server_port, since,
               search: _Search) -> tuple[int | None, str | None]:
        start = None  # the owner's start time, when the search read it
        if self.verifies:
            pid, how, start = self._held_owner(client_addr, client_port, server_addr, server_port, since, search)
        else:
            pid, how = self._event_owner(client_addr, client_port, server_addr, server_port, since,
                                         search.psutil_table)
        self.counts[how] += 1
        if not pid:
            return None, None
        with self._lock:
            self._recent_pids[pid] = None
            self._recent_pids.move_to_end(pid)
            while len(self._recent_pids) > RECENT_OWNERS:
                self._recent_pids.popitem(last=False)
        return pid, self.names(pid, current=True, started=start)  # this pid's process now, not an earlier one's

    def confirms(self, client_addr, client_port: int, server_addr, server_port: int, pid: int) -> bool | None:
        """Whether the socket on this four-tuple now is the one `pid` was shown to hold:
        False when another socket holds the four-tuple (a new connection reused it), None
        when it cannot be told (no sock_diag, or the socket is gone). One sock_diag
        lookup: cheap enough for the proxy's event loop."""
        if not self.verifies or not sock_diag.available():
            return None
        inode = sock_diag.tcp_inode(client_addr, client_port, server_addr, server_port)
        if not inode:
            return None
        with self._lock:
            return self._inodes.get(inode) == pid

    # -- Linux: the process holding the socket ---------------------------------------------
    def _held_owner(self, client_addr, client_port, server_addr, server_port, since,
                    search: _Search) -> tuple[int | None, str, float | None]:
        if server_addr is not None and server_port is not None and sock_diag.available():
            inode = sock_diag.tcp_inode(client_addr, client_port, server_addr, server_port)
        else:
            inode = holders.socket_inode(client_addr, client_port, server_addr, server_port)
        if not inode:
            return None, "socket_gone", None
        with self._lock:
            known = self._inodes.get(inode)
        if known is not None:
            return known, "by_inode", None  # the same socket: its owner was shown to hold it
        refused: list[int] = []
        tried: set[int] = set()
        # (how, candidate pids): None is every process, newest first
        steps: list[tuple[str, list[int] | None]] = [
            ("by_event", self._event_hints(client_addr, client_port, server_addr, server_port))]
        if search.connectors and server_addr is not None:
            steps.append(("by_connect", self._connectors(server_addr, server_port)))
        if search.every_process:
            with self._lock:
                steps.append(("by_recent_owner", list(reversed(self._recent_pids))))
            steps.append(("by_proc_scan", None))  # every other process, newest first
        pid = start = None
        for how, pids in steps:
            pids = holders.pids_newest_first(exclude=tried) if pids is None else [p for p in pids if p not in tried]
            tried.update(pids)
            pid, start = holders.holder(inode, pids, since, refused)
            if pid:
                break
            if how in ("by_event", "by_connect"):
                # Named by the events or a recent CONNECT, yet not holding the socket: the
                # previous user of the port, say.
                refused.extend(p for p in pids if p not in refused)
        self.counts["refused"] += len(refused)  # and holders that started after the SYN
        if not pid:
            return None, "unknown", None
        with self._lock:
            self._inodes[inode] = pid
            while len(self._inodes) > KNOWN_INODES:
                self._inodes.popitem(last=False)
        return pid, how, start

    def _event_hints(self, client_addr, client_port, server_addr, server_port) -> list[int]:
        pids = []
        if server_addr is not None and server_port is not None:
            with self._lock:
                for local in (row_key(client_addr), None):
                    entry = self._tuples.get((local, client_port, row_key(server_addr), server_port))
                    if entry is not None and not entry[2]:
                        pids.append(entry[1])
        pid = self.owners.owner(socket.IPPROTO_TCP, row_key(client_addr), client_port)
        if pid:
            pids.append(pid)
        return list(dict.fromkeys(pids))

    def _connectors(self, server_addr, server_port) -> list[int]:
        """The processes that connected to this server lately, newest first."""
        cutoff = time.monotonic() - CONNECT_WINDOW
        with self._lock:
            queue = self._connects.get((row_key(server_addr), server_port), ())
            return list(dict.fromkeys(pid for t, pid in reversed(queue) if t >= cutoff))

    # -- elsewhere: events bound to the connection, then psutil --------------------------
    def _event_owner(self, client_addr, client_port, server_addr, server_port, since,
                     psutil_table) -> tuple[int | None, str]:
        # The flow's SYN on the monotonic clock the events are noted on.
        syn = None if since is None else time.monotonic() - (time.time() - since)
        candidates = []
        if server_addr is not None and server_port is not None:
            with self._lock:
                for local in (row_key(client_addr), None):
                    entry = self._tuples.get((local, client_port, row_key(server_addr), server_port))
                    if entry is not None and not entry[2] and (syn is None or entry[0] >= syn - LEAD):
                        candidates.append(entry[1])
        for pid in candidates:
            if _alive_since(pid, since):
                return pid, "by_event"
            self.counts["refused"] += 1
        # The system's own table of live connections (Windows: GetExtendedTcpTable), exact
        # on the four-tuple.
        if psutil_table and (pid := _psutil_owner(client_addr, client_port, server_addr, server_port)):
            if _alive_since(pid, since):
                return pid, "by_psutil"
            self.counts["refused"] += 1
        return None, "unknown"


def _local_key(address) -> bytes | None:
    key = row_key(address)
    return key if any(key) else None  # a wildcard bind


def _alive_since(pid: int, since: float | None) -> bool:
    """psutil: the process is alive (a flow being named is open, so its owner lives) and
    had started by the flow's SYN."""
    import psutil

    try:
        return since is None or psutil.Process(pid).create_time() <= since + BORN_SLACK
    except (psutil.Error, OSError):
        return False


def _psutil_owner(client_addr, client_port: int, server_addr=None, server_port: int | None = None) -> int | None:
    """The pid of the connection with this local end (and remote end, when given) in
    psutil's table of every socket; one in TIME_WAIT has none."""
    import psutil

    wanted = ipaddress.ip_address(str(client_addr))
    server = None if server_addr is None else ipaddress.ip_address(str(server_addr))
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for c in connections:
        if not (c.pid and c.laddr and c.laddr.port == client_port and _same_address(c.laddr.ip, wanted)):
            continue
        if server is None or (c.raddr and c.raddr.port == server_port and _same_address(c.raddr.ip, server)):
            return c.pid
    return None


def _same_address(text: str, wanted) -> bool:
    return unmapped(text) == unmapped(wanted)
