"""Relaying one proxied connection: two sockets, each with its TLS done in memory.

Why not asyncio's streams and SSL transports: per chunk they cost a task
wake-up, a StreamReader buffer and sslproto's state machine on both sides —
most of the proxy's CPU at request rate. Here each socket is a plain asyncio
transport with a Protocol (`Side`), and TLS runs on an `ssl.SSLObject` over two
`MemoryBIO`s. A chunk read from one side is decrypted, handed to the other,
encrypted and written within one callback; decoding comes after the write, so
it never delays the client.

Once a side's handshake is done, its records go through `oisp._native.tls_relay`
(when it vouches for the SSLObject's SSL*): one C call per received buffer
decrypts it, re-encrypts it for the other side and returns both, holding the GIL
(so no hand-off to another thread per SSL call). Handshakes, shutdown and every
decision stay here, on the same SSLObjects. OISP_NATIVE_TLS=0 keeps all TLS in
Python.

A TLS 1.2 renegotiation leaves a side unable to encrypt until its handshake
messages have been read: what arrives for it meanwhile waits in `unsent` (bounded)
and goes out, in order, after the side's next read.

Back-pressure: when a side's transport buffers more than its high-water mark,
the other side stops reading until it drains. End of stream (close_notify or
FIN) is passed on as close_notify + FIN; once one direction has ended, the
other gets `half_close_grace` seconds before both sockets are closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
from typing import Callable

try:
    from oisp._native import tls_relay
except ImportError as exc:  # a source tree without its compiled modules
    tls_relay, NATIVE_UNAVAILABLE = None, f"oisp._native.tls_relay not built ({exc})"
else:
    NATIVE_UNAVAILABLE = tls_relay.UNAVAILABLE

log = logging.getLogger(__name__)

if os.environ.get("OISP_NATIVE_TLS", "1") == "0":
    NATIVE_UNAVAILABLE = "OISP_NATIVE_TLS=0"
NATIVE_TLS = NATIVE_UNAVAILABLE is None  # the default for new Relays
if not NATIVE_TLS:
    log.info("relay: TLS records handled in Python: %s", NATIVE_UNAVAILABLE)

READ_SIZE = 1 << 16
UNSENT_MAX = 1 << 20  # plaintext held for a side mid-renegotiation before the relay gives up
HALF_CLOSE_GRACE = 5.0


async def within(future: asyncio.Future, timeout: float, what: str):
    """Await a future we own, failing it with TimeoutError after `timeout` seconds.
    (asyncio.wait_for costs extra event-loop passes per await: a few per connection.)"""
    def expire() -> None:
        if not future.done():
            future.set_exception(TimeoutError(f"{what}: no answer in {timeout:g} s"))

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await future
    finally:
        timer.cancel()


def _seen(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # so asyncio does not report it as never retrieved


class Side(asyncio.Protocol):
    """One socket of a relayed connection, plain or TLS (client or server side)."""

    def __init__(self, relay: Relay, name: str, context: ssl.SSLContext | None = None, *,
                 server_side: bool = False, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None):
        self.relay, self.name = relay, name
        self.transport: asyncio.Transport | None = None
        self.tls: ssl.SSLObject | None = None
        self.handshaken = asyncio.get_running_loop().create_future()
        if context is not None:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self._in, self._out, server_side=server_side,
                                        server_hostname=server_hostname, session=session)
        else:
            self.handshaken.set_result(None)
        self.native = None  # a tls_relay.Tls once handshaken, if the relay uses it
        self.ended = False  # no more data will come from this side
        self.finished = False  # our FIN is out: nothing more may be written
        self.unsent: list[bytes] = []  # plaintext for this side's TLS while it renegotiates
        self.lost = False

    # -- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self.relay.forward(self, data)
            return
        if self.native is not None:
            self._pump(data)
            return
        self._in.write(data)
        if not self.handshaken.done() and not self._handshake_step():
            return
        if self.handshaken.exception() is not None:
            return
        if self.native is not None:  # the handshake just ended; records may follow it
            self._pump(b"")
            return
        chunks, ended = [], False
        try:
            while chunk := self.tls.read(READ_SIZE):
                chunks.append(chunk)
            ended = True  # an empty read: close_notify
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True
        except ssl.SSLError as exc:
            self.relay.fail(self, exc)
            return
        self._flush()  # a read may have produced records to send back (key update, alerts)
        if self.unsent:
            self._retry_unsent()  # the read may have ended a renegotiation
        if chunks:
            # What arrived together leaves together: one TLS record and one send, not one
            # per record read (httpx and hypercorn write headers and body apart; each send
            # to the client also crosses the divert ring).
            self.relay.forward(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended:
            self.relay.end(self)

    def _pump(self, data: bytes) -> None:
        """The native path: decrypt what arrived and, when the peer takes it now over
        native TLS, re-encrypt it for the peer in the same call."""
        relay = self.relay
        peer = relay.peer(self) if relay.forwarding else None
        dst = peer.native if peer is not None and peer.writable() and not peer.unsent else None
        plain, back, out, status, error = tls_relay.pump(self.native, data, dst)
        if back is not None and self.writable():
            self.transport.write(back)  # e.g. a KeyUpdate's answer, a renegotiation's messages
        if status & tls_relay.SRC_FAILED:
            relay.fail(self, ssl.SSLError(error))
            return
        if plain is not None:
            if dst is None:
                relay.forward(self, plain)  # queued, to a plain or Python-TLS peer, or dropped
            else:
                if out is not None:
                    peer.transport.write(out)
                if status & tls_relay.DST_WAITS:
                    peer.hold(plain)
                relay.observe(self, plain)
        if status & tls_relay.DST_FAILED:
            relay.fail(peer, ssl.SSLError(error))
            return
        if self.unsent:
            self._retry_unsent()  # the read may have ended a renegotiation
        if status & tls_relay.ENDED:
            relay.end(self)

    def eof_received(self) -> bool:
        if not self.handshaken.done():
            self.handshaken.set_exception(ConnectionResetError(f"{self.name} closed during the TLS handshake"))
        self.relay.end(self)
        return True  # keep the socket: the other direction may still be flowing

    def connection_lost(self, exc) -> None:
        self.lost = True
        if not self.handshaken.done():
            self.handshaken.set_exception(exc or ConnectionResetError(f"{self.name} closed during the TLS handshake"))
        self.relay.side_lost(self)

    def pause_writing(self) -> None:
        self.relay.peer(self).pause_reading()

    def resume_writing(self) -> None:
        self.relay.peer(self).resume_reading()

    # -- used by the relay -------------------------------------------------------------
    async def handshake(self, timeout: float) -> None:
        if not self.handshaken.done():
            self._handshake_step()
        await within(self.handshaken, timeout, f"{self.name} TLS handshake")

    def _handshake_step(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ValueError, OSError) as exc:
            self._flush()  # the alert, so the peer learns why
            self.handshaken.set_exception(exc)
            return False
        self._flush()
        if self.relay.native_tls:
            self.native = tls_relay.handle(self.tls)
        self.relay.count("tls_native" if self.native is not None else "tls_python")
        self.handshaken.set_result(None)
        return True

    def writable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and not self.finished

    def send(self, data: bytes) -> None:
        if not self.writable():
            return
        if self.tls is None:
            self.transport.write(data)
            return
        if self.unsent:
            self.hold(data)  # behind what already waits
            return
        if self.native is not None:
            out, status, error = tls_relay.seal(self.native, data)
            if out is not None:
                self.transport.write(out)
            if status & tls_relay.DST_WAITS:
                self.hold(data)
            elif status & tls_relay.DST_FAILED:
                self.relay.fail(self, ssl.SSLError(error))
            return
        try:
            self.tls.write(data)
        except ssl.SSLWantReadError:
            self.hold(data)  # mid-renegotiation
        except ssl.SSLError as exc:
            self.relay.fail(self, exc)
            return
        self._flush()

    def hold(self, data: bytes) -> None:
        """Keep plaintext this side's TLS cannot take yet (it renegotiates), in order."""
        self.unsent.append(data)
        if sum(map(len, self.unsent)) > UNSENT_MAX:
            self.relay.fail(self, ssl.SSLError(f"{self.name}: renegotiation held back over {UNSENT_MAX} bytes"))

    def _retry_unsent(self) -> None:
        pending, self.unsent = self.unsent, []
        for i, data in enumerate(pending):
            self.send(data)
            if self.unsent:  # still waiting: the rest stays behind it
                self.unsent.extend(pending[i + 1:])
                return

    def finish(self) -> None:
        """No more data for this side: close_notify (TLS), then FIN."""
        if not self.writable():
            return
        if self.tls is not None and self.handshaken.done() and self.handshaken.exception() is None:
            try:
                self.tls.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLError, ValueError):
                pass  # close_notify is written; the peer's answer is not awaited
            self._flush()
        if self.transport.can_write_eof():
            self.finished = True  # e.g. a late KeyUpdate answer must not follow the FIN
            try:
                self.transport.write_eof()
            except OSError:
                pass

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self, abort: bool = False) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if not abort:
                self.transport.close()
                return
            # An abort is a reset, so the peer learns at once that the stream was cut (a
            # FIN could read as the end of a body that had none).
            sock = self.transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
            self.transport.abort()

    def _flush(self) -> None:
        if self._out.pending and self.writable():
            self.transport.write(self._out.read())


