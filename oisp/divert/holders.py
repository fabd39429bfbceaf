"""Which process holds a socket, and when a process started: asked of Linux itself (/proc).

Why this is the answer that counts: a socket's inode names that one socket for its
whole life (the kernel hands inode numbers out from a counter), and /proc/PID/fd
shows who holds it now. A cache keyed by a local port, a table entry of the last
connection on the same four-tuple or a CONNECT seen a moment ago can all name the
process that used the port before; the holder of the inode cannot. A holder that
started after the connection was made got the socket by inheritance or fd passing,
so it is not the process that connected.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import time

from oisp.divert.address import unmapped

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# /proc/PID/stat counts start times in clock ticks, rounded down: a process that started
# in the same tick as the connection (or the next, as the clocks are read apart) passes.
START_SLACK = 2.0 / CLK_TCK


def holds(pid: int, inode: int) -> bool:
    """Whether `pid` has the socket with this inode open."""
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def started(pid: int) -> float | None:
    """When `pid` started, in seconds since boot (CLOCK_BOOTTIME, the clock of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: fields count from the last ')'.
        return int(stat[stat.rindex(b")") + 2:].split()[19]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def since_boot(wall: float) -> float:
    """A wall-clock time (time.time()) as seconds since boot, the clock `started` uses."""
    return wall - (time.time() - time.clock_gettime(time.CLOCK_BOOTTIME))


def holder(inode: int, pids, born_before: float | None = None,
           refused: list | None = None) -> tuple[int | None, float | None]:
    """The first of `pids` that holds the socket and had started by `born_before`
    (wall clock), with its start time (`started`); (None, None) if none. A holder that
    started later is skipped (noted in `refused`): the search goes on for the process
    that made the connection."""
    for pid in pids:
        if holds(pid, inode):
            start = started(pid)
            if start is not None and (born_before is None or start <= since_boot(born_before) + START_SLACK):
                return pid, start
            if refused is not None:
                refused.append(pid)
    return None, None


def pids_newest_first(exclude=frozenset()) -> list[int]:
    """Every pid in /proc, highest first: a program's first connection usually comes soon
    after it started, and pids are handed out in increasing order."""
    try:
        return sorted((int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) not in exclude),
                      reverse=True)
    except OSError:
        return []


def socket_inode(local_addr, local_port: int, remote_addr=None, remote_port: int | None = None) -> int | None:
    """The inode of the TCP socket with this local end (and remote end, when given) from
    /proc/net/tcp and tcp6: the fallback for sock_diag's exact lookup, some 500x slower
    with 2000 sockets in TIME_WAIT. Both addresses are matched, not the ports alone: a
    local port may serve connections to different servers at once, from different
    processes. Listeners and sockets without an inode (TIME_WAIT) are skipped."""
    locals_ = {f"{text}:{local_port:04X}" for text in _proc_forms(local_addr)}
    remotes = None if remote_addr is None or remote_port is None else \
        {f"{text}:{remote_port:04X}" for text in _proc_forms(remote_addr)}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1] in locals_ and (remotes is None or fields[2] in remotes) \
                            and fields[3] != "0A" and fields[9] != "0":  # 0A: LISTEN
                        return int(fields[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None


def _proc_forms(address) -> set[str]:
    """How /proc/net/tcp* writes an address: each 32-bit word in host byte order, in hex.
    An IPv4 address also appears IPv4-mapped in tcp6 (a dual-stack socket)."""
    address = unmapped(str(address))
    if address.version == 4:
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
        return {_words(address.packed), _words(mapped.packed)}
    return {_words(address.packed)}


def _words(packed: bytes) -> str:
    return "".join(f"{word:08X}" for word in struct.unpack(f"={len(packed) // 4}I", packed))
