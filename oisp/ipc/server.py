"""The redirector's side of the IPC: serves flow lookups, port registrations, counters
and notes to the sensor, from a thread of its own.

    server = IPCServer(flow_table_handlers(redirector.flows, redirector.own_ports, redirector.counters),
                       AccessPolicy.user(uid, gid), owner=(uid, gid)).start()
    server.note("DNS answers are not watched: …", level="degraded")
    ...
    server.stop()

The server runs an asyncio loop in its own thread: the redirector's packet work never
waits on a client. Handlers run on that loop and must be quick (a flow-table lookup
under its lock); the one slow case, naming a flow's process from /proc, runs in the
loop's executor. Everything a client can make the server hold is bounded: clients
(max_clients), a frame (protocol.MAX_FRAME), a frame's arrival (frame_timeout), the
time to say hello (hello_timeout), unread answers (max_unsent bytes), held flows and
registered ports per client. A client that breaks the protocol gets an error and is
closed; what it had registered or held is undone when it goes, so a dead sensor never
leaves ports exempted or flows pinned. Every refusal is counted in `stats`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import msgspec

from oisp.ipc import protocol as p
from oisp.ipc.transport import DEFAULT_ADDRESS, AccessPolicy, peer_of, serve

log = logging.getLogger(__name__)

MAX_HELD = 65536  # flows one client may hold at once (the flow table's own default size)
MAX_PORTS = 65536  # (port, family) registrations one client may hold
KEPT_NOTES = 32  # notes replayed to a client that (re)connects


@dataclass
class Handlers:
    """What the server asks the redirector. `lookup` returns the flow (token left 0) and
    the object `hold`/`release` take, or None."""
    lookup: Callable[[str, int, int, bool], tuple[p.FlowInfo, object] | None]
    hold: Callable[[object], None]
    release: Callable[[object], None]
    register_port: Callable[[int, int], None]
    unregister_port: Callable[[int, int], None]
    counters: Callable[[], dict]


def flow_table_handlers(flows, own_ports, counters: Callable[[], dict]) -> Handlers:
    """Handlers over the redirector's FlowTable and OwnPorts (oisp.redirect)."""
    def lookup(peer_addr: str, peer_port: int, proxy_port: int, name_owner: bool):
        entry = flows.lookup(peer_addr, peer_port, proxy_port, name_owner=name_owner)
        if entry is None:
            return None
        return p.FlowInfo(client_addr=str(entry.client_addr), client_port=entry.client_port,
                          server_addr=str(entry.server_addr), server_port=entry.server_port,
                          created=entry.created, pid=entry.pid,
                          process_name=p.clip(entry.process_name, p.MAX_PROCESS_NAME) if entry.process_name else None,
                          process_created=getattr(entry, "process_created", None)), entry

    # OwnPorts keeps one mask for both families and counts a port's users itself.
    return Handlers(lookup=lookup, hold=flows.hold, release=flows.release,
                    register_port=lambda port, family: own_ports.register(port),
                    unregister_port=lambda port, family: own_ports.unregister(port), counters=counters)


class IPCServer:
    def __init__(self, handlers: Handlers, policy: AccessPolicy, *, address: str = DEFAULT_ADDRESS,
                 owner: tuple[int, int | None] = (0, None), max_clients: int = 4, hello_timeout: float = 5.0,
                 frame_timeout: float = 5.0, max_unsent: int = 1 << 20, software: str = "oisp"):
        self.handlers, self.policy, self.address, self.owner = handlers, policy, address, owner
        self.max_clients, self.hello_timeout, self.frame_timeout = max_clients, hello_timeout, frame_timeout
        self.max_unsent, self.software = max_unsent, p.clip(software, 64)
        self.stats = {"accepted": 0, "refused_peer": 0, "refused_busy": 0, "protocol_errors": 0, "hello_timeouts": 0,
                      "frame_timeouts": 0, "slow_clients": 0, "handler_errors": 0, "lookups": 0, "lookup_misses": 0,
                      "ports_registered": 0, "unknown_releases": 0, "disconnected": 0}
        self.last_refused = None  # the Peer last refused, for the log and tests
        self._notes: deque[p.Note] = deque(maxlen=KEPT_NOTES)
        self._sessions: set[_Session] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._stop: asyncio.Event | None = None

    # -- lifecycle (any thread) ------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> IPCServer:
        self._thread = threading.Thread(target=self._run, name="oisp-ipc", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the IPC server did not start")
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Say goodbye to every client, stop listening, end the thread."""
        if self._loop is not None and self._stop is not None and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)

    def note(self, text: str, level: str = "info") -> None:
        """A line for the sensor's status line and UI; kept and pushed to every client."""
        note = p.Note(text=p.clip(text, p.MAX_NOTE), level=level, ts=time.time())
        self._notes.append(note)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._push, note)

    @property
    def clients(self) -> int:
        return len(self._sessions)

    # -- the server's thread ---------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        except BaseException as e:  # noqa: BLE001 - reported to start() or logged, never lost
            if not self._started.is_set():
                self._failure = e
            else:
                log.exception("IPC server stopped")
        finally:
            self._started.set()
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stop = asyncio.Event()
        self._listening = await serve(self.address, self.policy, lambda: _Session(self), owner=self.owner)
        self._loop = loop
        self._started.set()
        await self._stop.wait()
        self._listening.close()
        for session in list(self._sessions):
            session.close(p.Goodbye(reason="the redirector is stopping"))
        await asyncio.sleep(0)  # let the goodbyes be written
        await self._listening.wait_closed()

    def _push(self, note: p.Note) -> None:
        for session in list(self._sessions):
            if session.welcomed:
                session.send(note)

    def counters(self) -> dict[str, int]:
        return {f"ipc.{k}": v for k, v in self.stats.items()} | {"ipc.clients": len(self._sessions)}


