"""Which process opened a flow, and whether its flows are taken (`--process`, `--exclude`).

The reflector must decide on a flow's first SYN, and a packet carries no pid.
Sources, cheapest first:
1. SOCKET/FLOW events (a sniff handle; on Linux it needs cgroup v2): a bound
   socket's CONNECT and every FLOW_ESTABLISHED name the owner of a local port.
2. A CONNECT from a socket not yet bound carries no local port, only the
   remote end: when every recent CONNECT to that server came from one pid,
   that is the owner.
3. psutil, for sockets that predate the handle, events that arrive after the
   SYN (they travel on their own handle), or when SOCKET is unavailable.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import socket
import threading
import time

from oisp.divert.owners import EventFeed, ProcessNames, SocketOwners
from oisp.divert.constants import Event
from oisp.divert.errors import DivertError
from oisp.redirect import sock_diag
from oisp.redirect.flows import address_key

CONNECT_WINDOW = 2.0  # seconds a portless CONNECT may explain a SYN to the same server
RECENT_OWNERS = 16  # processes whose fds are searched first for a new flow's socket


class ProcessFilter:
    """Include/exclude by pid or name. With an include list only those are taken;
    an exclusion always wins."""

    def __init__(self, include: str | list = (), exclude: str | list = ()):
        self.include_pids, self.include_names = self._parse(include)
        self.exclude_pids, self.exclude_names = self._parse(exclude)

    @staticmethod
    def _parse(spec) -> tuple[set[int], set[str]]:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        items = [str(i).strip() for i in items if str(i).strip()]
        return {int(i) for i in items if i.isdigit()}, {i.lower() for i in items if not i.isdigit()}

    @property
    def active(self) -> bool:
        return bool(self.include_pids or self.include_names or self.exclude_pids or self.exclude_names)

    def allows(self, pid: int | None, name: str | None) -> bool:
        name = (name or "").lower()
        if pid in self.exclude_pids or name in self.exclude_names:
            return False
        if self.include_pids or self.include_names:
            return pid in self.include_pids or name in self.include_names
        return True


class ProcessResolver:
    """Client (address, port) → (pid, name). Call `start_events()` to use SOCKET/FLOW
    events; without them (or until they arrive) psutil answers."""

    def __init__(self):
        self.names = ProcessNames()
        self.owners = SocketOwners(self.names)
        self.feed: EventFeed | None = None
        self.events_error: str | None = None
        self._lock = threading.Lock()
        self._connects: dict[tuple[bytes, int], collections.deque] = {}
        self._recent_pids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.counts = {"by_event": 0, "by_connect": 0, "by_recent_owner": 0, "by_proc_scan": 0, "by_psutil": 0,
                       "unknown": 0}

    def start_events(self) -> bool:
        """Open the SOCKET/FLOW sniff handles; False (reason in `events_error`) when the
        layers are unavailable, e.g. no cgroup v2 on Linux."""
        try:
            self.feed = EventFeed(self.owners, on_events=self._note_connects)
        except DivertError as e:
            self.events_error = str(e)
            return False
        return True

    def stop(self) -> None:
        if self.feed is not None:
            self.feed.stop()

    def _note_connects(self, events) -> None:
        now = time.monotonic()
        with self._lock:
            for e in events:
                if e.event == Event.SOCKET_CONNECT and e.pid and not e.local_port:
                    self.names.remember(e.pid)
                    key = (address_key(e.remote), e.remote_port)
                    self._connects.setdefault(key, collections.deque(maxlen=64)).append((now, e.pid))
            for key in [k for k, q in self._connects.items() if q[-1][0] < now - CONNECT_WINDOW]:
                del self._connects[key]

    def owner(self, client_addr, client_port: int, server_addr=None, server_port: int | None = None,
              *, guess: bool = False, use_psutil: bool = True,
              full_scan: bool = True) -> tuple[int | None, str | None]:
        """The owner of a client socket. `guess` allows source 2, good for attribution but
        not for a filter decision (another process's CONNECT may still be on its way).
        `use_psutil` allows source 3; `full_scan` its last resort, psutil's scan of every
        socket (~8-30 ms)."""
        pid = self.owners.owner(socket.IPPROTO_TCP, address_key(client_addr), client_port)
        if pid:
            self.counts["by_event"] += 1
        elif guess and server_addr is not None and (pid := self._only_connector(server_addr, server_port)):
            self.counts["by_connect"] += 1
        elif use_psutil and (found := self._inode_owner(client_addr, client_port, server_addr, server_port))[0]:
            pid = found[0]
            self.counts[found[1]] += 1
            self.owners.own(socket.IPPROTO_TCP, client_addr, client_port, pid)
        elif use_psutil and full_scan and (pid := self._psutil_owner(client_addr, client_port)):
            self.counts["by_psutil"] += 1
            self.owners.own(socket.IPPROTO_TCP, client_addr, client_port, pid)
        if pid:
            with self._lock:
                self._recent_pids[pid] = None
                self._recent_pids.move_to_end(pid)
                while len(self._recent_pids) > RECENT_OWNERS:
                    self._recent_pids.popitem(last=False)
        if not pid:
            self.counts["unknown"] += 1
            return None, None
        return pid, self.names(pid)

    def _only_connector(self, server_addr, server_port) -> int | None:
        cutoff = time.monotonic() - CONNECT_WINDOW
        with self._lock:
            queue = self._connects.get((address_key(server_addr), server_port), ())
            pids = {pid for t, pid in queue if t >= cutoff}
        return pids.pop() if len(pids) == 1 else None

    def _inode_owner(self, client_addr, client_port: int, server_addr=None,
                     server_port: int | None = None) -> tuple[int | None, str]:
        """Linux: the process holding the socket's inode — looked for first among the
        processes that owned recent flows (a program usually opens many connections),
        then among all processes, newest first (a program's first connection usually
        comes soon after it started). Each costs a few fd reads where psutil's full scan
        of /proc costs ~30 ms. The inode comes from an exact sock_diag lookup of the
        four-tuple (the socket's local end is the client, its remote end the server);
        without the server's end, or without sock_diag, from a scan of /proc/net/tcp*,
        which grows with every socket (TIME_WAIT included) of the namespace.
        Returns (pid or None, which way it was found)."""
        if server_addr is not None and server_port is not None and sock_diag.available():
            inode = sock_diag.tcp_inode(client_addr, client_port, server_addr, server_port)
        else:
            inode = _socket_inode(client_port)
        if not inode:
            return None, ""
        with self._lock:
            recent = list(reversed(self._recent_pids))
        if pid := _holder(inode, recent):
            return pid, "by_recent_owner"
        return _holder(inode, _pids_newest_first(exclude=set(recent))), "by_proc_scan"

    @staticmethod
    def _psutil_owner(client_addr, client_port: int) -> int | None:
        import psutil

        wanted = ipaddress.ip_address(client_addr)
        try:
            connections = psutil.net_connections(kind="tcp")
        except (psutil.Error, OSError):
            return None
        for c in connections:
            if c.pid and c.laddr and c.laddr.port == client_port and _same_address(c.laddr.ip, wanted):
                return c.pid
        return None


def _socket_inode(local_port: int) -> int | None:
    """The inode of the local TCP socket bound to `local_port` (Linux /proc/net/tcp, tcp6):
    the fallback for `sock_diag.tcp_inode`, some 500x slower with 2000 sockets in TIME_WAIT."""
    suffix = f":{local_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(suffix) and fields[3] != "0A" and fields[9] != "0":  # 0A: LISTEN
                        return int(fields[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None


def _pids_newest_first(exclude: set[int] = frozenset()) -> list[int]:
    try:
        return sorted((int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) not in exclude),
                      reverse=True)
    except OSError:
        return []


def _holder(inode: int, pids) -> int | None:
    """Which of `pids` holds the socket with this inode."""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def _same_address(text: str, wanted) -> bool:
    address = ipaddress.ip_address(text.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address == wanted
