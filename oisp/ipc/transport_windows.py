"""The IPC on Windows: a named pipe, \\\\.\\pipe\\oisp-…, written to the documented Win32
API with ctypes. NEVER RUN HERE (this project's machines are Linux): it is the seam's
other side, kept to the same Link contract as oisp.ipc.serve_unix, and must be run on
Windows before it is relied on.

Security, in the order the kernel and we apply it:
- the pipe is created with an explicit, protected DACL (SDDL
  "D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GRGW;;;<allowed user's SID>)"): LocalSystem and
  Administrators full control, the allowed user read/write, nobody else anything;
  the default DACL would give Everyone read access;
- FILE_FLAG_FIRST_PIPE_INSTANCE: if another process already created a pipe of this
  name (squatting it to impersonate the redirector), creating ours fails instead of
  silently joining theirs;
- PIPE_REJECT_REMOTE_CLIENTS: no SMB clients;
- each client's process is found with GetNamedPipeClientProcessId and its token's user
  SID is checked against the AccessPolicy (AccessPolicy.sids) before any byte is read.

I/O: the pipe handles are overlapped, so one thread may wait in ReadFile while another
writes (a synchronous handle serialises them: a pending read would block every answer).
One thread waits for connections, one per client reads, one per client writes from a
queue; session calls are made under the server's lock. The client side uses asyncio's
ProactorEventLoop (loop.create_pipe_connection, the default loop on Windows) and asks
GetNamedPipeServerProcessId who serves the pipe.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import queue
import re
import threading
import time
from ctypes import wintypes

from oisp.ipc.transport import Peer

log = logging.getLogger(__name__)

PIPE_ACCESS_DUPLEX = 0x00000003
FILE_FLAG_OVERLAPPED = 0x40000000
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
PIPE_TYPE_BYTE, PIPE_READMODE_BYTE, PIPE_WAIT = 0x0, 0x0, 0x0
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
PIPE_UNLIMITED_INSTANCES = 255
BUFFER = 65536
ERROR_IO_PENDING, ERROR_PIPE_CONNECTED, ERROR_BROKEN_PIPE, ERROR_MORE_DATA = 997, 535, 109, 234
WAIT_OBJECT_0, INFINITE = 0, 0xFFFFFFFF
PROCESS_QUERY_LIMITED_INFORMATION, TOKEN_QUERY, TOKEN_USER_CLASS = 0x1000, 0x0008, 1
SDDL_REVISION_1 = 1
INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value


class SECURITY_ATTRIBUTES(ctypes.Structure):
    _fields_ = [("nLength", wintypes.DWORD), ("lpSecurityDescriptor", wintypes.LPVOID),
                ("bInheritHandle", wintypes.BOOL)]


class OVERLAPPED(ctypes.Structure):
    _fields_ = [("Internal", ctypes.c_void_p), ("InternalHigh", ctypes.c_void_p), ("Offset", wintypes.DWORD),
                ("OffsetHigh", wintypes.DWORD), ("hEvent", wintypes.HANDLE)]


@functools.lru_cache(maxsize=1)
def _api():
    k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    adv = ctypes.WinDLL("advapi32", use_last_error=True)
    k32.CreateNamedPipeW.restype = wintypes.HANDLE
    k32.CreateNamedPipeW.argtypes = [wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD, wintypes.DWORD,
                                     wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, ctypes.POINTER(SECURITY_ATTRIBUTES)]
    k32.CreateEventW.restype = wintypes.HANDLE
    k32.CreateEventW.argtypes = [wintypes.LPVOID, wintypes.BOOL, wintypes.BOOL, wintypes.LPCWSTR]
    for name in ("ConnectNamedPipe", "ReadFile", "WriteFile"):
        getattr(k32, name).restype = wintypes.BOOL
    k32.ConnectNamedPipe.argtypes = [wintypes.HANDLE, ctypes.POINTER(OVERLAPPED)]
    k32.ReadFile.argtypes = [wintypes.HANDLE, wintypes.LPVOID, wintypes.DWORD, ctypes.POINTER(wintypes.DWORD),
                             ctypes.POINTER(OVERLAPPED)]
    k32.WriteFile.argtypes = [wintypes.HANDLE, wintypes.LPCVOID, wintypes.DWORD, ctypes.POINTER(wintypes.DWORD),
                              ctypes.POINTER(OVERLAPPED)]
    k32.GetOverlappedResult.argtypes = [wintypes.HANDLE, ctypes.POINTER(OVERLAPPED), ctypes.POINTER(wintypes.DWORD),
                                        wintypes.BOOL]
    k32.GetOverlappedResult.restype = wintypes.BOOL
    k32.WaitForMultipleObjects.argtypes = [wintypes.DWORD, ctypes.POINTER(wintypes.HANDLE), wintypes.BOOL,
                                           wintypes.DWORD]
    k32.WaitForMultipleObjects.restype = wintypes.DWORD
    k32.GetNamedPipeClientProcessId.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.ULONG)]
    k32.GetNamedPipeServerProcessId.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.ULONG)]
    k32.OpenProcess.restype = wintypes.HANDLE
    k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    for name in ("SetEvent", "ResetEvent", "DisconnectNamedPipe", "CloseHandle", "FlushFileBuffers"):
        getattr(k32, name).restype = wintypes.BOOL
        getattr(k32, name).argtypes = [wintypes.HANDLE]  # never the default int: handles are 64-bit
    k32.CancelIoEx.restype = wintypes.BOOL
    k32.CancelIoEx.argtypes = [wintypes.HANDLE, ctypes.POINTER(OVERLAPPED)]
    k32.GetNamedPipeClientProcessId.restype = k32.GetNamedPipeServerProcessId.restype = wintypes.BOOL
    k32.LocalFree.restype = wintypes.HLOCAL
    k32.LocalFree.argtypes = [wintypes.HLOCAL]
    adv.ConvertStringSecurityDescriptorToSecurityDescriptorW.argtypes = [
        wintypes.LPCWSTR, wintypes.DWORD, ctypes.POINTER(wintypes.LPVOID), ctypes.POINTER(wintypes.ULONG)]
    adv.OpenProcessToken.argtypes = [wintypes.HANDLE, wintypes.DWORD, ctypes.POINTER(wintypes.HANDLE)]
    adv.GetTokenInformation.argtypes = [wintypes.HANDLE, ctypes.c_int, wintypes.LPVOID, wintypes.DWORD,
                                        ctypes.POINTER(wintypes.DWORD)]
    adv.ConvertSidToStringSidW.argtypes = [wintypes.LPVOID, ctypes.POINTER(wintypes.LPWSTR)]
    return k32, adv


def _fail(what: str) -> OSError:
    code = ctypes.get_last_error()
    return OSError(code, f"{what} failed: {ctypes.FormatError(code)}")  # type: ignore[attr-defined]


def process_sid(pid: int) -> str | None:
    """The user SID of process `pid`'s primary token, or None if it cannot be read."""
    k32, adv = _api()
    process = k32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not process:
        return None
    token = wintypes.HANDLE()
    try:
        if not adv.OpenProcessToken(process, TOKEN_QUERY, ctypes.byref(token)):
            return None
        try:
            size = wintypes.DWORD()
            adv.GetTokenInformation(token, TOKEN_USER_CLASS, None, 0, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            if not adv.GetTokenInformation(token, TOKEN_USER_CLASS, buf, size, ctypes.byref(size)):
                return None
            psid = ctypes.cast(buf, ctypes.POINTER(wintypes.LPVOID))[0]  # TOKEN_USER.User.Sid comes first
            text = wintypes.LPWSTR()
            if not adv.ConvertSidToStringSidW(psid, ctypes.byref(text)):
                return None
            try:
                return text.value
            finally:
                k32.LocalFree(text)
        finally:
            k32.CloseHandle(token)
    finally:
        k32.CloseHandle(process)


def pipe_sddl(allowed_sids) -> str:
    """The pipe's DACL: protected (P: nothing inherited), full control (GA) for LocalSystem
    (SY) and Administrators (BA), read and write (GRGW) for each allowed SID, nothing for
    anyone else. A SID that is not one (an SDDL injection such as ")(A;;GA;;;WD") is refused."""
    sids = sorted(allowed_sids)
    if not sids:
        raise ValueError("no user may connect: name the allowed SID")
    for sid in sids:
        if not _SID.fullmatch(sid):
            raise ValueError(f"not a SID: {sid!r}")
    return "D:P(A;;GA;;;SY)(A;;GA;;;BA)" + "".join(f"(A;;GRGW;;;{sid})" for sid in sids)


_SID = re.compile(r"S-1-\d+(-\d+)+")


def _security_attributes(allowed_sids) -> tuple[SECURITY_ATTRIBUTES, wintypes.LPVOID]:
    _, adv = _api()
    sddl = pipe_sddl(allowed_sids)
    descriptor = wintypes.LPVOID()
    if not adv.ConvertStringSecurityDescriptorToSecurityDescriptorW(sddl, SDDL_REVISION_1, ctypes.byref(descriptor),
                                                                    None):
        raise _fail("ConvertStringSecurityDescriptorToSecurityDescriptorW")
    attributes = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), descriptor.value, False)
    return attributes, descriptor  # the descriptor is LocalFree-d when the loop stops