class _Session(asyncio.Protocol):
    """One client connection: its decoder, what it holds, its timers."""

    def __init__(self, server: IPCServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.decoder = p.Decoder("server")
        self.welcomed = False
        self.closing = False
        self.held: dict[int, object] = {}
        self.ports: dict[tuple[int, int], int] = {}
        self._tokens = itertools.count(1)
        self._hello_timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        server = self.server
        try:
            peer = peer_of(transport)
        except OSError:
            peer = None
        if peer is None or not server.policy.allows(peer):
            server.stats["refused_peer"] += 1
            server.last_refused = peer
            log.warning("IPC: refused %s", peer.describe() if peer else "a peer of unknown identity")
            self.closing = True
            transport.abort()  # nothing is said to a stranger
            return
        if len(server._sessions) >= server.max_clients:
            server.stats["refused_busy"] += 1
            self.close(p.Error(code="busy", message=f"the redirector serves {server.max_clients} clients at most"))
            return
        server.stats["accepted"] += 1
        server._sessions.add(self)
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(server.hello_timeout, self._timed_out, "hello_timeouts")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            messages = self.decoder.feed(data)
        except p.ProtocolError as e:
            self.server.stats["protocol_errors"] += 1
            self.close(p.Error(code=e.code, message=e.message))
            return
        for message in messages:
            if self.closing:
                return
            self._dispatch(message)
        self._watch_partial_frame()

    def connection_lost(self, exc) -> None:
        server = self.server
        if self in server._sessions:
            server._sessions.discard(self)
            server.stats["disconnected"] += 1
        for timer in (self._hello_timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        self._undo()

    # -- helpers ----------------------------------------------------------------------------
    def send(self, message: p.Message) -> None:
        if self.closing or self.transport is None:
            return
        self.transport.write(p.encode(message))
        if self.transport.get_write_buffer_size() > self.server.max_unsent:
            self.server.stats["slow_clients"] += 1  # it does not read its answers: no unbounded queue
            self.closing = True
            self.transport.abort()

    def close(self, last: p.Message | None = None) -> None:
        if self.closing:
            return
        if last is not None:
            self.send(last)
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _timed_out(self, counter: str) -> None:
        self.server.stats[counter] += 1
        what = "no hello" if counter == "hello_timeouts" else "a frame did not arrive whole"
        self.close(p.Error(code="malformed", message=f"{what} within the time allowed"))

    def _watch_partial_frame(self) -> None:
        """A frame begun must arrive whole within frame_timeout (a peer trickling bytes
        holds a buffer and a slot otherwise)."""
        if self.decoder.buffered and self._frame_timer is None:
            self._frame_timer = asyncio.get_running_loop().call_later(
                self.server.frame_timeout, self._timed_out, "frame_timeouts")
        elif not self.decoder.buffered and self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def _undo(self) -> None:
        """The client went: release its flows and unregister its ports."""
        handlers = self.server.handlers
        for handle in self.held.values():
            _quietly(handlers.release, handle)
        self.held.clear()
        for (port, family), count in self.ports.items():
            for _ in range(count):
                _quietly(handlers.unregister_port, port, family)
        self.ports.clear()

    # -- messages ---------------------------------------------------------------------------
    def _dispatch(self, message: p.Message) -> None:
        if not self.welcomed:
            if not isinstance(message, p.Hello):
                self.server.stats["protocol_errors"] += 1
                self.close(p.Error(code="not_ready", message="hello first"))
                return
            self._hello(message)
            return
        handler = _HANDLERS.get(type(message))
        if handler is None:  # a second hello
            self.server.stats["protocol_errors"] += 1
            self.close(p.Error(code="unknown_type", message=f"{type(message).__struct_config__.tag} after welcome"))
            return
        request_id = getattr(message, "id", None)
        try:
            handler(self, message)
        except Exception as e:  # noqa: BLE001 - a failing handler answers an error, the session goes on
            self.server.stats["handler_errors"] += 1
            log.exception("IPC: %s failed", type(message).__name__)
            if request_id is not None:
                self.send(p.Error(code="internal", message=p.clip(f"{type(e).__name__}: {e}", 256), id=request_id))

    def _hello(self, hello: p.Hello) -> None:
        version = p.negotiate(hello.versions)
        if version is None:
            self.server.stats["protocol_errors"] += 1
            self.close(p.Error(code="unsupported_version",
                               message=f"the redirector speaks versions {list(p.SUPPORTED_VERSIONS)}"))
            return
        self._hello_timer.cancel()
        self.welcomed = True
        self.send(p.Welcome(version=version, software=self.server.software))
        for note in list(self.server._notes):
            self.send(note)

    def _lookup(self, request: p.FlowLookup) -> None:
        if request.name_owner:  # may read /proc: off the loop, answered when done
            future = asyncio.get_running_loop().run_in_executor(None, self._find, request)
            future.add_done_callback(lambda f: self._answer_lookup(request, f))
        else:
            self._answer(request, self._find(request))

    def _find(self, request: p.FlowLookup):
        return self.server.handlers.lookup(request.peer_addr, request.peer_port, request.proxy_port,
                                           request.name_owner)

    def _answer_lookup(self, request: p.FlowLookup, future: asyncio.Future) -> None:
        try:
            found = future.result()
        except Exception as e:  # noqa: BLE001 - as _dispatch does for the inline handlers
            self.server.stats["handler_errors"] += 1
            self.send(p.Error(code="internal", message=p.clip(f"{type(e).__name__}: {e}", 256), id=request.id))
            return
        if not self.closing:
            self._answer(request, found)

    def _answer(self, request: p.FlowLookup, found) -> None:
        self.server.stats["lookups"] += 1
        if found is None:
            self.server.stats["lookup_misses"] += 1
            self.send(p.FlowAnswer(id=request.id))
            return
        info, handle = found
        if request.hold:
            if len(self.held) >= MAX_HELD:
                self.send(p.Error(code="busy", message=f"{MAX_HELD} flows held already", id=request.id))
                return
            token = next(self._tokens)
            self.server.handlers.hold(handle)
            self.held[token] = handle
            info = _with_token(info, token)
        self.send(p.FlowAnswer(id=request.id, flow=info))

    def _release(self, message: p.FlowRelease) -> None:
        handle = self.held.pop(message.token, None)
        if handle is None:
            self.server.stats["unknown_releases"] += 1
            return
        self.server.handlers.release(handle)

    def _register(self, request: p.PortRegister) -> None:
        key = (request.port, request.family)
        if key not in self.ports and len(self.ports) >= MAX_PORTS:
            self.send(p.Error(code="busy", message=f"{MAX_PORTS} ports registered already", id=request.id))
            return
        self.server.handlers.register_port(request.port, request.family)
        self.ports[key] = self.ports.get(key, 0) + 1
        self.server.stats["ports_registered"] += 1
        self.send(p.Ok(id=request.id))

    def _unregister(self, message: p.PortUnregister) -> None:
        key = (message.port, message.family)
        count = self.ports.get(key, 0)
        if not count:
            return  # not this client's: nothing to undo
        if count == 1:
            del self.ports[key]
        else:
            self.ports[key] = count - 1
        self.server.handlers.unregister_port(message.port, message.family)

    def _counters(self, request: p.CountersGet) -> None:
        values = p.flatten_counters(self.server.handlers.counters())
        for name, value in self.server.counters().items():
            if len(values) < p.MAX_COUNTERS:
                values[name] = value
        self.send(p.Counters(id=request.id, values=values))

    def _goodbye(self, message: p.Goodbye) -> None:
        self.close()


_HANDLERS = {p.FlowLookup: _Session._lookup, p.FlowRelease: _Session._release, p.PortRegister: _Session._register,
             p.PortUnregister: _Session._unregister, p.CountersGet: _Session._counters, p.Goodbye: _Session._goodbye}


def _with_token(info: p.FlowInfo, token: int) -> p.FlowInfo:
    return msgspec.structs.replace(info, token=token)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - undoing a gone client's state must not stop at the first failure
        log.exception("IPC: undoing a client's state")
