"""Fail open on Linux when the process holding a divert handle dies.

eBPFDivert 0.0.5 attaches its BPF programs as classic TC filters, which
outlive the process: after a SIGKILL they keep diverting into a queue nobody
reads, and the matching traffic is black-holed (measured: no packet passes
until the filters are removed; `ebpfdivert_unregister()` does not remove
them). So each diverting handle gets a guardian: a small child process, in
the same network namespace, started before the handle opens and told the
handle's programs right after. It waits for its parent's pipe to close. If the
pipe closes without the parent saying it closed cleanly, or a SIGTERM, SIGINT
or SIGHUP reaches the guardian, it deletes the TC filters that run the
parent's programs, and traffic flows again within milliseconds. No signal
interrupts that cleanup; should the parent die while opening, before it named
its programs, the guardian removes the filters no live process holds instead.

A connection that was being redirected when the parent died would wait for
data that never comes (the proxy's FIN is lost in the dead handle's queue), so
the parent also tells the guardian, line by line, which local TCP ports carry
such connections; on the parent's death the guardian aborts those sockets
(`ss -K`), and their programs see the error at once.

The guardian needs `tc` and `ss` (iproute2). Filters left by a process that
died without its guardian (a SIGKILL of both, no iproute2 then) are found by
`orphaned_filters()`: eBPFDivert's filters whose program no process holds.

This file runs as a script with the standard library only, so it starts fast.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

TOOLS = ("tc", "ss")  # what the guardian runs to clean up
PROGRAM_PREFIX = "tc_divert_"  # eBPFDivert 0.0.5's TC programs (the kernel keeps 15 characters of a name)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def owned_prog_ids(pid: str | int = "self") -> set[int]:
    """BPF program ids whose file descriptors this process holds."""
    ids: set[int] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return ids
    for fd in fds:
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
        except (OSError, ValueError):
            continue
    return ids


def held_prog_ids() -> set[int]:
    """BPF program ids some live process holds a descriptor of. PermissionError when some
    process's descriptors cannot be read (not root): then nobody can tell."""
    ids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            os.listdir(entry / "fd")
        except FileNotFoundError:
            continue  # it just exited
        ids |= owned_prog_ids(entry.name)
    return ids


def bpf_filters() -> list[dict]:
    """The TC filters that run a BPF program, on every interface of this network namespace:
    {"dev", "direction", "pref", "handle", "prog", "name"} each ([] without `tc`)."""
    if shutil.which("tc") is None:
        return []
    found = []
    for _, name in socket.if_nameindex():
        for direction in ("egress", "ingress"):
            shown = subprocess.run(["tc", "-j", "filter", "show", "dev", name, direction],
                                   capture_output=True, text=True, start_new_session=True)
            try:
                filters = json.loads(shown.stdout or "[]")
            except ValueError:
                continue
            for entry in filters:
                options = entry.get("options") or {}
                prog = options.get("prog") or {}
                if "id" in prog:
                    found.append({"dev": name, "direction": direction, "pref": entry["pref"],
                                  "handle": options["handle"], "prog": prog["id"], "name": str(prog.get("name", ""))})
    return found


def divert_filters() -> list[dict]:
    """eBPFDivert's filters (by their programs' names) in this network namespace."""
    return [f for f in bpf_filters() if f["name"].startswith(PROGRAM_PREFIX)]


def orphaned_filters() -> list[dict]:
    """eBPFDivert's filters in this network namespace that no live process holds the
    program of: a handle's process died and nothing removed them. They black-hole what
    they match. (Listed first, then the holders: a handle opening meanwhile holds its
    programs before it attaches them, so it is never taken for an orphan.)"""
    filters = divert_filters()
    if not filters:
        return []
    held = held_prog_ids()
    return [f for f in filters if f["prog"] not in held]


def delete_filters(filters: list[dict]) -> int:
    """Delete these filters (as listed by divert_filters); returns how many went."""
    removed = 0
    for f in filters:
        done = subprocess.run(["tc", "filter", "del", "dev", f["dev"], f["direction"], "pref", str(f["pref"]),
                               "handle", str(f["handle"]), "bpf"], capture_output=True, start_new_session=True)
        removed += done.returncode == 0
    return removed


def remove_filters(prog_ids: set[int]) -> int:
    """Delete every TC filter, on every interface of this namespace, that runs one of `prog_ids`."""
    return delete_filters([f for f in bpf_filters() if f["prog"] in prog_ids]) if prog_ids else 0


