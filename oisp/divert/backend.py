"""The divert backends behind one interface.

`Backend` hides how the two libraries differ: function names and error
reporting (GetLastError vs negative errno). Batched receive and inject go
through `_native/divert_calls.h` (via oisp._native.ring), the one place that
knows the batch address-length argument is BYTES for WinDivertRecvEx/SendEx
(N × 80) and a COUNT for ebpfdivert_recv_ex/send_ex, and that does timed
receives (overlapped I/O on Windows). Callers always pass and get counts.

Packet and address buffers are any contiguous Python buffer (bytearray,
memoryview, numpy array).
"""

from __future__ import annotations

import errno as _errno
import functools
import os

import numpy as np

from oisp._native import ring  # compiled (Cython), no stubs: mypy takes it as Any
from oisp._native._divert_cffi import ffi
from oisp.divert import error_codes, errors
from oisp.divert.constants import MAX_BATCH, Layer, Shutdown
from oisp.divert.library import WINDOWS, LibraryLocation, load, locate

# Kernel-side counters of eBPFDivert (ebpfdivert_shared.h STAT_*), in order.
EBPF_STAT_NAMES = ("diverted", "dropped", "sniffed", "parsing_errors", "ringbuf_full", "queue_full", "too_big")

INFINITE = -1


def as_pointer(buf, ctype: str = "char[]"):
    """A cffi pointer to `buf`, which may already be one."""
    if isinstance(buf, ffi.CData):
        return buf
    return ffi.from_buffer(ctype, buf, require_writable=False)


def address_of(cdata) -> int:
    """A function or handle pointer as an integer, for the compiled ring."""
    return int(ffi.cast("uintptr_t", cdata))


def as_bytes(buf) -> memoryview:
    """A flat byte view of a packet buffer or an ADDRESS_DTYPE array."""
    if isinstance(buf, np.ndarray):
        return memoryview(buf.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # an ndarray is a buffer
    return memoryview(buf).cast("B")


class Backend:
    """One loaded divert library. Use `get_backend()`."""

    name = "abstract"

    def __init__(self, location: LibraryLocation):
        self.location = location
        self.lib = load(str(location.path))

    kind: int  # OISP_KIND_* in divert_calls.h
    recv_ex_fn: int  # address of the batched receive function
    send_ex_fn: int

    def invalid_filter(self, filter: str | None, layer: int = Layer.NETWORK) -> errors.InvalidFilterError | None:
        """The compiler's verdict on the filter of a failed call: the error naming the
        position, or None when the filter is fine (or there was none)."""
        if filter is None:
            return None
        ok, position, reason = self.compile_filter(filter, layer)
        return None if ok else errors.InvalidFilterError(filter, position, reason)

    # -- to implement -------------------------------------------------------------
    def version(self) -> str: ...
    def open(self, filter: str, layer: int, priority: int, flags: int): ...
    def error(self, code: int, action: str) -> errors.DivertError: ...
    def shutdown(self, handle, how: int = Shutdown.BOTH) -> None: ...
    def close(self, handle) -> None: ...
    def set_param(self, handle, param: int, value: int) -> None: ...
    def get_param(self, handle, param: int) -> int: ...
    def compile_filter(self, filter: str, layer: int = Layer.NETWORK) -> tuple[bool, int, str]: ...
    def format_filter(self, filter: str, layer: int = Layer.NETWORK) -> str: ...
    def eval_filter(self, filter: str, packet, length: int, addr) -> bool: ...
    def calc_checksums(self, packet, length: int, addr, flags: int = 0) -> bool: ...
    def hash_packet(self, packet, length: int, seed: int = 0) -> int: ...

    # -- shared -------------------------------------------------------------------
    def recv_ex(self, handle, buf, buf_len: int, addrs, max_addrs: int, timeout_ms: int = INFINITE) -> tuple[int, int]:
        """Receive up to `max_addrs` packets into the first `buf_len` bytes of `buf`: (bytes, count)."""
        self._check_batch(max_addrs)
        data = as_bytes(buf)[:buf_len]
        err, nbytes, count = ring.recv_batch(self.kind, self.recv_ex_fn, address_of(handle), data,
                                             as_bytes(addrs), max_addrs, timeout_ms)
        if err == ring.TIMEOUT:
            raise errors.DivertTimeoutError("receive: timed out")
        if err:
            raise self.error(err, "receive")
        return nbytes, count

    def send_ex(self, handle, buf, buf_len: int, addrs, count: int) -> int:
        """Inject `count` packets packed in the first `buf_len` bytes of `buf`: bytes sent."""
        self._check_batch(count)
        err, sent = ring.send_batch(self.kind, self.send_ex_fn, address_of(handle), as_bytes(buf), buf_len,
                                    as_bytes(addrs), count)
        if err:
            raise self.error(err, "inject")
        return sent

    def recv(self, handle, buf, buf_len: int, addr, timeout_ms: int = INFINITE) -> int:
        """One packet; a batch of one through recv_ex keeps a single code path."""
        nbytes, _ = self.recv_ex(handle, buf, buf_len, addr, 1, timeout_ms)
        return nbytes

    def send(self, handle, buf, buf_len: int, addr) -> int:
        return self.send_ex(handle, buf, buf_len, addr, 1)

    def event_fd(self, handle) -> int | None:
        """A pollable fd that is readable while packets wait (Linux only)."""
        return None

    def handle_stats(self, handle) -> dict[str, int]:
        """Kernel-side counters, where the backend has them."""
        return {}

    @staticmethod
    def _check_batch(count: int) -> None:
        if not 1 <= count <= MAX_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_BATCH} addresses, not {count}")


