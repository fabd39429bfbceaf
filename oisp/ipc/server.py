"""The redirector's side of the IPC: serves flow lookups, port registrations, counters
and notes to the sensor, from a thread of its own.

    server = IPCServer(flow_table_handlers(redirector.flows, redirector.own_ports, redirector.counters),
                       AccessPolicy.user(uid, gid), owner=(uid, gid)).start()
    server.note("DNS answers are not watched: …", level="degraded")
    ...
    server.stop()

The I/O runs in the server's own thread (oisp.ipc.serve_unix: a selectors loop; on
Windows, oisp.ipc.transport_windows), so the redirector's packet work never waits on a
client. A plain selectors loop rather than asyncio: it answers a lookup in about a
third of the time (benchmarks/RESULTS.md, IPC). The sessions below do no I/O: the loop
hands them bytes and they write to a `Link`; all their calls are made under
`IPCServer.lock`, so the Windows transport's per-pipe threads can share them.

Handlers run on the server's thread and must be quick (a flow-table lookup under its
lock); the one slow case, naming a flow's process from /proc, runs in a worker thread
and is answered when done. Everything a client can make the server hold is bounded:
clients (max_clients), a frame (protocol.MAX_FRAME), the time a frame may take to
arrive whole (frame_timeout) and to say hello (hello_timeout), unread answers
(max_unsent bytes), held flows and registered ports and waiting process lookups per client. A client that breaks
the protocol gets an error and is closed; what it had registered or held is undone
when it goes, so a dead sensor never leaves ports exempted or flows pinned. Every
refusal is counted in `stats`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import msgspec
import psutil

from oisp.ipc import protocol as p
from oisp.ipc.transport import DEFAULT_ADDRESS, AccessPolicy, Peer

log = logging.getLogger(__name__)

MAX_HELD = 65536  # flows one client may hold at once (the flow table's own default size)
MAX_PORTS = 65536  # (port, family) registrations one client may hold
MAX_SLOW = 64  # name_owner lookups one client may have waiting for the worker
KEPT_NOTES = 32  # notes replayed to a client that (re)connects


class ListenersRefused(Exception):
    """listeners.set named a listener the sensor does not hold (the message says which)."""


@dataclass
class Handlers:
    """What the server asks the redirector. `lookup` returns the flow (token left 0) and
    the object `hold`/`release` take, or None. `set_listeners(session, peer, {server port:
    listener port})` raises ListenersRefused, or puts them in force for that session;
    `listeners_dropped(session)` when a session goes (its listeners go with it). `listen`
    is what the welcome tells: where the redirector reflects each server port."""
    lookup: Callable[[str, int, int, bool], tuple[p.FlowInfo, object] | None]
    hold: Callable[[object], None]
    release: Callable[[object], None]
    register_port: Callable[[int, int], None]
    unregister_port: Callable[[int, int], None]
    counters: Callable[[], dict]
    set_listeners: Callable[[object, Peer, dict[int, int]], None] | None = None
    listeners_dropped: Callable[[object], None] = lambda session: None
    listen: dict[int, int] = field(default_factory=dict)


def packed_address(text: str) -> bytes:
    """An IP literal as the flow table's key takes it (4 bytes for IPv4, also when it
    comes IPv4-mapped from a dual-stack listener; else 16): inet_pton, a few times
    faster than ipaddress on the lookup path."""
    if ":" not in text:
        return socket.inet_pton(socket.AF_INET, text)
    packed = socket.inet_pton(socket.AF_INET6, text)
    return packed[12:] if packed[:12] == _MAPPED else packed


_MAPPED = b"\0" * 10 + b"\xff\xff"
_text = functools.lru_cache(maxsize=4096)(str)  # a flow's addresses repeat: the client's, a few servers'


def _process_created(pid: int | None) -> float | None:
    """When process `pid` started (Unix time), so the sensor can tell a reused pid apart.
    Only on the slow path (name_owner): reading it costs about as much as the whole round
    trip, and /proc/<pid>/stat, where it comes from, is readable by the sensor too."""
    if not pid:
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def flow_table_handlers(flows, own_ports, counters: Callable[[], dict]) -> Handlers:
    """Handlers over the redirector's FlowTable and OwnPorts (oisp.redirect)."""
    def lookup(peer_addr: str, peer_port: int, proxy_port: int, name_owner: bool):
        entry = flows.lookup(packed_address(peer_addr), peer_port, proxy_port, name_owner=name_owner)
        if entry is None:
            return None
        return p.FlowInfo(client_addr=_text(entry.client_addr), client_port=entry.client_port,
                          server_addr=_text(entry.server_addr), server_port=entry.server_port,
                          created=entry.created, pid=entry.pid,
                          process_name=p.clip(entry.process_name, p.MAX_PROCESS_NAME) if entry.process_name else None,
                          process_created=_process_created(entry.pid) if name_owner else None), entry

    # OwnPorts keeps a bit per family (an IPv6-only socket may share an IPv4 socket's port
    # number) and counts a port's users itself; the protocol names families 4 and 6.
    def af(family: int) -> int:
        return socket.AF_INET6 if family == 6 else socket.AF_INET

    return Handlers(lookup=lookup, hold=flows.hold, release=flows.release,
                    register_port=lambda port, family: own_ports.register(port, af(family)),
                    unregister_port=lambda port, family: own_ports.unregister(port, af(family)), counters=counters)