class Relay:
    """Two Sides joined: what one reads, the other writes. `done` resolves when both
    sockets are closed. `on_data(side_name, chunk)` sees every chunk after it is written.
    `native_tls`: handshaken TLS sides relay records in C (default: when available);
    `stats`, if given, counts TLS sides per path ("tls_native", "tls_python")."""

    def __init__(self, *, on_data: Callable[[str, bytes], None] | None = None,
                 half_close_grace: float = HALF_CLOSE_GRACE, native_tls: bool | None = None,
                 stats: dict | None = None):
        self.loop = asyncio.get_running_loop()
        self.on_data = on_data
        self.half_close_grace = half_close_grace
        self.native_tls = NATIVE_TLS if native_tls is None else native_tls and tls_relay is not None
        self.stats = stats
        self.sides: list[Side] = []
        self.done = self.loop.create_future()
        self._started = False
        self._pending: list[tuple[Side, bytes]] = []  # read before both sides were ready
        self._grace: asyncio.TimerHandle | None = None

    async def attach(self, name: str, sock, context: ssl.SSLContext | None = None, **tls) -> Side:
        """Hand a connected socket to the relay (the transport owns it from now on)."""
        side = Side(self, name, context, **tls)
        self.sides.append(side)
        await self.loop.connect_accepted_socket(lambda: side, sock=sock)
        return side

    def peer(self, side: Side) -> Side:
        return self.sides[1] if side is self.sides[0] else self.sides[0]

    @property
    def forwarding(self) -> bool:
        """Started with both sides: what is read is written to the peer at once."""
        return self._started and len(self.sides) == 2

    def count(self, key: str) -> None:
        if self.stats is not None:
            self.stats[key] = self.stats.get(key, 0) + 1

    def start(self) -> None:
        """Both sides are attached (and handshaken): forward what waited, and all that follows."""
        self._started = True
        pending, self._pending = self._pending, []
        for side, chunk in pending:
            self.forward(side, chunk)
        for side in self.sides:
            if side.ended:
                self.end(side, again=True)

    def forward(self, side: Side, chunk: bytes) -> None:
        if not self._started:
            self._pending.append((side, chunk))
            return
        self.peer(side).send(chunk)  # first: the client never waits for decoding
        self.observe(side, chunk)

    def observe(self, side: Side, chunk: bytes) -> None:
        """Hand a chunk, already written to the peer, to the observer."""
        if self.on_data is not None:
            try:
                self.on_data(side.name, chunk)
            except Exception:
                log.exception("relay observer failed")

    def end(self, side: Side, again: bool = False) -> None:
        """No more data from `side`."""
        if side.ended and not again:
            return
        side.ended = True
        if not self._started or len(self.sides) < 2:
            return
        self.peer(side).finish()
        if all(s.ended for s in self.sides):
            self.close()
        elif self._grace is None:
            self._grace = self.loop.call_later(self.half_close_grace, self.close)

    def fail(self, side: Side, exc: BaseException) -> None:
        log.debug("relay: %s failed: %s", side.name, exc)
        self.close(abort=True)

    def side_lost(self, side: Side) -> None:
        if all(s.lost for s in self.sides):
            if self._grace is not None:
                self._grace.cancel()
            if not self.done.done():
                self.done.set_result(None)
        else:
            self.close()  # the other side goes too, after writing what it holds

    def abandon(self) -> None:
        """Abort both sockets while a handshake may still be running: its outcome, now or
        when the abort reaches it, is nobody's concern any more."""
        for side in self.sides:
            side.handshaken.add_done_callback(_seen)
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        for side in self.sides:
            side.close(abort)
        if not self.sides and not self.done.done():
            self.done.set_result(None)
