"""From a backend's failure code to a typed error with a remedy.

WinDivert's GetLastError() codes go through `from_winerror`, eBPFDivert's
errno through `from_errno`. A bad filter is diagnosed by the caller (the
backend, which has the compiler) and passed in as `invalid_filter`, so this
module needs nothing of the backend.
"""

from __future__ import annotations

import errno as _errno

from oisp.divert.errors import (BackendMissingError, BaseFilteringEngineError, BTFMissingError, BufferTooSmallError,
                                DivertError, DivertTimeoutError, DriverBlockedError, DriverNotInstalledError,
                                DriverSignatureError, HandleClosedError, IncompatibleDriverError,
                                InvalidFilterError, InvalidParameterError, LayerNotSupportedError, PrivilegeError)
from oisp.divert.preflight import btf_available, check_privileges

REINSTALL = "reinstall pydivert (pip install --force-reinstall 'pydivert>=4.0.1'), then run `oisp check`"


def not_privileged(action: str) -> PrivilegeError:
    problems = check_privileges()
    if problems:
        return PrivilegeError(f"{action}: " + "; ".join(p.message for p in problems), hint=problems[0].fix)
    return PrivilegeError(f"{action}: permission denied", hint="run as root (sudo) or as Administrator")


def from_winerror(code: int, action: str, *, invalid_filter: InvalidFilterError | None = None) -> DivertError:
    """Map a WinDivert GetLastError() code to a typed error with a remedy. `invalid_filter`:
    the compiler's verdict on the filter of the failed call, when there was one."""
    if code == 87 and invalid_filter is not None:
        return invalid_filter
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


def from_errno(err: int, action: str, *, invalid_filter: InvalidFilterError | None = None, filtered: bool = False,
               reason: str = "") -> DivertError:
    """Map an eBPFDivert errno (positive) to a typed error with a remedy. `filtered`: the
    failed call took a filter; `invalid_filter`: the compiler's verdict on it, if bad."""
    err = abs(err)
    detail = reason or _errno.errorcode.get(err, str(err))
    if err in (_errno.EPERM, _errno.EACCES):
        return not_privileged(action)
    if err == _errno.EINVAL and (filtered or invalid_filter is not None):
        if invalid_filter is not None:
            return invalid_filter
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
    if err == _errno.ENOENT and not btf_available():
        return BTFMissingError(f"{action}: the kernel has no BTF",
                               hint="use a kernel built with CONFIG_DEBUG_INFO_BTF=y (/sys/kernel/btf/vmlinux)",
                               errno=err)
    return DivertError(f"{action}: {detail}", hint="run `oisp check` to see what is missing", errno=err)
