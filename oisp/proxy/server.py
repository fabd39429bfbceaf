"""The transparent proxy: accepts reflected connections, decrypts the AI ones.

For each accepted connection:
1. bind the upstream socket, then ask the redirector (flow_source.py: in this
   process or over the IPC) where the client meant to go, registering that
   socket's port in the same question, so our own connection is never reflected
   back to us;
2. start connecting upstream;
3. meanwhile, peek at the ClientHello (SNI, ALPN) without consuming it;
4. if the SNI names an AI host and this client program has not shown it pins
   certificates (pinning.py): TLS to upstream offering the client's ALPN list, then TLS to
   the client with a leaf for that SNI offering exactly what upstream chose;
   the plaintext both ways goes to a FlowRecorder;
5. otherwise relay the bytes untouched, so the client sees the real server.

A plaintext listener (`start(..., plain=True)`: local model servers, see
oisp/redirect/plain.py) skips 3 and 4: the relay starts at once (a server that
speaks first is not kept waiting) and the client's bytes are decoded as HTTP
unless they open with a TLS record; its events are emitted once the connection
has carried an AI exchange, so other HTTP on these ports leaves no trace.

Every chunk read from one side is written to the other at once (an SSE stream
is never buffered), with back-pressure across (see relay.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from typing import Callable

from oisp.decode import Direction, FlowContext
from oisp.divert.address import unmapped
from oisp.events import FlowRecorder, ProcessAttributor
from oisp.events.builder import certificate_rejected_event
from oisp.own_ports import bound_socket
from oisp.proxy.flow_source import Destination, FlowSource
from oisp.proxy.clienthello import MAX_HELLO, ClientHello, NotTLS, hello_complete, parse_client_hello
from oisp.proxy.deferred import DeferredFeed
from oisp.proxy.pinning import PinningPolicy, rejects_certificate
from oisp.proxy.relay import Relay, within
from oisp.proxy.sessions import UpstreamSessions

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 15.0
# The application protocols the proxy offers upstream, and so can decode. A client's ALPN
# list is cut down to these (in its order) before it names an upstream context: every
# distinct list would otherwise make a context of its own (~840 KiB with the trust store,
# kept for good), and any local program can send lists at will.
KNOWN_ALPN = ("h2", "http/1.1")
# After accept() fails (EMFILE when descriptors run out, ENOBUFS, ...) the loop pauses,
# doubling from the first to the second figure, and tries again: connections wait in the
# listen backlog meanwhile. When accept() or an accepted connection's upstream socket has
# failed so for ACCEPT_GIVE_UP seconds, with no connection dialled upstream between, the
# proxy cannot serve: `failure` says why and `on_failure` is told, so whoever reflects
# connections here can stop (fail open).
ACCEPT_BACKOFF = (0.05, 1.0)
ACCEPT_GIVE_UP = 10.0
# Trouble ends after this long without an error (more than the longest accept back-off).
ACCEPT_RECOVERED = 2.0
# accept() errors about one connection (it was reset while queued), not about the proxy.
_ONE_CONNECTION = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
# A plaintext connection's bytes held while its owner is named, at most (see _record_plain).
PLAIN_PENDING_MAX = 1 << 20
_NO_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


__all__ = ["Destination", "FlowSource", "Listener", "TransparentProxy", "known_alpn"]


@dataclass
class Listener:
    """One listening socket: its port (the flows reflected to it name it) and whether it
    takes plaintext connections."""

    sock: socket.socket
    port: int
    plain: bool = False
    task: Any = None


def known_alpn(offered: list[str]) -> list[str]:
    """The protocols of `offered` the proxy speaks, in the client's order, each once."""
    return list(dict.fromkeys(p for p in offered if p in KNOWN_ALPN))