class EBPFDivertBackend(Backend):
    name = "ebpfdivert"
    kind = 0

    def __init__(self, location):
        super().__init__(location)
        self.recv_ex_fn = address_of(self.lib.ebpfdivert_recv_ex)
        self.send_ex_fn = address_of(self.lib.ebpfdivert_send_ex)

    def version(self) -> str:
        return ffi.string(self.lib.ebpfdivert_version()).decode()

    def _fail(self, ret: int, action: str, *, filter: str | None = None, layer: int = Layer.NETWORK
              ) -> errors.DivertError:
        reason = ffi.string(self.lib.ebpfdivert_strerror(ret)).decode(errors="replace")
        invalid = self.invalid_filter(filter, layer) if -ret == _errno.EINVAL else None
        return error_codes.from_errno(-ret, action, reason=reason, filtered=filter is not None, invalid_filter=invalid)

    def error(self, code, action):
        return self._fail(-abs(code), action)

    def open(self, filter: str, layer: int, priority: int, flags: int):
        ffi.errno = 0
        handle = self.lib.ebpfdivert_open(filter.encode(), int(layer), int(priority), int(flags), ffi.NULL)
        if handle == ffi.NULL:
            err = ffi.errno or _errno.EIO
            invalid = self.invalid_filter(filter, int(layer)) if err == _errno.EINVAL else None
            raise error_codes.from_errno(err, "cannot open divert handle", filtered=True, invalid_filter=invalid)
        return handle

    def shutdown(self, handle, how=Shutdown.BOTH):
        ret = self.lib.ebpfdivert_shutdown(handle, int(how))
        if ret < 0:
            raise self._fail(ret, "shutdown")

    def close(self, handle):
        ret = self.lib.ebpfdivert_close(handle)
        if ret < 0:
            raise self._fail(ret, "close")

    def set_param(self, handle, param, value):
        ret = self.lib.ebpfdivert_set_param(handle, int(param), int(value))
        if ret < 0:
            raise self._fail(ret, f"set parameter {param}")

    def get_param(self, handle, param):
        value = ffi.new("uint64_t *")
        ret = self.lib.ebpfdivert_get_param(handle, int(param), value)
        if ret < 0:
            raise self._fail(ret, f"get parameter {param}")
        return value[0]

    def compile_filter(self, filter, layer=Layer.NETWORK):
        message = ffi.new("const char **")
        position = ffi.new("uint32_t *")
        ret = self.lib.ebpfdivert_helper_compile_filter(filter.encode(), int(layer), message, position)
        if ret >= 0:
            return True, 0, ""
        reason = ffi.string(message[0]).decode() if message[0] != ffi.NULL else os.strerror(-ret)
        return False, position[0], reason

    def format_filter(self, filter, layer=Layer.NETWORK):
        out = ffi.new("char[]", 4 * len(filter) + 256)
        ret = self.lib.ebpfdivert_helper_format_filter(filter.encode(), int(layer), out, len(out))
        if ret < 0:
            raise self._fail(ret, "format filter", filter=filter, layer=int(layer))
        return ffi.string(out).decode()

    def eval_filter(self, filter, packet, length, addr):
        ret = self.lib.ebpfdivert_helper_eval_filter(filter.encode(), as_pointer(packet), length,
                                                     as_pointer(addr, "WINDIVERT_ADDRESS[]"))
        if ret == -_errno.EINVAL:
            raise ValueError("the backend cannot evaluate this packet: it does not parse, or the "
                             "address's IPv6 bit disagrees with the IP version")
        if ret < 0:
            raise self._fail(ret, "evaluate filter", filter=filter)
        return ret > 0

    def calc_checksums(self, packet, length, addr, flags=0):
        address = ffi.NULL if addr is None else as_pointer(addr, "WINDIVERT_ADDRESS[]")
        return self.lib.ebpfdivert_helper_calc_checksums(as_pointer(packet), length, address, flags) >= 0

    def hash_packet(self, packet, length, seed=0):
        return self.lib.ebpfdivert_helper_hash_packet(as_pointer(packet), length, seed)

    def event_fd(self, handle):
        fd = self.lib.ebpfdivert_get_event_fd(handle)
        return fd if fd >= 0 else None

    def handle_stats(self, handle):
        values = ffi.new("uint64_t[]", len(EBPF_STAT_NAMES))
        n = self.lib.ebpfdivert_get_handle_stats(handle, values, len(EBPF_STAT_NAMES))
        return {EBPF_STAT_NAMES[i]: values[i] for i in range(max(0, n))}


