"""Typed divert errors. Each one carries a `hint`: what to do about it.

Both backends' failures end up here: WinDivert's GetLastError() codes through
`from_winerror`, eBPFDivert's negative errno through `from_errno`.
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


REINSTALL = "reinstall pydivert (pip install --force-reinstall 'pydivert>=4.0.1'), then run `oisp check`"


def not_privileged(action: str) -> PrivilegeError:
    from oisp.divert.preflight import check_privileges

    problems = check_privileges()
    if problems:
        return PrivilegeError(f"{action}: " + "; ".join(p.message for p in problems), hint=problems[0].fix)
    return PrivilegeError(f"{action}: permission denied", hint="run as root (sudo) or as Administrator")


def from_winerror(code: int, action: str, *, filter: str | None = None, layer: int = 0) -> DivertError:
    """Map a WinDivert GetLastError() code to a typed error with a remedy."""
    if code == 87 and filter is not None:
        from oisp.divert.filter import compile_filter

        ok, pos, reason = compile_filter(filter, layer)
        if not ok:
            return InvalidFilterError(filter, pos, reason)
    table: dict[int, tuple[type[DivertError], str, str]] = {
        2: (BackendMissingError, "the WinDivert driver file (WinDivert64.sys) is missing", REINSTALL),
        5: (PrivilegeError, "access denied", "run from an elevated (Administrator) prompt"),
        87: (InvalidParameterError, "invalid parameter (layer, flags or priority)",
             "check the layer/flag combination: FLOW needs SNIFF|RECV_ONLY, SOCKET needs RECV_ONLY"),
        122: (BufferTooSmallError, "the packet does not fit the receive buffer", "use a buffer of at least 65575 bytes"),
        232: (HandleClosedError, "the handle was shut down", "open a new handle"),
        577: (DriverSignatureError, "Windows rejected the WinDivert driver signature",
              "Secure Boot/driver signing policy blocks it; check that WinDivert64.sys is the signed 2.2.2 file"),
        654: (IncompatibleDriverError, "an incompatible WinDivert driver is already loaded",
              "stop the program using another WinDivert version, then run `sc stop WinDivert` as Administrator"),
        1060: (DriverNotInstalledError, "the WinDivert service is not installed and NO_INSTALL was given",
               "open once without Flag.NO_INSTALL as Administrator"),
        1232: (DivertError, "an impostor packet's TTL expired (a reinjection loop)",
               "do not re-inject packets that match your own filter at the same priority"),
        1275: (DriverBlockedError, "Windows blocked the WinDivert driver",
               "an antivirus, Hyper-V/VBS setting or driver blocklist refuses it; allow WinDivert64.sys or try outside the VM"),
        1753: (BaseFilteringEngineError, "the Base Filtering Engine service is not running",
               "start it as Administrator: sc config BFE start= auto && sc start BFE"),
    }
    cls, message, hint = table.get(code, (DivertError, f"Windows error {code}", "see https://reqrypt.org/windivert-doc.html"))
    if cls is PrivilegeError:
        return not_privileged(action)
    return cls(f"{action}: {message}", hint=hint, winerror=code)


def from_errno(err: int, action: str, *, filter: str | None = None, layer: int = 0, reason: str = "") -> DivertError:
    """Map an eBPFDivert errno (positive) to a typed error with a remedy."""
    err = abs(err)
    detail = reason or _errno.errorcode.get(err, str(err))
    if err in (_errno.EPERM, _errno.EACCES):
        return not_privileged(action)
    if err == _errno.EINVAL and filter is not None:
        from oisp.divert.filter import compile_filter

        ok, pos, why = compile_filter(filter, layer)
        if not ok:
            return InvalidFilterError(filter, pos, why)
        return InvalidParameterError(f"{action}: invalid layer, flags or priority ({detail})",
                                     hint="FLOW needs SNIFF|RECV_ONLY, SOCKET needs RECV_ONLY; priority is -30000..30000",
                                     errno=err)
    if err == _errno.EOPNOTSUPP:
        return LayerNotSupportedError(
            f"{action}: not supported here ({detail})",
            hint="FLOW and SOCKET layers need cgroup v2 mounted at /sys/fs/cgroup (see `oisp check`)",
            errno=err,
        )
    if err in (_errno.ESHUTDOWN, _errno.EBADF):
        return HandleClosedError(f"{action}: the handle was shut down", hint="open a new handle", errno=err)
    if err in (_errno.EAGAIN, _errno.ETIMEDOUT):
        return DivertTimeoutError(f"{action}: timed out", errno=err)
    if err == _errno.ENOSPC:
        return BufferTooSmallError(f"{action}: the packet does not fit the receive buffer",
                                   hint="use a buffer of at least 65575 bytes", errno=err)
    if err == _errno.ENOENT:
        from oisp.divert.preflight import btf_available

        if not btf_available():
            return BTFMissingError(f"{action}: the kernel has no BTF",
                                   hint="use a kernel built with CONFIG_DEBUG_INFO_BTF=y (/sys/kernel/btf/vmlinux)",
                                   errno=err)
    return DivertError(f"{action}: {detail}", hint="run `oisp check` to see what is missing", errno=err)
