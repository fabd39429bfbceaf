"""Fail open on Linux when the process holding a divert handle dies.

eBPFDivert 0.0.5 attaches its BPF programs as classic TC filters, which
outlive the process: after a SIGKILL they keep diverting into a queue nobody
reads, and the matching traffic is black-holed (measured: no packet passes
until the filters are removed; `ebpfdivert_unregister()` does not remove
them). So each diverting handle gets a guardian: a small child process, in
the same network namespace, that waits for its parent's pipe to close. If
the pipe closes without the parent saying it closed cleanly, it deletes the TC filters that run the parent's
programs, and traffic flows again within milliseconds.

A connection that was being redirected when the parent died would wait for
data that never comes (the proxy's FIN is lost in the dead handle's queue), so
the parent also tells the guardian, line by line, which local TCP ports carry
such connections; on the parent's death the guardian aborts those sockets
(`ss -K`), and their programs see the error at once.

This file runs as a script with the standard library only, so it starts fast.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path


def owned_prog_ids(pid: str | int = "self") -> set[int]:
    """BPF program ids whose file descriptors this process holds."""
    ids = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    try:
        entries = list(fdinfo.iterdir())
    except OSError:
        return ids
    for entry in entries:
        try:
            for line in entry.read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
        except (OSError, ValueError):
            continue
    return ids


def remove_filters(prog_ids: set[int]) -> int:
    """Delete every TC filter, on every interface of this namespace, that runs one of `prog_ids`."""
    removed = 0
    for _, name in socket.if_nameindex():
        for direction in ("egress", "ingress"):
            shown = subprocess.run(["tc", "-j", "filter", "show", "dev", name, direction],
                                   capture_output=True, text=True)
            try:
                filters = json.loads(shown.stdout or "[]")
            except ValueError:
                continue
            for entry in filters:
                options = entry.get("options") or {}
                if options.get("prog", {}).get("id") in prog_ids:
                    done = subprocess.run(
                        ["tc", "filter", "del", "dev", name, direction, "pref", str(entry["pref"]),
                         "handle", str(options["handle"]), "bpf"], capture_output=True)
                    removed += done.returncode == 0
    return removed


CLOSED_CLEANLY = b"closed"
ABORT_BATCH = 64  # ports per `ss -K` filter expression
PIPE_ATOMIC = 4096  # POSIX PIPE_BUF at least: a write this small is never interleaved with another


def abort_sockets(ports: list[int]) -> None:
    """Abort the local TCP sockets bound to `ports` (needs CONFIG_INET_DIAG_DESTROY)."""
    for i in range(0, len(ports), ABORT_BATCH):
        expression = " or ".join(f"sport = :{port}" for port in ports[i:i + ABORT_BATCH])
        subprocess.run(["ss", "-K", "-t", f"( {expression} )"], capture_output=True)


class Guardian:
    """The parent's end: start one per diverting handle, close it after the handle."""

    def __init__(self, prog_ids: set[int]):
        self.process = subprocess.Popen(
            [sys.executable, "-S", __file__, *map(str, sorted(prog_ids))],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C for the parent must not take the guardian first
            close_fds=True,
        )
        self._lock = threading.Lock()

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
                    self.process.stdin.close()
                except OSError:
                    pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _main(prog_ids: set[int]) -> None:
    ports: set[int] = set()
    for line in sys.stdin.buffer:  # ends at EOF: the parent closed the pipe, or died
        line = line.strip()
        if line == CLOSED_CLEANLY:
            return  # the handle already detached its programs
        if line[:1] == b"+":
            ports.add(int(line[1:]))
        elif line[:1] == b"-":
            ports.discard(int(line[1:]))
    remove_filters(prog_ids)
    abort_sockets(sorted(ports))


if __name__ == "__main__":
    _main({int(x) for x in sys.argv[1:]})