class Link(Protocol):
    """One accepted connection, as the transport's loop gives it to a session."""
    peer: Peer | None

    def write(self, data: bytes) -> None: ...

    def unsent(self) -> int: ...  # bytes written but not yet taken by the peer

    def close(self, abort: bool = False) -> None: ...


class IPCServer:
    def __init__(self, handlers: Handlers, policy: AccessPolicy, *, address: str = DEFAULT_ADDRESS,
                 owner: tuple[int, int | None] = (0, None), max_clients: int = 4, hello_timeout: float = 5.0,
                 frame_timeout: float = 5.0, max_unsent: int = 1 << 20, software: str = "oisp"):
        self.handlers, self.policy, self.address, self.owner = handlers, policy, address, owner
        self.max_clients, self.hello_timeout, self.frame_timeout = max_clients, hello_timeout, frame_timeout
        self.max_unsent, self.software = max_unsent, p.clip(software, 64)
        self.stats = {"accepted": 0, "refused_peer": 0, "refused_busy": 0, "protocol_errors": 0, "hello_timeouts": 0,
                      "frame_timeouts": 0, "slow_clients": 0, "handler_errors": 0, "lookups": 0, "lookup_misses": 0,
                      "ports_registered": 0, "unknown_releases": 0, "disconnected": 0,
                      "listeners_refused": 0}
        self.last_refused: Peer | None = None  # for the log and tests
        self.lock = threading.RLock()  # every session call is made under it
        self.sessions: set[Session] = set()
        self._notes: deque[p.Note] = deque(maxlen=KEPT_NOTES)
        self._loop = None  # the transport's loop: call_soon(fn), stop()
        self._worker: ThreadPoolExecutor | None = None

    # -- lifecycle (any thread) ------------------------------------------------------------
    def start(self) -> IPCServer:
        """Listen (raises if the address cannot be made safe) and serve from a thread."""
        if sys.platform == "win32":
            from oisp.ipc.transport_windows import PipeLoop as Loop
        else:
            from oisp.ipc.serve_unix import UnixLoop as Loop
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oisp-ipc-owner")
        self._loop = Loop(self)
        try:
            self._loop.start()
        except BaseException:
            self._loop = None
            self._worker.shutdown(wait=False)
            raise
        return self

    def stop(self) -> None:
        """Say goodbye to every client, stop listening, end the thread."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> IPCServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def note(self, text: str, level: str = "info") -> None:
        """A line for the sensor's status line and UI; kept and pushed to every client."""
        if level not in p.NOTE_LEVELS:  # msgspec checks on decoding only: a bad one would cut every client
            raise ValueError(f"note level {level!r} is not one of {sorted(p.NOTE_LEVELS)}")
        note = p.Note(text=p.clip(text, p.MAX_NOTE), level=level, ts=time.time())
        with self.lock:
            self._notes.append(note)
        if self._loop is not None:
            self._loop.call_soon(lambda: self._push(note))

    def quic_refused(self, flow: dict) -> None:
        """A QUIC attempt refused (oisp.redirect.quic's report): pushed to every client, not kept."""
        message = p.QuicRefused(client_addr=flow["client"][0], client_port=flow["client"][1],
                                server_addr=flow["server"][0], server_port=flow["server"][1], ts=flow["ts"])
        if self._loop is not None:
            self._loop.call_soon(lambda: self._push(message))

    def _push(self, message: p.Message) -> None:
        for session in list(self.sessions):
            if session.welcomed:
                session.send(message)

    def counters(self) -> dict[str, int]:
        return {f"ipc.{k}": v for k, v in self.stats.items()} | {"ipc.clients": len(self.sessions)}

    # -- for the transport's loop (under self.lock) -------------------------------------------
    def open(self, link: Link, now: float) -> Session | None:
        """A client connected: its session, or None when refused (the link is closed)."""
        peer = link.peer
        if peer is None or not self.policy.allows(peer):
            self.stats["refused_peer"] += 1
            self.last_refused = peer
            log.warning("IPC: refused %s", peer.describe() if peer else "a peer of unknown identity")
            link.close(abort=True)  # nothing is said to a stranger
            return None
        if len(self.sessions) >= self.max_clients:
            self.stats["refused_busy"] += 1
            link.write(p.encode(p.Error(code="busy", message=f"the redirector serves {self.max_clients} clients at most")))
            link.close()
            return None
        self.stats["accepted"] += 1
        session = Session(self, link, now)
        self.sessions.add(session)
        return session

    def goodbye_all(self) -> None:
        for session in list(self.sessions):
            session.close(p.Goodbye(reason="the redirector is stopping"))

    def in_worker(self, fn, done) -> None:
        """Run fn() in the worker thread, then done(result, error) under the lock."""
        def run():
            try:
                result, error = fn(), None
            except Exception as e:  # noqa: BLE001 - handed to done, which answers an error
                result, error = None, e
            self._loop.call_soon(lambda: done(result, error))
        self._worker.submit(run)