class _Overlapped:
    """An OVERLAPPED with its own manual-reset event, for one kind of operation on a handle."""

    def __init__(self, k32):
        self.k32 = k32
        self.ov = OVERLAPPED()
        self.ov.hEvent = k32.CreateEventW(None, True, False, None)
        if not self.ov.hEvent:
            raise _fail("CreateEventW")

    def result(self, handle, started: bool, what: str) -> int:
        """Wait for the operation `started` (the call's return) began, and its byte count."""
        if not started and ctypes.get_last_error() not in (ERROR_IO_PENDING, ERROR_MORE_DATA):
            raise _fail(what)
        done = wintypes.DWORD()
        if (not self.k32.GetOverlappedResult(handle, ctypes.byref(self.ov), ctypes.byref(done), True)
                and ctypes.get_last_error() != ERROR_MORE_DATA):
            raise _fail(what)
        return done.value

    def close(self) -> None:
        self.k32.CloseHandle(self.ov.hEvent)


class _PipeLink:
    def __init__(self, loop: PipeLoop, handle, peer: Peer | None):
        self.loop, self.handle, self.peer = loop, handle, peer
        self.session = None
        self.gone = False
        self._queue: queue.Queue = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        # Threads using the handle (the writer, and the reader once started): the last to
        # finish closes it, so no thread ever waits on a handle another has closed.
        self._users = 1

    def start_reader(self) -> None:
        with self._lock:
            self._users += 1
        threading.Thread(target=self.reader, name="oisp-ipc-read", daemon=True).start()

    def _done_with_handle(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.loop.k32.CloseHandle(self.handle)
            self.loop.links.discard(self)

    def write(self, data: bytes) -> None:
        if self.gone:
            return
        with self._lock:
            self._queued += len(data)
        self._queue.put(data)

    def unsent(self) -> int:
        return self._queued

    def close(self, abort: bool = False) -> None:
        if self.gone:
            return
        self.gone = True
        self._queue.put(None if not abort else b"")  # the writer drains (or not), then disconnects
        if abort:
            self.loop.k32.CancelIoEx(self.handle, None)  # every pending read and write on it ends now
        if self.session is not None:
            self.session.closed()

    def reader(self) -> None:
        k32, ov = self.loop.k32, _Overlapped(self.loop.k32)
        buf = ctypes.create_string_buffer(BUFFER)
        try:
            while not self.gone:
                started = k32.ReadFile(self.handle, buf, BUFFER, None, ctypes.byref(ov.ov))
                n = ov.result(self.handle, started, "ReadFile")
                if n == 0:
                    break
                with self.loop.server.lock:
                    if self.session is not None and not self.gone:
                        self.session.received(buf.raw[:n], time.monotonic())
        except OSError as e:
            if e.errno != ERROR_BROKEN_PIPE:
                log.debug("IPC pipe read: %s", e)
        finally:
            ov.close()
            with self.loop.server.lock:
                self.close(abort=True)
            self._done_with_handle()

    def writer(self) -> None:
        k32, ov = self.loop.k32, _Overlapped(self.loop.k32)
        try:
            while True:
                data = self._queue.get()
                if data is None:  # a close: what was queued before it is written
                    k32.FlushFileBuffers(self.handle)
                    break
                if data == b"":  # an abort
                    break
                with self._lock:
                    self._queued -= len(data)
                view = memoryview(data)
                while view:
                    started = k32.WriteFile(self.handle, bytes(view), len(view), None, ctypes.byref(ov.ov))
                    view = view[ov.result(self.handle, started, "WriteFile"):]
        except OSError as e:
            log.debug("IPC pipe write: %s", e)
        finally:
            ov.close()
            k32.DisconnectNamedPipe(self.handle)  # the reader's pending ReadFile fails: it ends too
            self._done_with_handle()


class PipeLoop:
    """The server's I/O on Windows (the same role as serve_unix.UnixLoop)."""

    def __init__(self, server):
        self.server = server
        self.k32, self.adv = _api()
        self.links: set[_PipeLink] = set()
        self._stop_event = None
        self._thread: threading.Thread | None = None
        self._calls: queue.Queue = queue.Queue()

    def start(self) -> None:
        policy = self.server.policy
        if not policy.sids:
            raise ValueError("on Windows the IPC's AccessPolicy names the allowed user by SID (AccessPolicy.sids)")
        self._attributes, self._descriptor = _security_attributes(policy.sids)
        self._stop_event = self.k32.CreateEventW(None, True, False, None)
        first = self._instance(first=True)  # fails if another process holds the name
        self._thread = threading.Thread(target=self._accept_loop, args=(first,), name="oisp-ipc", daemon=True)
        self._thread.start()
        threading.Thread(target=self._timers_and_calls, name="oisp-ipc-calls", daemon=True).start()

    def _instance(self, first: bool = False):
        handle = self.k32.CreateNamedPipeW(
            self.server.address,
            PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED | (FILE_FLAG_FIRST_PIPE_INSTANCE if first else 0),
            PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
            PIPE_UNLIMITED_INSTANCES, BUFFER, BUFFER, 0, ctypes.byref(self._attributes))
        if handle == INVALID_HANDLE_VALUE or not handle:
            raise _fail(f"CreateNamedPipeW({self.server.address})")
        return handle

    def call_soon(self, fn) -> None:
        self._calls.put(fn)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self.k32.SetEvent(self._stop_event)
        self._calls.put(None)
        self._thread.join(timeout)
        with self.server.lock:
            self.server.goodbye_all()
            for link in list(self.links):
                link.close()
        self.k32.LocalFree(self._descriptor)

    def _accept_loop(self, handle) -> None:
        ov = _Overlapped(self.k32)
        waits = (wintypes.HANDLE * 2)(ov.ov.hEvent, self._stop_event)
        try:
            while True:
                connected = self.k32.ConnectNamedPipe(handle, ctypes.byref(ov.ov))
                error = ctypes.get_last_error()
                if not connected and error == ERROR_IO_PENDING:
                    if self.k32.WaitForMultipleObjects(2, waits, False, INFINITE) != WAIT_OBJECT_0:
                        self.k32.CancelIoEx(handle, ctypes.byref(ov.ov))
                        self.k32.CloseHandle(handle)
                        return  # stopping
                elif not connected and error != ERROR_PIPE_CONNECTED:
                    raise _fail("ConnectNamedPipe")
                self._accepted(handle)
                self.k32.ResetEvent(ov.ov.hEvent)
                handle = self._instance()
        except OSError:
            log.exception("IPC pipe server stopped")
        finally:
            ov.close()

    def _accepted(self, handle) -> None:
        pid = wintypes.ULONG()
        peer = None
        if self.k32.GetNamedPipeClientProcessId(handle, ctypes.byref(pid)):
            peer = Peer(pid=pid.value, sid=process_sid(pid.value))
        link = _PipeLink(self, handle, peer)
        self.links.add(link)
        threading.Thread(target=link.writer, name="oisp-ipc-write", daemon=True).start()
        with self.server.lock:
            link.session = self.server.open(link, time.monotonic())
        if link.session is not None:
            link.start_reader()

    def _timers_and_calls(self) -> None:
        """Deadlines every 50 ms, and the calls other threads schedule."""
        while True:
            try:
                fn = self._calls.get(timeout=0.05)
            except queue.Empty:
                fn = False
            if fn is None:
                return
            with self.server.lock:
                if fn:
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - one failing call must not stop the loop
                        log.exception("IPC: a scheduled call failed")
                now = time.monotonic()
                for link in list(self.links):
                    session = link.session
                    if session is not None and session.deadline is not None and session.deadline <= now:
                        session.expire()


async def open_connection(loop, address: str, protocol_factory):
    """The client's side (ProactorEventLoop): the transport, the protocol and who serves."""
    transport, protocol = await loop.create_pipe_connection(protocol_factory, address)
    k32, _ = _api()
    pipe = transport.get_extra_info("pipe")
    pid = wintypes.ULONG()
    server_pid = pid.value if k32.GetNamedPipeServerProcessId(pipe.handle, ctypes.byref(pid)) else 0
    return transport, protocol, Peer(pid=server_pid, sid=process_sid(server_pid) if server_pid else None)