CLOSED_CLEANLY = b"closed"
ABORT_BATCH = 64  # ports per `ss -K` filter expression
PIPE_ATOMIC = 4096  # POSIX PIPE_BUF at least: a write this small is never interleaved with another


def abort_sockets(ports: list[int]) -> None:
    """Abort the local TCP sockets bound to `ports` (needs CONFIG_INET_DIAG_DESTROY)."""
    for i in range(0, len(ports), ABORT_BATCH):
        expression = " or ".join(f"sport = :{port}" for port in ports[i:i + ABORT_BATCH])
        subprocess.run(["ss", "-K", "-t", f"( {expression} )"], capture_output=True, start_new_session=True)


class Guardian:
    """The parent's end: start one per diverting handle, close it after the handle."""

    def __init__(self):
        """Start it before the handle opens (then `guard` the handle's programs), so there
        is no moment when the handle diverts and nothing would clean up after a kill."""
        self.process = subprocess.Popen(
            [sys.executable, "-S", __file__, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C for the parent must not take the guardian first
            close_fds=True,
        )
        self._lock = threading.Lock()

    def guard(self, prog_ids: set[int]) -> None:
        """The handle's BPF programs, whose filters go if the parent dies."""
        self._say(b"".join(b"p%d\n" % prog for prog in sorted(prog_ids)))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def protect(self, *ports: int) -> None:
        """Abort the local TCP sockets on `ports` if the parent dies (redirected connections)."""
        if ports:
            self._say(b"".join(b"+%d\n" % port for port in ports))

    def forget(self, port: int) -> None:
        self._say(b"-%d\n" % port)

    def dup_pipe(self) -> int:
        """Another descriptor of the pipe, for a writer outside Python (the receive ring),
        which must write whole lines, one write each."""
        return os.dup(self.process.stdin.fileno())

    def _say(self, lines: bytes) -> None:
        """Whole lines, in writes that never split one: other writers share the pipe."""
        with self._lock:
            if self.process.stdin and not self.process.stdin.closed:
                fd = self.process.stdin.fileno()
                try:
                    while lines:
                        cut = lines.rfind(b"\n", 0, PIPE_ATOMIC) + 1 if len(lines) > PIPE_ATOMIC else len(lines)
                        os.write(fd, lines[:cut])  # a pipe write this small is all or nothing
                        lines = lines[cut:]
                except OSError:
                    pass  # the guardian is gone: nothing to tell

    def close(self) -> None:
        """The handle closed normally: release the guardian without cleanup. (A parent that
        dies closes the pipe without saying so, and the guardian cleans up.)"""
        with self._lock:
            if self.process.stdin and not self.process.stdin.closed:
                try:
                    os.write(self.process.stdin.fileno(), CLOSED_CLEANLY + b"\n")
                except OSError:
                    pass  # it died: the engine has noticed
                finally:
                    self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _listen(wake: int, prog_ids: set[int], ports: set[int]) -> bool:
    """Follow the parent's lines until its pipe closes (False), a signal comes (False), or
    it says it closed cleanly (True)."""
    pending = b""
    while True:
        readable, _, _ = select.select([0, wake], [], [])
        if wake in readable:
            return False
        chunk = os.read(0, 65536)
        if not chunk:  # the parent closed the pipe, or died
            return False
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            line = line.strip()
            if line == CLOSED_CLEANLY:
                return True  # the handle already detached its programs
            try:
                number = int(line[1:])
            except ValueError:
                continue
            if line[:1] == b"p":
                prog_ids.add(number)
            elif line[:1] == b"+":
                ports.add(number)
            elif line[:1] == b"-":
                ports.discard(number)


def _clean_up(parent: int, prog_ids: set[int], ports: set[int]) -> None:
    try:
        remove_filters(prog_ids)  # first: traffic flows again
        abort_sockets(sorted(ports))
    finally:
        if not prog_ids:  # the parent died opening its handle, before it named the programs
            deadline = time.monotonic() + 5.0
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.01)  # until it is gone, with its descriptors
            delete_filters(orphaned_filters())


def _main(parent: int) -> None:
    # A signal only wakes the loop (through the wakeup fd); the handlers raise nothing, so
    # nothing can interrupt the cleanup, and `tc`/`ss` run in their own sessions.
    wake, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in SIGNALS:
        signal.signal(sig, lambda *_: None)
    prog_ids: set[int] = set()
    ports: set[int] = set()
    clean = False
    try:
        clean = _listen(wake, prog_ids, ports)
    finally:
        if not clean:
            _clean_up(parent, prog_ids, ports)


if __name__ == "__main__":
    _main(int(sys.argv[1]))
