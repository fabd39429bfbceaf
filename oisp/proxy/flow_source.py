"""What the proxy asks the redirector, behind one seam.

For every accepted connection the proxy needs where the client meant to go (and who
the client is), needs that flow kept while the connection is open, and needs its own
upstream socket's port left alone by the reflector. Two implementations:

- `LocalFlows`: the redirector runs in this process (`oisp record --single-process`,
  tests that drive the proxy with a reflector of their own): the FlowTable and
  OwnPorts are called directly.
- `IPCFlows`: the redirector is another, elevated process (`oisp sensor`): every
  question goes over oisp.ipc. A new connection costs one round trip: the lookup
  carries the upstream socket's port (protocol version 2, docs/ipc.md), registered
  by the redirector before it answers, so the proxy may connect as soon as the answer
  is in.

The proxy binds its upstream socket before `open` (in the peer's family: the peer of
a reflected connection is the original server's address) and connects only after
`open` returned a flow.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Destination:
    """Where an accepted connection was going, from the flow table."""

    client: tuple[str, int]
    server: tuple[str, int]
    pid: int | None = None
    process_name: str | None = None
    handle: object = field(default=None, compare=False)  # the source's own: what `release` takes


class FlowSource(Protocol):
    """The seam. `open` is the one call on a new connection's path; `lookup` asks again
    later (the owner named, if need be); `release` and `unregister` undo what `open` did."""

    async def open(self, peer_addr: str, peer_port: int, proxy_port: int,
                   upstream: socket.socket) -> Destination | None:
        """The flow of a connection accepted from (peer_addr, peer_port) on `proxy_port`,
        held until `release`, with `upstream`'s bound port registered (until `unregister`)
        when it is found; None: no such flow (nothing registered)."""
        ...

    async def lookup(self, peer_addr: str, peer_port: int, proxy_port: int,
                     name_owner: bool = False) -> Destination | None:
        ...

    def release(self, target: Destination) -> None:
        ...

    def unregister(self, port: int, family: int) -> None:
        """Before the upstream socket bound to `port` is closed, never after (own_ports.py)."""
        ...


class LocalFlows(FlowSource):
    """Over a FlowTable and OwnPorts in this process."""

    def __init__(self, flows, own_ports):
        self.flows, self.own_ports = flows, own_ports

    async def open(self, peer_addr, peer_port, proxy_port, upstream):
        entry = self.flows.lookup(peer_addr, peer_port, proxy_port, name_owner=False)
        if entry is None:
            return None
        self.flows.hold(entry)
        self.own_ports.register(upstream.getsockname()[1], upstream.family)
        return self._destination(entry)

    async def lookup(self, peer_addr, peer_port, proxy_port, name_owner=False):
        entry = self.flows.lookup(peer_addr, peer_port, proxy_port, name_owner=False)
        if entry is not None and entry.pid is None and name_owner:
            # Naming may scan /proc: not on the event loop.
            entry = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.flows.lookup(peer_addr, peer_port, proxy_port, name_owner=True)) or entry
        return None if entry is None else self._destination(entry)

    def release(self, target):
        self.flows.release(target.handle)

    def unregister(self, port, family):
        self.own_ports.unregister(port, family)

    @staticmethod
    def _destination(entry) -> Destination:
        return Destination(client=(str(entry.client_addr), entry.client_port),
                           server=(str(entry.server_addr), entry.server_port), pid=entry.pid,
                           process_name=entry.process_name, handle=entry)


class IPCFlows(FlowSource):
    """Over an oisp.ipc IPCClient. While the redirector is away nothing new is reflected,
    so a connection accepted then (one reflected just before it went) is an unknown flow."""

    def __init__(self, client):
        self.client = client

    async def open(self, peer_addr, peer_port, proxy_port, upstream):
        from oisp.ipc.client import IPCRequestError, IPCUnavailable

        family = 6 if upstream.family == socket.AF_INET6 else 4
        try:
            flow = await self.client.lookup(peer_addr, peer_port, proxy_port,
                                            upstream=(upstream.getsockname()[1], family))
        except (IPCUnavailable, IPCRequestError):
            return None
        return None if flow is None else self._destination(flow)

    async def lookup(self, peer_addr, peer_port, proxy_port, name_owner=False):
        from oisp.ipc.client import IPCRequestError, IPCUnavailable

        try:
            flow = await self.client.lookup(peer_addr, peer_port, proxy_port, hold=False, name_owner=name_owner)
        except (IPCUnavailable, IPCRequestError):
            return None
        return None if flow is None else self._destination(flow)

    def release(self, target):
        if target.handle:
            self.client.release(target.handle)

    def unregister(self, port, family):
        self.client.unregister_port(port, 6 if family == socket.AF_INET6 else 4)

    @staticmethod
    def _destination(flow) -> Destination:
        return Destination(client=(flow.client_addr, flow.client_port), server=(flow.server_addr, flow.server_port),
                           pid=flow.pid, process_name=flow.process_name, handle=flow.token)
