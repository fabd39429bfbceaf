"""The proxy's own upstream sockets, so the reflector never takes their connections.

A neutral module (neither oisp.redirect nor oisp.proxy): the reflector reads the mask,
the proxy's in-process flow source (oisp.proxy.flow_source) and the IPC server
(oisp.ipc.server, for a sensor in another process) register into it.

The proxy's upstream connection to a server's port 443 would match the
reflector's filter exactly like a client's. It is told apart by its local port:
the proxy binds the socket (port 0: the kernel picks a free one), registers
(port, family) in a 65536-byte mask, and only then connects, so its SYN
already finds the port registered. The reflector passes a packet to a server
port untouched when the mask has its source port for its family: one byte
read per packet, in the ring's C fast path (_native/reflect_fast.h) and in
Python alike. The filter names every source port, so another program's
connection from any port is diverted like a client's.

Why this cannot be imitated: a registered port is one our bound socket holds,
and the kernel lets no other socket bind it in that family while we do — we
never set SO_REUSEADDR or SO_REUSEPORT (either would let a second socket that
sets it too share the port), and on Windows we set SO_EXCLUSIVEADDRUSE (without
it a socket with SO_REUSEADDR may bind over ours). A port explicitly bound is
not handed out to other programs' connects either (Linux shares an ephemeral
port between connects only when no bind() holds it). An IPv4 socket does not
hold the port for IPv6 sockets that set IPV6_V6ONLY, so the mask keeps one bit
per family. The port is unregistered before the socket is closed, never after,
so the mask never names a port nobody holds. Only a program that can forge
packets (raw sockets: root or CAP_NET_RAW) gets past this, and such a program
can stop the sensor outright.

Chosen over the alternatives:
- leaving ports above the ephemeral range out of the filter (what oisp did):
  any program may bind such a port by number and go unseen;
- a dedicated local address: any program may bind any local address;
- a lower-priority injection handle would see the proxy's packets too on
  eBPFDivert (one handle filters all outbound traffic), and costs a second
  handle on the hot path;
- excluding our pid at the SOCKET layer needs cgroup v2 on Linux and an event
  that may arrive after the SYN (events travel on their own handle);
- streamdump's alt-port trick changes the server port the proxy must dial.
The price: the proxy's upstream packets are diverted too, and passed by the
ring's C loop without waking Python.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np

from oisp._native.ring import FastPath

# The mask's bits: which families hold the port (the ring's fast path reads the same).
IPV4_BIT, IPV6_BIT = FastPath.OWN_IPV4, FastPath.OWN_IPV6


def family_bit(family: int) -> int:
    return IPV6_BIT if family == socket.AF_INET6 else IPV4_BIT


class OwnPorts:
    """Local TCP ports of the proxy's upstream sockets, one bit per address family."""

    def __init__(self):
        # Read by the reflector (and the ring, in C) without the lock: one byte per port.
        self.mask = np.zeros(65536, dtype=np.uint8)
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, int], int] = {}  # (port, bit) → sockets holding it
        self.counts = {"registered": 0}

    def register(self, port: int, family: int) -> None:
        bit = family_bit(family)
        with self._lock:
            self.counts["registered"] += 1
            self._counts[port, bit] = self._counts.get((port, bit), 0) + 1
            self.mask[port] |= bit

    def unregister(self, port: int, family: int) -> None:
        bit = family_bit(family)
        with self._lock:
            left = self._counts.get((port, bit), 0) - 1
            if left > 0:
                self._counts[port, bit] = left
            else:
                self._counts.pop((port, bit), None)
                self.mask[port] &= ~bit & 0xFF

    def holds(self, port: int, family: int) -> bool:
        return bool(self.mask[port] & family_bit(family))

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)

    def close(self, sock: socket.socket) -> None:
        """Unregister an upstream socket's port, then close it (in that order: see above)."""
        try:
            port = sock.getsockname()[1]
        except OSError:
            port = None
        if port:
            self.unregister(port, sock.family)
        sock.close()


def bound_socket(family: int) -> socket.socket:
    """A TCP socket bound to a port the kernel chose, not yet registered: register its
    port (`getsockname()[1]`) before connecting it."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: no socket may bind over this one
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def upstream_socket(family: int, own_ports: OwnPorts) -> socket.socket:
    """A TCP socket bound to a port the kernel chose, registered before any connect."""
    sock = bound_socket(family)
    try:
        own_ports.register(sock.getsockname()[1], family)
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