async def _ready(sock: socket.socket, *, write: bool, timeout: float, what: str) -> None:
    """Wait until a non-blocking socket is readable (or writable), failing after `timeout`."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    (loop.add_writer if write else loop.add_reader)(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await within(ready, timeout, what)
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


class TransparentProxy:
    def __init__(self, *, flows: FlowSource, issuer, spec=None,
                 upstream_verify: bool = True, upstream_cafile: str | None = None, keylog: str | None = None,
                 on_events: Callable[[list[dict]], None] = lambda events: None,
                 recorder_options: dict | None = None, pinning: PinningPolicy | None = None,
                 on_failure: Callable[[str], None] = lambda why: None, accept_give_up: float = ACCEPT_GIVE_UP):
        from oisp.spec import default_spec

        # What the redirector knows (flow_source.py): each connection's flow, held while the
        # connection is open, and our upstream ports, which it must leave alone.
        self.flows = flows
        self.issuer = issuer
        self.spec = spec or default_spec()
        self.on_events = on_events
        # One attributor for every flow: it caches each process's description (psutil reads
        # six /proc files, ~0.25 ms, which a recorder of its own paid per connection).
        self.recorder_options = {"attributor": ProcessAttributor(), **(recorder_options or {})}
        self.pinning = pinning or PinningPolicy()
        self.keylog = keylog
        self._verify, self._cafile = upstream_verify, upstream_cafile
        self._alpn_contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self.upstream_context = self._upstream_context()
        self.upstream_sessions = UpstreamSessions()
        self.stats = dict.fromkeys(("connections", "intercepted", "passed_through", "pinned", "pin_bypassed", "no_flow",
                                    "not_tls", "upstream_errors", "client_tls_errors", "upstream_resumed",
                                    "bytes_up", "bytes_down", "accept_errors", "plain", "plain_ai",
                                    "plain_tls"), 0)
        # Why the proxy cannot serve (None while it can): see ACCEPT_GIVE_UP.
        self.failure: str | None = None
        self.on_failure, self.accept_give_up = on_failure, accept_give_up
        self.listeners: list[Listener] = []
        self._trouble_since: float | None = None  # monotonic; see ACCEPT_GIVE_UP
        self._last_trouble = 0.0
        self._owned_by_transport: set[socket.socket] = set()
        self._tasks: set[asyncio.Task] = set()

    def _upstream_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()  # the system trust store
        if self._cafile:
            context.load_verify_locations(self._cafile)
        if alpn:
            context.set_alpn_protocols(alpn)
        if not self._verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.keylog:
            context.keylog_filename = self.keylog
        return context

    # -- listening ----------------------------------------------------------------
    async def start(self, port: int, host: str = "::", *, plain: bool = False) -> int:
        """Listen on `port` (dual-stack by default; 0: any free port); returns the bound
        port. May be called again for more ports, e.g. plaintext ones (`plain`)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((host, port))
        listener.listen(1024)
        listener.setblocking(False)
        entry = Listener(listener, listener.getsockname()[1], plain)
        entry.task = asyncio.get_running_loop().create_task(self._accept_loop(entry))
        entry.task.add_done_callback(self._accept_ended)
        self.listeners.append(entry)
        return entry.port

    @property
    def serving(self) -> bool:
        """Whether the proxy accepts connections: started, its accept loop alive and not
        failing for good."""
        return self.failure is None and bool(self.listeners) and not any(l.task.done() for l in self.listeners)

    async def stop(self) -> None:
        """Stop accepting; connections in flight go on (see drain)."""
        for listener in list(self.listeners):
            self.close_listener(listener)

    def close_listener(self, listener: Listener) -> None:
        """Stop accepting on one listener (its connections in flight go on)."""
        listener.task.cancel()
        listener.sock.close()
        self.listeners.remove(listener)

    async def drain(self, timeout: float) -> None:
        """Give connections in flight up to `timeout` seconds to finish, then cut them
        (a reset to both peers) and wait, briefly, until they are."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        cut = list(self._tasks)
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.wait(cut, timeout=1.0)

    async def _accept_loop(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        pause = ACCEPT_BACKOFF[0]
        while True:
            try:
                conn, _ = await loop.sock_accept(listener.sock)
            except OSError as exc:
                self.stats["accept_errors"] += 1
                if exc.errno in _ONE_CONNECTION:
                    continue
                self._trouble(exc)
                await asyncio.sleep(pause)
                pause = min(2 * pause, ACCEPT_BACKOFF[1])
                continue
            pause = ACCEPT_BACKOFF[0]
            task = loop.create_task(self._serve(conn, listener))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    def _trouble(self, exc: OSError) -> None:
        """accept() failed, or an accepted connection got no upstream socket (descriptors)."""
        now = time.monotonic()
        if self._trouble_since is None:  # a new stretch of trouble, said once
            self._trouble_since = now
            log.warning("proxy: %s; retrying", exc)
            asyncio.get_running_loop().call_later(self.accept_give_up, self._recheck)
        elif self.failure is None and now - self._trouble_since >= self.accept_give_up:
            self._failed(f"no connection served for {now - self._trouble_since:.0f} s ({exc})")
        self._last_trouble = now

    def _untroubled(self) -> None:
        """A connection was dialled upstream. The proxy serves again only once that has gone
        on without trouble for ACCEPT_RECOVERED: a descriptor some other part frees for a
        moment lets one queued connection in, and the next accept fails again."""
        if self._trouble_since is not None and time.monotonic() - self._last_trouble >= ACCEPT_RECOVERED:
            self._trouble_since = self.failure = None
            log.warning("proxy: serving again")

    def _recheck(self) -> None:
        """From the give-up time after trouble began, every ACCEPT_RECOVERED, even if no
        connection came to show it: could a connection get its two descriptors? (A burst
        that took them all and then stopped coming would otherwise leave the proxy unable
        to serve the next one, unnoticed.)"""
        if self._trouble_since is None:
            return
        loop = asyncio.get_running_loop()
        probes: list[socket.socket] = []
        try:
            for _ in range(2):  # the client's connection and its upstream socket
                probes.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except OSError as exc:
            if exc.errno not in _NO_RESOURCES:
                raise
            self._trouble(exc)  # past the give-up time: the proxy cannot serve
            loop.call_later(ACCEPT_RECOVERED, self._recheck)
            return
        finally:
            for probe in probes:
                probe.close()
        if time.monotonic() - self._last_trouble >= ACCEPT_RECOVERED:
            self._trouble_since = self.failure = None
            log.warning("proxy: serving again")
        else:
            loop.call_later(ACCEPT_RECOVERED, self._recheck)

    def _accept_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failed(f"the accept loop died ({task.exception()!r})")

    def _failed(self, why: str) -> None:
        self.failure = why
        log.error("proxy: cannot serve: %s", why)
        try:
            self.on_failure(why)
        except Exception:
            log.exception("proxy: on_failure failed")

    # -- one connection -----------------------------------------------------------
    async def _serve(self, conn: socket.socket, listener: Listener) -> None:
        self.stats["connections"] += 1
        upstream, upstream_port, held = None, None, None
        try:
            peer_addr, peer_port = conn.getpeername()[:2]
            # Small writes (headers, one SSE event) must leave at once: without this, Nagle
            # holds them for the peer's delayed ACK (measured: ~40 ms on every other request).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = (str(unmapped(peer_addr)), peer_port)  # the dual-stack listener's view of an IPv4 peer
            # Bound first, so the flow's lookup registers its port too (one round trip over
            # the IPC). The peer of a reflected connection is the server's address: its family.
            upstream = bound_socket(socket.AF_INET6 if ":" in peer[0] else socket.AF_INET)
            target = await self.flows.open(*peer, listener.port, upstream)
            if target is None:
                self.stats["no_flow"] += 1
                return
            held, upstream_port = target, upstream.getsockname()[1]
            # Both paths go upstream: dial now, while the ClientHello is on its way.
            self._dial_upstream(upstream, target.server)
            self._untroubled()
            if listener.plain:
                await self._connected(upstream, target.server)
                await self._record_plain(conn, upstream, target, peer, listener)
                return
            try:
                hello = await self._peek_hello(conn)
            except (NotTLS, TimeoutError, asyncio.TimeoutError, ConnectionError):
                hello = None
                self.stats["not_tls"] += 1
            await self._connected(upstream, target.server)
            sni = hello.sni if hello else None
            if sni and self.spec.matches_host(sni) and not await self._pinned(target, peer, sni, listener):
                await self._intercept(conn, upstream, target, hello, peer, listener)
            else:
                self.stats["passed_through"] += 1
                await self._pass_through(conn, upstream)
        except OSError as exc:
            self.stats["upstream_errors"] += 1
            log.debug("connection failed: %s", exc)
            if exc.errno in _NO_RESOURCES:
                self._trouble(exc)
        finally:
            # Unregistered before it is closed, so the port is never registered while
            # another program could bind it (own_ports.py).
            if upstream_port is not None:
                self.flows.unregister(upstream_port, upstream.family)
            # A socket handed to a transport is closed by it (closing it here would free
            # its fd while the event loop still watches it).
            for sock in (conn, upstream):
                if sock is not None and sock not in self._owned_by_transport:
                    sock.close()
                self._owned_by_transport.discard(sock)
            if held is not None:
                self.flows.release(held)

    async def _peek_hello(self, conn: socket.socket, timeout: float = HANDSHAKE_TIMEOUT) -> ClientHello:
        """Wait until the whole ClientHello is in the socket, and read it without consuming it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            try:  # usually here already: the client sends it right after its handshake
                data = conn.recv(MAX_HELLO + 5, socket.MSG_PEEK)
            except BlockingIOError:
                await _ready(conn, write=False, timeout=max(0.0, deadline - loop.time()), what="ClientHello")
                continue
            if not data:
                raise ConnectionError("the client closed before its ClientHello")
            complete = hello_complete(data)
            if complete:
                return parse_client_hello(data[:complete])
            if len(data) == seen:  # still partial: the socket stays readable, so wait a little
                await asyncio.sleep(0.005)
            seen = len(data)
            if loop.time() > deadline:
                raise TimeoutError("no complete ClientHello")

    @staticmethod
    def _dial_upstream(sock: socket.socket, server: tuple[str, int]) -> None:
        """Start connecting to the original destination from `sock`, whose port the
        redirector has registered, so it knows this connection is ours and leaves it
        alone. `_connected` waits for it. (By hand rather than loop.sock_connect under
        wait_for, which costs a task and extra loop passes.) The caller unregisters the
        port and closes."""
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(server)
        if error not in (0, errno.EINPROGRESS):
            raise OSError(error, f"connect to {server[0]} port {server[1]}: {os.strerror(error)}")

    @staticmethod
    async def _connected(sock: socket.socket, server: tuple[str, int]) -> None:
        """Wait until `_dial_upstream`'s connect is through; OSError if it failed."""
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not error:
            try:
                sock.getpeername()
                return
            except OSError:  # not yet connected
                await _ready(sock, write=True, timeout=HANDSHAKE_TIMEOUT, what=f"connect to {server[0]} port {server[1]}")
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, f"connect to {server[0]} port {server[1]}: {os.strerror(error)}")

    async def _pass_through(self, conn: socket.socket, upstream: socket.socket) -> None:
        relay = Relay(on_data=self._counter())
        await self._attach(relay, "client", conn)
        await self._attach(relay, "upstream", upstream)
        await self._run(relay)

    async def _pinned(self, target: Destination, peer: tuple[str, int], sni: str, listener: Listener) -> bool:
        """Whether this client program passes through to `sni` (counted as a bypass)."""
        if not self.pinning.may_be_pinned(sni):
            return False  # the usual case: no need to name the client
        if self.pinning.pinned(self._client_of(await self._named(target, peer, listener)), sni, time.monotonic()):
            self.stats["pin_bypassed"] += 1
            return True
        return False

    def _client_of(self, target: Destination) -> tuple[str | None, str | None]:
        """Who a connection's client is, for pinning: its program (exe path, else name) and user."""
        info = self.recorder_options["attributor"].process(target.pid) or {}
        return info.get("exe") or info.get("name") or target.process_name, info.get("user")

    async def _named(self, target: Destination, peer: tuple[str, int], listener: Listener) -> Destination:
        """The target with its owner: the flow is usually named by now (the redirector
        names owners right after reflecting a SYN); if not, the redirector names it (which
        may scan /proc: flow_source.py keeps that off this loop)."""
        if target.pid is None:
            named = await self.flows.lookup(*peer, listener.port, name_owner=True)
            if named is not None:  # the held flow's handle stays the one to release
                target = Destination(target.client, target.server, named.pid, named.process_name, target.handle)
        return target

    async def _record_plain(self, conn, upstream, target: Destination, peer: tuple[str, int], listener: Listener) -> None:
        """A plaintext connection to a local model server: relayed at once, decoded after.
        The owner is named once the first reply has been relayed (so naming, which may
        scan /proc, never delays it, and the reflector has usually named it by then);
        bytes that arrive meanwhile wait in `pending`, stamped (past PLAIN_PENDING_MAX
        bytes, e.g. a long upload, the owner is named at once)."""
        self.stats["plain"] += 1
        started = time.time()
        relay = Relay()
        replied = asyncio.get_running_loop().create_future()
        count = self._counter()
        pending: list[tuple[Direction, bytes, float]] = []
        state: dict[str, Any] = {"tls": None, "feed": None, "pending": 0}

        def record(side: str, data: bytes) -> None:
            count(side, data)
            if state["tls"] is None and side == "client":
                state["tls"] = data[:1] == b"\x16"  # a TLS handshake record: not ours to read
                self.stats["plain_tls"] += state["tls"]
            if state["tls"]:
                return
            direction = Direction.REQUEST if side == "client" else Direction.RESPONSE
            if side != "client" and not replied.done():
                replied.set_result(None)
            if state["feed"] is None:
                pending.append((direction, bytes(data), time.time()))
                state["pending"] += len(data)
                if state["pending"] > PLAIN_PENDING_MAX and not replied.done():
                    replied.set_result(None)
            else:
                state["feed"].add(direction, data)

        relay.on_data = record
        await self._attach(relay, "client", conn)
        await self._attach(relay, "upstream", upstream)
        relay.start()
        try:
            await asyncio.wait([replied, relay.done], return_when=asyncio.FIRST_COMPLETED)
            target = await self._named(target, peer, listener)
            ctx = FlowContext(client=target.client, server=target.server, start_ts=started, pid=target.pid,
                              process_name=target.process_name)
            recorder = FlowRecorder(ctx, spec=self.spec, **self.recorder_options)
            gate: dict[str, Any] = {"open": False, "connect": []}

            def emit(events: list[dict]) -> None:
                """Nothing until the connection shows an AI exchange; then its connect first."""
                if not gate["open"]:
                    gate["connect"] += [e for e in events if e["event_type"] == "network.connect"]
                    events = [e for e in events if e["event_type"] != "network.connect"]
                    if not any(e["event_type"].startswith("ai.") for e in events):
                        return  # e.g. a web dev server's HTTP on the same port
                    gate["open"] = True
                    self.stats["plain_ai"] += 1
                    events = gate["connect"] + events
                self._emit(events)

            feed = state["feed"] = DeferredFeed(recorder, emit)
            for direction, data, ts in pending:
                feed.add(direction, data, ts)
            pending.clear()
            try:
                await asyncio.shield(relay.done)
            finally:
                feed.close()
        finally:
            if not relay.done.done():
                relay.close(abort=True)

    async def _intercept(self, conn, upstream, target: Destination, hello: ClientHello, peer: tuple[str, int],
                         listener: Listener) -> None:
        alpn, context = self._with_alpn(hello.alpn)
        relay = Relay(stats=self.stats)
        # When the client offers HTTP/1.1 alone (or no ALPN), upstream's choice cannot change
        # what the client speaks: both handshakes run at once. Otherwise the client is served
        # exactly what upstream chose, so its handshake waits for upstream's.
        at_once = not alpn or alpn == ["http/1.1"]
        try:
            up = await self._attach(relay, "upstream", upstream, context, server_hostname=hello.sni,
                                    session=self.upstream_sessions.get(context, target.server, hello.sni))
            if at_once:
                client = await self._attach_client(relay, conn, hello.sni, alpn)
            await up.handshake(HANDSHAKE_TIMEOUT)
            self.stats["upstream_resumed"] += up.tls.session_reused
            if not at_once:
                chosen = up.tls.selected_alpn_protocol()
                client = await self._attach_client(relay, conn, hello.sni, [chosen] if chosen else None)
            try:
                await client.handshake(HANDSHAKE_TIMEOUT)
            except (ssl.SSLError, ConnectionError, TimeoutError, asyncio.TimeoutError) as exc:
                self._client_rejected(hello.sni, await self._named(target, peer, listener), exc)
                relay.close()
                return
        except BaseException:
            relay.abandon()
            raise
        chosen = client.tls.selected_alpn_protocol()  # what the client speaks
        log.debug("intercepting %s (alpn %s)", hello.sni, chosen)
        self.stats["intercepted"] += 1
        target = await self._named(target, peer, listener)
        ctx = FlowContext(client=target.client, server=target.server, start_ts=time.time(), pid=target.pid,
                          process_name=target.process_name, sni=hello.sni, alpn=chosen,
                          tls_version=client.tls.version(), cipher=(client.tls.cipher() or (None,))[0])
        recorder = FlowRecorder(ctx, spec=self.spec, **self.recorder_options)
        self._emit(recorder.start())
        count = self._counter()
        feed = DeferredFeed(recorder, self._emit)

        def record(side: str, data: bytes) -> None:
            count(side, data)
            feed.add(Direction.REQUEST if side == "client" else Direction.RESPONSE, data)

        relay.on_data = record
        try:
            await self._run(relay)
        finally:
            feed.close()
            self.upstream_sessions.keep(context, target.server, hello.sni, up.tls)

    async def _attach_client(self, relay: Relay, conn: socket.socket, sni: str, alpn: list[str] | None):
        """The client's side, served a leaf for its SNI and exactly `alpn`; its handshake
        runs as its ClientHello is read."""
        return await self._attach(relay, "client", conn, self.issuer.server_context(sni, alpn), server_side=True)

    async def _attach(self, relay: Relay, name: str, sock: socket.socket, context=None, **tls):
        self._owned_by_transport.add(sock)  # the transport closes it from now on
        return await relay.attach(name, sock, context, **tls)

    def _counter(self):
        stats = self.stats

        def count(side: str, data: bytes) -> None:
            stats["bytes_up" if side == "client" else "bytes_down"] += len(data)
        return count

    @staticmethod
    async def _run(relay: Relay) -> None:
        """Relay until both sockets close; cancelled (drain), cut them."""
        relay.start()
        try:
            await asyncio.shield(relay.done)
        finally:
            if not relay.done.done():
                relay.close(abort=True)

    def _with_alpn(self, offered: list[str]) -> tuple[list[str], ssl.SSLContext]:
        """What to offer upstream for a client's ALPN list (its KNOWN_ALPN part), and the
        upstream context offering that: one per distinct list, so at most a handful."""
        alpn = known_alpn(offered)
        if not alpn:
            return alpn, self.upstream_context
        key = tuple(alpn)
        if key not in self._alpn_contexts:
            self._alpn_contexts[key] = self._upstream_context(alpn)
        return alpn, self._alpn_contexts[key]

    def _client_rejected(self, sni: str, target: Destination, exc: BaseException) -> None:
        """A client's handshake failed. One that refused our certificate (a TLS alert) may
        pin its server: after repeated refusals, its later connections pass through."""
        self.stats["client_tls_errors"] += 1
        if not rejects_certificate(exc):
            return  # closed, timed out, or not about the certificate: nothing learned
        pinned = self.pinning.rejected(self._client_of(target), sni, time.monotonic())
        self.stats["pinned"] += pinned
        self._emit([certificate_rejected_event(target.server, target.client, sni, time.time(), reason=exc.reason,
                                               pid=target.pid, process_name=target.process_name,
                                               passes_for=self.pinning.ttl if pinned else None)])

    def _emit(self, events: list[dict]) -> None:
        if events:
            try:
                self.on_events(events)
            except Exception:  # a sink problem must never break the relay
                log.exception("event sink failed")