class WinDivertBackend(Backend):
    """WinDivert 2.2: BOOL returns with GetLastError, lengths in bytes."""

    name = "windivert"
    kind = 1

    def __init__(self, location):
        super().__init__(location)
        self.recv_ex_fn = address_of(self.lib.WinDivertRecvEx)
        self.send_ex_fn = address_of(self.lib.WinDivertSendEx)

    def version(self) -> str:
        return "2.2"  # WinDivert reports its version only through an open handle (Param 3/4)

    def _fail(self, action: str, *, filter: str | None = None, layer: int = Layer.NETWORK) -> errors.DivertError:
        code, _ = ffi.getwinerror()  # first: any later call may overwrite the thread's last error
        invalid = self.invalid_filter(filter, layer) if code == 87 else None
        return error_codes.from_winerror(code, action, invalid_filter=invalid)

    def error(self, code, action):
        return error_codes.from_winerror(code, action)

    def open(self, filter, layer, priority, flags):
        handle = self.lib.WinDivertOpen(filter.encode(), int(layer), int(priority), int(flags))
        if handle == ffi.NULL or int(ffi.cast("intptr_t", handle)) == -1:
            raise self._fail("cannot open divert handle", filter=filter, layer=int(layer))
        return handle

    def shutdown(self, handle, how=Shutdown.BOTH):
        if not self.lib.WinDivertShutdown(handle, int(how)):
            raise self._fail("shutdown")

    def close(self, handle):
        if not self.lib.WinDivertClose(handle):
            raise self._fail("close")

    def set_param(self, handle, param, value):
        if not self.lib.WinDivertSetParam(handle, int(param), int(value)):
            raise self._fail(f"set parameter {param}")

    def get_param(self, handle, param):
        value = ffi.new("uint64_t *")
        if not self.lib.WinDivertGetParam(handle, int(param), value):
            raise self._fail(f"get parameter {param}")
        return value[0]

    def compile_filter(self, filter, layer=Layer.NETWORK):
        message = ffi.new("const char **")
        position = ffi.new("unsigned int *")
        if self.lib.WinDivertHelperCompileFilter(filter.encode(), int(layer), ffi.NULL, 0, message, position):
            return True, 0, ""
        reason = ffi.string(message[0]).decode() if message[0] != ffi.NULL else "invalid filter"
        return False, position[0], reason

    def format_filter(self, filter, layer=Layer.NETWORK):
        out = ffi.new("char[]", 4 * len(filter) + 256)
        if not self.lib.WinDivertHelperFormatFilter(filter.encode(), int(layer), out, len(out)):
            raise self._fail("format filter", filter=filter, layer=int(layer))
        return ffi.string(out).decode()

    def eval_filter(self, filter, packet, length, addr):
        return bool(self.lib.WinDivertHelperEvalFilter(filter.encode(), as_pointer(packet), length,
                                                        as_pointer(addr, "WINDIVERT_ADDRESS[]")))

    def calc_checksums(self, packet, length, addr, flags=0):
        address = ffi.NULL if addr is None else as_pointer(addr, "WINDIVERT_ADDRESS[]")
        return bool(self.lib.WinDivertHelperCalcChecksums(as_pointer(packet), length, address, flags))

    def hash_packet(self, packet, length, seed=0):
        return self.lib.WinDivertHelperHashPacket(as_pointer(packet), length, seed)


@functools.lru_cache(maxsize=1)
def get_backend() -> Backend:
    """The backend for this platform, loaded from the installed pydivert."""
    location = locate()
    return (WinDivertBackend if WINDOWS else EBPFDivertBackend)(location)
