"""The proxy's own upstream ports, so the reflector never takes its connections.

The proxy's upstream connection to a server's port 443 would match the
reflector's filter exactly like a client's. It is told apart by its local port,
two ways, both loop-free by construction:

1. Reserved range (Linux, the default): the proxy binds its upstream sockets to
   ports above the system's ephemeral range (ip_local_port_range), which the
   kernel never hands to other programs' connects, and the reflector's filter
   leaves that range out: our upstream packets are not even diverted.
2. Registry (the fallback: no such range, or all its ports busy — a port stays
   in TIME_WAIT for a minute after we close, so more than ~75 new upstream
   connections a second spill over): bind to port 0, register the port the
   kernel chose, only then connect, so the SYN already finds it registered.
   The reflector checks source ports against a 65536-entry bool array.

Chosen over the alternatives:
- a lower-priority injection handle would see the proxy's packets too on
  eBPFDivert (one handle filters all outbound traffic), and costs a second
  handle on the hot path;
- excluding our pid at the SOCKET layer needs cgroup v2 on Linux and an event
  that may arrive after the SYN (events travel on their own handle);
- streamdump's alt-port trick changes the server port the proxy must dial.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
import threading

import numpy as np

MIN_RANGE = 1024  # fewer free ports above the ephemeral range than this: use the registry only


def upstream_port_range() -> tuple[int, int] | None:
    """Ports above the ephemeral range, which no program gets without asking for them
    by number (Linux; None elsewhere, or when the ephemeral range leaves too few)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            _, high = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return None
    return (high + 1, 65535) if 65535 - high >= MIN_RANGE else None


class OwnPorts:
    """Local TCP ports of the proxy's upstream sockets: a reserved range the reflector's
    filter leaves out, and a registry for the ports outside it."""

    def __init__(self, port_range: tuple[int, int] | None = None):
        if port_range is not None and not 1024 <= port_range[0] <= port_range[1] <= 65535:
            raise ValueError(f"upstream port range {port_range} is not within 1024..65535")
        self.range = port_range
        self.mask = np.zeros(65536, dtype=bool)  # read by the reflector without the lock: one byte per port
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}  # a port may serve an IPv4 and an IPv6 socket at once
        self._next = port_range[0] if port_range else 0
        self.counts = {"in_range": 0, "registered": 0}

    def covers(self, port: int) -> bool:
        return self.range is not None and self.range[0] <= port <= self.range[1]

    def bind_in_range(self, sock: socket.socket, tries: int = 64) -> bool:
        """Bind `sock` to a free port of the range (round robin); False if none of `tries` was free."""
        if self.range is None:
            return False
        low, high = self.range
        host = _any_address(sock.family)
        for _ in range(min(tries, high - low + 1)):
            with self._lock:
                port = self._next
                self._next = low if port >= high else port + 1
            try:
                sock.bind((host, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            self.counts["in_range"] += 1
            return True
        return False

    def register(self, port: int) -> None:
        if self.covers(port):
            return  # the reflector's filter already leaves it out
        with self._lock:
            self.counts["registered"] += 1
            self._counts[port] = self._counts.get(port, 0) + 1
            self.mask[port] = True

    def unregister(self, port: int) -> None:
        if self.covers(port):
            return
        with self._lock:
            left = self._counts.get(port, 0) - 1
            if left > 0:
                self._counts[port] = left
            else:
                self._counts.pop(port, None)
                self.mask[port] = False

    def __contains__(self, port: int) -> bool:
        return self.covers(port) or bool(self.mask[port])

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)

    def close(self, sock: socket.socket) -> None:
        """Unregister an upstream socket's port and close it."""
        try:
            port = sock.getsockname()[1]
        except OSError:
            port = None
        sock.close()
        if port:
            self.unregister(port)


def _any_address(family: int) -> str:
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def upstream_socket(family: int, own_ports: OwnPorts) -> socket.socket:
    """A TCP socket bound to a port of the reserved range, or else to an ephemeral port
    that is registered before any connect."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if not own_ports.bind_in_range(sock):
            sock.bind((_any_address(family), 0))
            own_ports.register(sock.getsockname()[1])
    except BaseException:
        sock.close()
        raise
    return sock


def connect_upstream(host: str, port: int, own_ports: OwnPorts, timeout: float | None = 10.0) -> socket.socket:
    """Connect to (host, port) from a registered port (IPv4 or IPv6); blocking."""
    last_error: OSError | None = None
    for family, _, _, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = upstream_socket(family, own_ports)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock
        except OSError as e:
            own_ports.close(sock)
            last_error = e
    raise last_error or OSError(f"no address for {host}")


async def open_upstream(host: str, port: int, own_ports: OwnPorts) -> socket.socket:
    """As connect_upstream, without blocking the event loop; the socket is non-blocking,
    ready for `asyncio.open_connection(sock=...)`. Close it with `own_ports.close`."""
    loop = asyncio.get_running_loop()
    last_error: OSError | None = None
    for family, _, _, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = upstream_socket(family, own_ports)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as e:
            own_ports.close(sock)
            last_error = e
    raise last_error or OSError(f"no address for {host}")
