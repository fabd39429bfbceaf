"""Typed divert errors. Each one carries a `hint`: what to do about it.

A leaf: exception classes only. Which OS error code becomes which class is
decided in `oisp.divert.error_codes`, next to the backend.
"""

from __future__ import annotations

import errno as _errno


class DivertError(OSError):
    """Base class: `str(e)` is the problem followed by what to do about it."""

    def __init__(self, message: str, *, hint: str = "", errno: int | None = None, winerror: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.errno = errno
        self.code = winerror if winerror is not None else errno

    def __str__(self) -> str:
        return f"{self.message}. {self.hint}" if self.hint else self.message


class PrivilegeError(DivertError, PermissionError):
    """Not Administrator/root, or (Linux) a capability the backend needs is missing."""


class BTFMissingError(DivertError):
    """The Linux kernel has no BTF (/sys/kernel/btf/vmlinux), which eBPFDivert needs."""


class BackendMissingError(DivertError):
    """The divert library or driver file is not there (WinDivert error 2)."""


class DriverSignatureError(DivertError):
    """WinDivert error 577: Windows rejected the driver's signature."""


class IncompatibleDriverError(DivertError):
    """WinDivert error 654: another WinDivert version's driver is loaded."""


class DriverNotInstalledError(DivertError):
    """WinDivert error 1060: NO_INSTALL was given and the driver is not installed."""


class DriverBlockedError(DivertError):
    """WinDivert error 1275: the driver was blocked (antivirus, VM, policy)."""


class BaseFilteringEngineError(DivertError):
    """WinDivert error 1753: the Base Filtering Engine service is not running."""


class InvalidFilterError(DivertError, ValueError):
    """WinDivert error 87 for a filter: carries the position and the compiler's message."""

    def __init__(self, filter: str, position: int, reason: str):
        super().__init__(
            f"invalid filter at position {position}: {reason}",
            hint="fix the filter (WinDivert filter language: https://reqrypt.org/windivert-doc.html#filter_language)",
            errno=_errno.EINVAL,
            winerror=87,
        )
        self.filter = filter
        self.position = position
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.message}\n  {self.filter}\n  {' ' * self.position}^\n{self.hint}"


class InvalidParameterError(DivertError, ValueError):
    """WinDivert error 87 for something other than the filter: layer, flags or priority."""


class LayerNotSupportedError(DivertError):
    """The backend cannot open this layer here (Linux FLOW/SOCKET without cgroup v2)."""


class HandleClosedError(DivertError):
    """The handle was shut down or closed (WinDivert 232, ESHUTDOWN/EBADF)."""


class BufferTooSmallError(DivertError):
    """WinDivert error 122: the receive buffer cannot hold the next packet."""


class DivertTimeoutError(DivertError, TimeoutError):
    """No packet arrived before the timeout."""


class EngineStalled(DivertError):
    """The consumer stopped returning slots; the handle was closed so traffic flows."""


class GuardianLost(DivertError):
    """The handle's guardian died; the handle was closed so traffic flows (a kill of this
    process would otherwise leave its filters black-holing traffic)."""
