"""Whether the sensor holds the ports the redirector reflects to, and the gate that
reflects new connections only while it does.

The redirector reflects a client's connection to a local port (8443 for HTTPS, one
port per plaintext model server). Whoever listens there receives AI traffic, in
plaintext for local model servers. The sensor runs as a user and may be away
(restarting, crashed): then any local program could bind the port and be served. So
the redirector reflects new connections only after the connected sensor has said
where it listens (IPC `listeners.set`) and the kernel confirms, for each port, that
every listening TCP socket on it belongs to the sensor's uid and that one of them is
held by the sensor's own process (its inode among the process's descriptors); and it
stops the moment that sensor's IPC connection closes (a crash closes it too).

Why every listening socket and not one: two sockets listen on one port only with
SO_REUSEPORT, which Linux allows between sockets of the same effective uid — so a
listener of another uid on the port is a squatter that got there first. Read from
/proc/net/tcp and tcp6 of the redirector's own network namespace (the sensor's: the
reflected packets are delivered there). Linux only: on Windows the same check would
read GetExtendedTcpTable's owning pids, which is not written, so a Windows redirector
refuses every sensor's listeners (and `oisp record` runs as one process there).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, NamedTuple

log = logging.getLogger(__name__)

TCP_LISTEN = "0A"  # the st column of /proc/net/tcp


class Listening(NamedTuple):
    port: int
    uid: int
    inode: int


def parse_listening(text: str) -> list[Listening]:
    """The LISTEN sockets of a /proc/net/tcp (or tcp6) table: port, owner uid, inode.
    Lines that do not parse are skipped (the header, a truncated read)."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        try:
            port = int(fields[1].rsplit(":", 1)[1], 16)
            found.append(Listening(port, int(fields[7]), int(fields[9])))
        except (IndexError, ValueError):
            continue
    return found


def listening_sockets(proc: Path = Path("/proc/self/net")) -> list[Listening]:
    out: list[Listening] = []
    for name in ("tcp", "tcp6"):
        try:
            out += parse_listening((proc / name).read_text())
        except OSError:  # no IPv6 in this kernel or namespace
            continue
    return out


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds (readable by root, or by its owner)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def refusal(ports: list[int], uid: int, pid: int, listening: list[Listening], held: set[int]) -> str | None:
    """Why the process `pid` of user `uid` cannot be trusted with `ports` (None: it can)."""
    for port in ports:
        sockets = [s for s in listening if s.port == port]
        if not sockets:
            return f"nothing listens on port {port}"
        strangers = sorted({s.uid for s in sockets if s.uid != uid})
        if strangers:
            return f"port {port} has a listening socket of uid {strangers[0]}, not the sensor's (uid {uid})"
        if not any(s.inode in held for s in sockets):
            return f"port {port}'s listening socket is not held by the sensor's process (pid {pid})"
    return None


def check_listeners(ports: list[int], uid: int, pid: int) -> str | None:
    if not sys.platform.startswith("linux"):  # a refusal, never a pass: nothing is reflected unchecked
        return "the check of the sensor's listening sockets is written for Linux only"
    return refusal(ports, uid, pid, listening_sockets(), socket_inodes(pid))


class ListenerGate:
    """The redirector's side: which session's listeners are in force. `expected` is where
    the redirector reflects each server port (fixed when it starts: the reflector's filter
    names those ports). `opening(bool)` starts and stops the reflecting of new connections."""

    def __init__(self, expected: dict[int, int], opening: Callable[[bool], None],
                 check: Callable[[list[int], int, int], str | None] = check_listeners,
                 on_change: Callable[[str], None] = lambda text: None):
        self.expected, self.opening, self.check, self.on_change = dict(expected), opening, check, on_change
        self.owner: object | None = None  # the session whose listeners are in force
        self._lock = threading.Lock()
        self.counts = {"accepted": 0, "refused": 0, "dropped": 0}

    def set(self, session: object, peer, wanted: dict[int, int]) -> None:
        """Raises ValueError(why) when refused; nothing changes then."""
        with self._lock:
            if self.owner is not None and self.owner is not session:
                self.counts["refused"] += 1
                raise ValueError("another sensor is recording")
            if not wanted:
                if self.owner is session:
                    self._drop("the sensor stopped listening")
                return
            why = self._why_not(peer, wanted)
            if why is not None:
                self.counts["refused"] += 1
                raise ValueError(why)
            self.owner = session
            self.counts["accepted"] += 1
            self.opening(True)
        self.on_change(f"a sensor (pid {peer.pid}, uid {peer.uid}) is recording")

    def dropped(self, session: object) -> None:
        with self._lock:
            if self.owner is session:
                self._drop("the sensor went away")

    def _drop(self, why: str) -> None:
        self.opening(False)
        self.owner = None
        self.counts["dropped"] += 1
        self.on_change(f"{why}: new connections go straight to their servers")

    def _why_not(self, peer, wanted: dict[int, int]) -> str | None:
        if wanted != self.expected:
            return (f"the sensor listens on {_describe(wanted)}, the redirector reflects to "
                    f"{_describe(self.expected)}")
        if peer is None or peer.uid is None:
            return "the sensor's identity is unknown"
        return self.check(sorted(set(wanted.values())), peer.uid, peer.pid)


def _describe(ports: dict[int, int]) -> str:
    return ", ".join(f"{server}→{listener}" for server, listener in sorted(ports.items())) or "nothing"
