"""The IPC server's I/O on POSIX: one thread, a selectors loop over the listening Unix
socket, its clients and a wake-up socket, feeding oisp.ipc.server's sessions.

Non-blocking throughout: a client that does not read has its answers queued (up to
the server's max_unsent, then it is cut), never waited for. Other threads reach the
loop only through call_soon (a queue and one byte on the wake-up socket), so the
selector and the sockets are touched by this thread alone.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from pathlib import Path

from oisp.ipc.transport import Peer, listen_unix, peer_credentials

log = logging.getLogger(__name__)

READ_SIZE = 65536 + 4


class _UnixLink:
    def __init__(self, loop: UnixLoop, sock: socket.socket, peer: Peer | None):
        self.loop, self.sock, self.peer = loop, sock, peer
        self.out = bytearray()
        self.session = None
        self.gone = False

    def write(self, data: bytes) -> None:
        if self.gone:
            return
        if not self.out:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close(abort=True)
                return
            data = data[sent:]
            if not data:
                return
            self.loop.selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)
        self.out += data

    def unsent(self) -> int:
        return len(self.out)

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self.close(abort=True)
            return
        del self.out[:sent]
        if not self.out:
            self.loop.selector.modify(self.sock, selectors.EVENT_READ, self)

    def close(self, abort: bool = False) -> None:
        """Close now; what is queued gets one last non-blocking try unless aborted (an
        error sent before closing arrives unless the client stopped reading)."""
        if self.gone:
            return
        self.gone = True
        if self.out and not abort:
            try:
                self.sock.send(self.out)
            except OSError:
                pass
        self.out.clear()
        self.loop.forget(self)


class UnixLoop:
    def __init__(self, server):
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.links: set[_UnixLink] = set()
        self._calls: deque = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._listener: socket.socket | None = None
        self._inode = None

    def start(self) -> None:
        uid, gid = self.server.owner
        try:
            self._listener = listen_unix(self.server.address, uid=uid, gid=gid)
        except BaseException:
            self.selector.close()
            raise
        self._inode = os.stat(self.server.address).st_ino
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._listener, selectors.EVENT_READ, "accept")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="oisp-ipc", daemon=True)
        self._thread.start()

    def call_soon(self, fn) -> None:
        """Run fn() on the loop's thread, under the server's lock (from any thread)."""
        self._calls.append(fn)
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the loop has wake-ups pending already
        except OSError:
            pass  # stopped

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self.call_soon(lambda: None)
        self._thread.join(timeout)

    def forget(self, link: _UnixLink) -> None:
        self.links.discard(link)
        try:
            self.selector.unregister(link.sock)
        except (KeyError, ValueError):
            pass
        link.sock.close()
        if link.session is not None:
            link.session.closed()

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        server = self.server
        try:
            while not self._stopping:
                for key, events in self.selector.select(self._timeout()):
                    with server.lock:
                        self._event(key, events)
                now = time.monotonic()
                with server.lock:
                    for link in list(self.links):
                        session = link.session
                        if session is not None and session.deadline is not None and session.deadline <= now:
                            session.expire()
        except Exception:  # noqa: BLE001 - the redirector carries on without its IPC; logged
            log.exception("IPC server loop failed")
        finally:
            with server.lock:
                self._run_calls()
                server.goodbye_all()
                for link in list(self.links):
                    link.close()
            self._close_listener()

    def _timeout(self) -> float | None:
        deadlines = [link.session.deadline for link in self.links
                     if link.session is not None and link.session.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _event(self, key, events: int) -> None:
        what = key.data
        if what == "accept":
            self._accept()
        elif what == "wake":
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
            self._run_calls()
        else:
            link: _UnixLink = what
            if events & selectors.EVENT_WRITE and not link.gone:
                link.flush()
            if events & selectors.EVENT_READ and not link.gone:
                self._read(link)

    def _run_calls(self) -> None:
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:  # noqa: BLE001 - one failing call must not stop the loop
                log.exception("IPC: a scheduled call failed")

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of descriptors: the client waits in the backlog
            log.warning("IPC: accept failed: %s", e)
            return
        sock.setblocking(False)
        try:
            peer = peer_credentials(sock)
        except OSError:
            peer = None
        link = _UnixLink(self, sock, peer)
        self.links.add(link)
        self.selector.register(sock, selectors.EVENT_READ, link)
        link.session = self.server.open(link, time.monotonic())

    def _read(self, link: _UnixLink) -> None:
        try:
            data = link.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            link.close(abort=True)
            return
        if link.session is not None:
            link.session.received(data, time.monotonic())

    def _close_listener(self) -> None:
        """Stop listening and remove the socket's name, unless a newer server has put its
        own socket there since (its inode differs)."""
        path = Path(self.server.address)
        try:
            if os.lstat(path).st_ino == self._inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self.selector.close()
