"""The sensor's side of the IPC, on its asyncio loop.

    client = IPCClient(on_note=print)
    await client.start()                      # connects in the background, and again after
    await client.wait_connected(5)            # the redirector restarts
    flow = await client.lookup(peer_addr, peer_port, proxy_port)   # one round trip
    ...
    client.release(flow.token)                # the proxy closed its connection on the flow
    await client.close()

Requests carry ids, so any number may be in flight on the one connection and each
lookup is a single round trip. While the redirector is away every request fails at
once with IPCUnavailable (the proxy then does what it does with an unknown flow: lets
it go) instead of waiting; the client reconnects with a doubling back-off (from
`backoff[0]` to `backoff[1]` seconds) and, once welcomed again, registers again the
upstream ports it still holds, since the server forgot them with the connection. Flow
tokens do not survive a reconnection: the server released those flows when the
connection went.

The server must be who it should be: on POSIX its uid (SO_PEERCRED) must be one of
`server_uids` (root by default), so a socket someone else managed to put at the
address is not believed; on Windows, with `server_sids`, the user SID of the process
serving the pipe (GetNamedPipeServerProcessId) must be one of them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import sys
from collections import deque
from typing import Callable

import msgspec

from oisp.ipc import protocol as p
from oisp.ipc.transport import DEFAULT_ADDRESS, Peer, open_connection

log = logging.getLogger(__name__)

KEPT_NOTES = 64
SWEEP = 0.25  # seconds between checks for requests past their deadline (a timeout may run this much late)


class IPCUnavailable(ConnectionError):
    """The redirector is not connected (or went away during the request)."""


class IPCRequestError(RuntimeError):
    """The server answered a request with an error."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class IPCClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, *, server_uids: frozenset[int] = frozenset({0}),
                 server_sids: frozenset[str] | None = None,
                 software: str = "oisp", backoff: tuple[float, float] = (0.05, 2.0), request_timeout: float = 2.0,
                 hello_timeout: float = 5.0, on_note: Callable[[p.Note], None] | None = None,
                 on_state: Callable[[bool], None] | None = None,
                 on_quic_refused: Callable[[p.QuicRefused], None] | None = None):
        self.address, self.server_uids, self.software = address, server_uids, p.clip(software, 64)
        self.server_sids = server_sids  # Windows: the SIDs the pipe's server may run as (e.g. S-1-5-18)
        self.backoff, self.request_timeout, self.hello_timeout = backoff, request_timeout, hello_timeout
        self.on_note, self.on_state, self.on_quic_refused = on_note, on_state, on_quic_refused
        self.notes: deque[p.Note] = deque(maxlen=KEPT_NOTES)
        self.version: int | None = None
        self.listen: dict[int, int] = {}  # from the welcome: server port → the listener port it is reflected to
        self.server: Peer | None = None
        self.last_error: str | None = None  # why the last connection failed or ended
        self.stats = {"connects": 0, "connect_failures": 0, "disconnects": 0, "timeouts": 0, "protocol_errors": 0,
                      "refused_server": 0}
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, float]] = {}  # id: (future, deadline)
        self._ports: dict[tuple[int, int], int] = {}
        self._tokens: dict[int, int] = {}  # our token: the server's, for the current connection's held flows
        self._local_tokens = itertools.count(1)
        self._protocol: _ClientProtocol | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> IPCClient:
        self._task = asyncio.create_task(self._run(), name="oisp-ipc-client")
        return self

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def close(self) -> None:
        self._closing = True
        protocol = self._protocol
        if protocol is not None and self.connected:
            protocol.send(p.Goodbye(reason="the sensor is stopping"))
            protocol.transport.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.last_error = "the client was closed"
        self._disconnected()  # requests still waiting fail now, not at their deadline

    # -- requests -----------------------------------------------------------------------------
    async def lookup(self, peer_addr: str, peer_port: int, proxy_port: int, *, hold: bool = True,
                     name_owner: bool = False, upstream: tuple[int, int] | None = None) -> p.FlowInfo | None:
        """The flow behind an accepted connection, or None when the redirector has no such flow.
        With `upstream` (port, family 4 or 6), that port is registered too when the flow is
        found (as register_port, in the same round trip): unregister it as usual."""
        ref = p.PortRef(port=upstream[0], family=upstream[1]) if upstream is not None else None
        answer = await self._request(lambda i: p.FlowLookup(id=i, peer_addr=peer_addr, peer_port=peer_port,
                                                            proxy_port=proxy_port, hold=hold, name_owner=name_owner,
                                                            upstream=ref))
        flow = answer.flow
        if flow is not None and upstream is not None:
            self._ports[upstream] = self._ports.get(upstream, 0) + 1
        if flow is not None and flow.token:
            # The caller gets a token of ours, unique across connections: the server's count
            # from 1 on every connection, so its own would be ambiguous after a reconnect.
            mine = next(self._local_tokens)
            self._tokens[mine] = flow.token
            flow = msgspec.structs.replace(flow, token=mine)
        return flow

    def release(self, token: int) -> None:
        """The proxy's connection on a held flow closed. A token of a former connection is
        dropped: that server released its flows when the connection went, and the new one
        numbers its tokens afresh, so sending it could release another flow."""
        server_token = self._tokens.pop(token, None)
        if server_token is not None and self._protocol is not None:
            self._protocol.send(p.FlowRelease(token=server_token))

    async def register_port(self, port: int, family: int) -> None:
        """Returns once the redirector leaves the port's packets alone: connect after it.
        Raises IPCUnavailable while the redirector is away (nothing is reflected then);
        ports registered before are registered again when it is back."""
        key = (port, family)
        await self._request(lambda i: p.PortRegister(id=i, port=port, family=family))
        self._ports[key] = self._ports.get(key, 0) + 1

    def unregister_port(self, port: int, family: int) -> None:
        key = (port, family)
        count = self._ports.get(key, 0)
        if not count:
            return
        if count == 1:
            del self._ports[key]
        else:
            self._ports[key] = count - 1
        if self.connected:
            self._protocol.send(p.PortUnregister(port=port, family=family))

    async def set_listeners(self, listeners: dict[int, int]) -> None:
        """Tell the redirector where this sensor listens (server port → listener port); it
        reflects new connections there once it has checked they are ours (IPCRequestError
        `refused` if not). Empty: reflect nothing new. Not kept across reconnections: the
        caller sends them again (on_state(True))."""
        await self._request(lambda i: p.ListenersSet(id=i, listeners=tuple(
            p.Listen(server_port=server, listener_port=listener) for server, listener in sorted(listeners.items()))))

    async def counters(self) -> dict[str, int]:
        return dict((await self._request(lambda i: p.CountersGet(id=i))).values)

    async def _request(self, make: Callable[[int], p.Message]):
        if not self.connected:
            raise IPCUnavailable(self.last_error or "not connected to the redirector")
        request_id = next(self._ids)
        if request_id > 2**32 - 1:
            self._ids = itertools.count(1)
            request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[request_id] = (future, loop.time() + self.request_timeout)
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP, self._sweep)
        try:
            self._protocol.send(make(request_id))
            return await future
        finally:
            self._pending.pop(request_id, None)

    def _sweep(self) -> None:
        """Fail the requests past their deadline. One timer for all of them, not one per
        request (asyncio.wait_for would wrap each in a task, a timer handle costs a heap
        push and a cancelled entry left behind: together a sixth of a lookup here)."""
        now = asyncio.get_running_loop().time()
        for future, deadline in list(self._pending.values()):
            if not future.done() and deadline <= now:
                self.stats["timeouts"] += 1
                future.set_exception(IPCUnavailable(f"no answer within {self.request_timeout} s"))
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep) if self._pending else None

    # -- the connection -----------------------------------------------------------------------
    async def _run(self) -> None:
        delay = self.backoff[0]
        while not self._closing:
            lost = asyncio.get_running_loop().create_future()
            try:
                await self._connect(lost)
            except (OSError, asyncio.TimeoutError, IPCRequestError, IPCUnavailable) as e:
                self.stats["connect_failures"] += 1
                self.last_error = f"cannot reach the redirector at {self.address}: {e}"
            except Exception as e:  # noqa: BLE001 - whatever it was, the client keeps trying
                log.exception("IPC client: connecting failed")
                self.stats["connect_failures"] += 1
                self.last_error = f"connecting to the redirector failed: {type(e).__name__}: {e}"
            else:
                delay = self.backoff[0]  # welcomed: the next outage starts the back-off afresh
                self.last_error = await lost
                self.stats["disconnects"] += 1
            self._disconnected()
            if self._closing:
                return
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # jitter: sensors do not reconnect in step
            delay = min(delay * 2, self.backoff[1])

    async def _connect(self, lost: asyncio.Future) -> None:
        transport, protocol, server = await open_connection(self.address, lambda: _ClientProtocol(self, lost))
        if (server.uid not in self.server_uids if sys.platform != "win32"
                else self.server_sids is not None and server.sid not in self.server_sids):
            transport.abort()
            self.stats["refused_server"] += 1
            raise IPCUnavailable(f"the socket is served by {server.describe()}, not by the redirector")
        self.server, self._protocol = server, protocol
        welcome = protocol.welcome = asyncio.get_running_loop().create_future()
        protocol.send(p.Hello(versions=p.SUPPORTED_VERSIONS, software=self.software))
        try:
            done = await asyncio.wait_for(asyncio.shield(welcome), self.hello_timeout)
        except BaseException:
            transport.abort()
            raise
        if isinstance(done, p.Error):
            transport.abort()
            raise IPCRequestError(done.code, done.message)
        self.version = done.version
        self.listen = {entry.server_port: entry.listener_port for entry in done.listen}
        self._connected.set()
        self.stats["connects"] += 1
        try:
            for (port, family), count in list(self._ports.items()):  # the server forgot them with the connection
                for _ in range(count):
                    await self._request(lambda i, port=port, family=family: p.PortRegister(id=i, port=port,
                                                                                           family=family))
        except BaseException:
            transport.abort()  # not half registered: the next attempt starts clean
            raise
        self._tell_state(True)

    def _tell_state(self, up: bool) -> None:
        if self.on_state is not None:
            try:
                self.on_state(up)
            except Exception:  # noqa: BLE001 - a failing callback must not stop the reconnecting
                log.exception("IPC client: on_state failed")

    def _disconnected(self) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._protocol = None
        self._tokens.clear()
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(IPCUnavailable(self.last_error or "the redirector went away"))
        self._pending.clear()
        if was:
            self._tell_state(False)

    def _received(self, message: p.Message) -> None:
        if isinstance(message, (p.FlowAnswer, p.Ok, p.Counters)):
            self._resolve(message.id, message)
        elif isinstance(message, p.Error):
            if message.id is not None:
                self._resolve(message.id, IPCRequestError(message.code, message.message))
            else:
                self.last_error = f"the redirector said {message.code}: {message.message}"
        elif isinstance(message, p.Note):
            self.notes.append(message)
            if self.on_note is not None:
                try:
                    self.on_note(message)
                except Exception:  # noqa: BLE001 - the connection must not die of its listener
                    log.exception("IPC client: on_note failed")
        elif isinstance(message, p.QuicRefused):
            if self.on_quic_refused is not None:
                try:
                    self.on_quic_refused(message)
                except Exception:  # noqa: BLE001 - the connection must not die of its listener
                    log.exception("IPC client: on_quic_refused failed")
        elif isinstance(message, p.Goodbye):
            self.last_error = f"the redirector said goodbye: {message.reason}"

    def _resolve(self, request_id: int, value) -> None:
        future = self._pending.get(request_id, (None,))[0]
        if future is None or future.done():
            return  # timed out already
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: IPCClient, lost: asyncio.Future):
        self.client, self.lost = client, lost
        self.decoder = p.Decoder("client")
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, message: p.Message) -> None:
        if not self.transport.is_closing():
            self.transport.write(p.encode(message))

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except p.ProtocolError as e:
            self.client.stats["protocol_errors"] += 1
            self._end(f"the redirector sent a bad frame ({e})")
            self.transport.abort()
            return
        for message in messages:
            if self.welcome is not None and not self.welcome.done() and isinstance(message, (p.Welcome, p.Error)):
                self.welcome.set_result(message)
                continue
            self.client._received(message)

    def connection_lost(self, exc) -> None:
        self._end(self.client.last_error if exc is None else f"connection lost: {exc}")

    def _end(self, why: str | None) -> None:
        why = why or "the redirector closed the connection"
        if self.welcome is not None and not self.welcome.done():
            self.welcome.set_exception(IPCUnavailable(why))
        if not self.lost.done():
            self.lost.set_result(why)
