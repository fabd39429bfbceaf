"""The proxy's own upstream ports, so the reflector never takes its connections.

The proxy's upstream connection to a server's port 443 matches the reflector's
filter exactly like a client's. It is told apart by its local port: the proxy
binds the socket to port 0 first, registers the port the kernel chose, and
only then connects, so the SYN already finds the port registered. The
reflector checks every batch's source ports against a 65536-entry bool array:
one vectorized lookup, and loop-free by construction (a port bound this way is
never handed to another socket's connect while we hold it).

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
import socket
import threading

import numpy as np


class OwnPorts:
    """Local TCP ports of the proxy's upstream sockets."""

    def __init__(self):
        self.mask = np.zeros(65536, dtype=bool)  # read by the reflector without the lock: one byte per port
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}  # a port may serve an IPv4 and an IPv6 socket at once

    def register(self, port: int) -> None:
        with self._lock:
            self._counts[port] = self._counts.get(port, 0) + 1
            self.mask[port] = True

    def unregister(self, port: int) -> None:
        with self._lock:
            left = self._counts.get(port, 0) - 1
            if left > 0:
                self._counts[port] = left
            else:
                self._counts.pop(port, None)
                self.mask[port] = False

    def __contains__(self, port: int) -> bool:
        return bool(self.mask[port])

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


def upstream_socket(family: int, own_ports: OwnPorts) -> socket.socket:
    """A TCP socket bound to an ephemeral port that is registered before any connect."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
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