class Session:
    """One client connection's protocol state: its decoder, what it holds, its deadline."""

    def __init__(self, server: IPCServer, link: Link, now: float):
        self.server, self.link = server, link
        self.decoder = p.Decoder("server")
        self.welcomed = False
        self.closing = False
        self.held: dict[int, object] = {}
        self.ports: dict[tuple[int, int], int] = {}
        self.slow = 0  # name_owner lookups in the worker
        self._tokens = itertools.count(1)
        self.deadline: float | None = now + server.hello_timeout  # the loop calls expire() then
        self._deadline_is = "hello_timeouts"

    # -- called by the loop ---------------------------------------------------------------
    def received(self, data: bytes, now: float) -> None:
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
        if self.welcomed:  # a frame begun must arrive whole within frame_timeout
            if not self.decoder.buffered:
                self.deadline = None
            elif self.deadline is None:
                self.deadline, self._deadline_is = now + self.server.frame_timeout, "frame_timeouts"

    def expire(self) -> None:
        self.server.stats[self._deadline_is] += 1
        what = "no hello" if self._deadline_is == "hello_timeouts" else "a frame did not arrive whole"
        self.close(p.Error(code="malformed", message=f"{what} within the time allowed"))

    def closed(self) -> None:
        """The connection is gone: release its flows, unregister its ports."""
        server = self.server
        if self in server.sessions:
            server.sessions.discard(self)
            server.stats["disconnected"] += 1
        self.closing = True
        handlers = server.handlers
        for handle in self.held.values():
            _quietly(handlers.release, handle)
        self.held.clear()
        for (port, family), count in self.ports.items():
            for _ in range(count):
                _quietly(handlers.unregister_port, port, family)
        self.ports.clear()
        _quietly(handlers.listeners_dropped, self)

    # -- output -----------------------------------------------------------------------------
    def send(self, message: p.Message) -> None:
        if self.closing:
            return
        self.link.write(p.encode(message))
        if self.link.unsent() > self.server.max_unsent:
            self.server.stats["slow_clients"] += 1  # it does not read its answers: no unbounded queue
            self.closing = True
            self.link.close(abort=True)

    def close(self, last: p.Message | None = None) -> None:
        if self.closing:
            return
        if last is not None:
            self.send(last)
        self.closing = True
        self.deadline = None
        self.link.close()

    # -- messages ---------------------------------------------------------------------------
    def _dispatch(self, message: p.Message) -> None:
        if not self.welcomed:
            if isinstance(message, p.Hello):
                self._hello(message)
            else:
                self.server.stats["protocol_errors"] += 1
                self.close(p.Error(code="not_ready", message="hello first"))
            return
        handler = _HANDLERS.get(type(message))
        if handler is None:  # a second hello
            self.server.stats["protocol_errors"] += 1
            self.close(p.Error(code="unknown_type", message="hello after welcome"))
            return
        try:
            handler(self, message)
        except Exception as e:  # noqa: BLE001 - a failing handler answers an error, the session goes on
            self._failed(message, e)

    def _failed(self, message: p.Message, error: Exception) -> None:
        self.server.stats["handler_errors"] += 1
        log.error("IPC: %s failed: %s: %s", type(message).__name__, type(error).__name__, error)
        request_id = getattr(message, "id", None)
        if request_id is not None:
            self.send(p.Error(code="internal", message=p.clip(f"{type(error).__name__}: {error}", 256), id=request_id))

    def _hello(self, hello: p.Hello) -> None:
        version = p.negotiate(hello.versions)
        if version is None:
            self.server.stats["protocol_errors"] += 1
            self.close(p.Error(code="unsupported_version",
                               message=f"the redirector speaks versions {list(p.SUPPORTED_VERSIONS)}"))
            return
        self.welcomed, self.deadline = True, None
        listen = tuple(p.Listen(server_port=server, listener_port=listener)
                       for server, listener in sorted(self.server.handlers.listen.items()))
        self.send(p.Welcome(version=version, software=self.server.software, listen=listen))
        for note in list(self.server._notes):
            self.send(note)

    def _lookup(self, request: p.FlowLookup) -> None:
        handlers = self.server.handlers
        args = (request.peer_addr, request.peer_port, request.proxy_port, request.name_owner)
        if not request.name_owner:
            self._answer(request, handlers.lookup(*args))
            return
        if self.slow >= MAX_SLOW:  # the worker's queue is not a client's to fill
            self.send(p.Error(code="busy", message=f"{MAX_SLOW} process lookups waiting already", id=request.id))
            return
        self.slow += 1

        def done(found, error):  # may have read /proc in the worker; back under the lock
            self.slow -= 1
            if self.closing:
                return
            if error is not None:
                self._failed(request, error)
            else:
                self._answer(request, found)
        self.server.in_worker(lambda: handlers.lookup(*args), done)

    def _answer(self, request: p.FlowLookup, found) -> None:
        self.server.stats["lookups"] += 1
        if found is None:
            self.server.stats["lookup_misses"] += 1
            self.send(p.FlowAnswer(id=request.id))
            return
        info, handle = found
        if request.hold and len(self.held) >= MAX_HELD:
            self.send(p.Error(code="busy", message=f"{MAX_HELD} flows held already", id=request.id))
            return
        # Registered before the answer leaves, so the sensor's connect that follows it is
        # never reflected (as port.register's ok).
        if request.upstream is not None and not self._add_port(request.upstream.port, request.upstream.family):
            self.send(p.Error(code="busy", message=f"{MAX_PORTS} ports registered already", id=request.id))
            return
        if request.hold:
            token = next(self._tokens)
            self.server.handlers.hold(handle)
            self.held[token] = handle
            info = msgspec.structs.replace(info, token=token)
        self.send(p.FlowAnswer(id=request.id, flow=info))

    def _release(self, message: p.FlowRelease) -> None:
        handle = self.held.pop(message.token, None)
        if handle is None:
            self.server.stats["unknown_releases"] += 1
            return
        self.server.handlers.release(handle)

    def _register(self, request: p.PortRegister) -> None:
        if not self._add_port(request.port, request.family):
            self.send(p.Error(code="busy", message=f"{MAX_PORTS} ports registered already", id=request.id))
            return
        self.send(p.Ok(id=request.id))

    def _add_port(self, port: int, family: int) -> bool:
        """Register an upstream port for this session (port.register, or a lookup's
        `upstream`); False past MAX_PORTS."""
        key = (port, family)
        if key not in self.ports and len(self.ports) >= MAX_PORTS:
            return False
        self.server.handlers.register_port(port, family)
        self.ports[key] = self.ports.get(key, 0) + 1
        self.server.stats["ports_registered"] += 1
        return True

    def _listeners(self, request: p.ListenersSet) -> None:
        set_listeners = self.server.handlers.set_listeners
        if set_listeners is None:
            self.send(p.Error(code="refused", message="this redirector takes no listeners", id=request.id))
            return
        wanted = {entry.server_port: entry.listener_port for entry in request.listeners}
        try:
            set_listeners(self, self.link.peer, wanted)
        except ListenersRefused as e:
            self.server.stats["listeners_refused"] += 1
            self.send(p.Error(code="refused", message=p.clip(str(e), 256), id=request.id))
            return
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


_HANDLERS = {p.FlowLookup: Session._lookup, p.FlowRelease: Session._release, p.PortRegister: Session._register,
             p.PortUnregister: Session._unregister, p.ListenersSet: Session._listeners, p.CountersGet: Session._counters,
             p.Goodbye: Session._goodbye}


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - undoing a gone client's state must not stop at the first failure
        log.exception("IPC: undoing a client's state")
