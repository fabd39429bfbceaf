"""Privilege preflight: run before any handle is opened, so a missing right is
reported as exactly that, with the command that fixes it.

Linux needs, measured here with eBPFDivert 0.0.5: CAP_NET_ADMIN, CAP_BPF and
CAP_PERFMON to open a handle (CAP_SYS_ADMIN stands in for the last two on older
kernels), CAP_NET_RAW to inject, and kernel BTF. Windows needs Administrator.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

CAP_NAMES = {
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_NET_RAW: "CAP_NET_RAW",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_PERFMON: "CAP_PERFMON",
    CAP_BPF: "CAP_BPF",
}

BTF_PATH = Path("/sys/kernel/btf/vmlinux")


@dataclass(frozen=True)
class Problem:
    what: str  # short name: "root", "CAP_BPF", "btf", "cgroup2"
    message: str  # what is missing
    fix: str  # what to run


def effective_capabilities() -> int:
    """The CapEff bitmask of this process (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def held_capabilities() -> list[str]:
    caps = effective_capabilities()
    return [name for bit, name in sorted(CAP_NAMES.items()) if caps >> bit & 1]


def btf_available() -> bool:
    return BTF_PATH.exists()


def cgroup2_mounted(path: str = "/sys/fs/cgroup") -> bool:
    """True when `path` is a cgroup2 mount (what eBPFDivert's FLOW/SOCKET layers attach to)."""
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if left.split()[4] == path and right.split()[0] == "cgroup2":
                return True
    except (OSError, IndexError):
        pass
    return False


def _missing_linux_caps() -> list[str]:
    caps = effective_capabilities()
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
    missing = []
    if not has(CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    if not has(CAP_SYS_ADMIN):
        missing += [CAP_NAMES[bit] for bit in (CAP_BPF, CAP_PERFMON) if not has(bit)]
    if not has(CAP_NET_RAW):
        missing.append("CAP_NET_RAW")
    return missing


def check_privileges() -> list[Problem]:
    """What stops this process from opening and injecting on a NETWORK handle."""
    if sys.platform == "win32":
        return _check_windows()
    problems = []
    missing = _missing_linux_caps()
    if missing:
        who = "not root and missing" if os.geteuid() != 0 else "root but missing"
        exe = sys.executable
        problems.append(Problem(
            "privileges",
            f"{who} {', '.join(missing)}",
            "run as root (sudo oisp …), or grant the capabilities to the interpreter that runs oisp "
            f"(every script it runs gets them): sudo setcap cap_net_admin,cap_bpf,cap_perfmon,cap_net_raw+ep {exe}",
        ))
    if not btf_available():
        problems.append(Problem(
            "btf",
            f"the kernel has no BTF ({BTF_PATH} is missing), which eBPFDivert needs",
            "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (all major distributions since 2021)",
        ))
    return problems


def check_layer(layer: int) -> list[Problem]:
    """Extra requirements of FLOW (2) and SOCKET (3) on Linux."""
    if sys.platform == "win32" or layer not in (2, 3) or cgroup2_mounted():
        return []
    return [Problem(
        "cgroup2",
        "FLOW and SOCKET layers need cgroup v2 at /sys/fs/cgroup; this system mounts a hybrid hierarchy",
        "boot with systemd.unified_cgroup_hierarchy=1, or run in a private mount namespace: "
        "unshare -m sh -c 'mount --make-rprivate /; mount -t cgroup2 none /sys/fs/cgroup; exec oisp …'",
    )]


def _check_windows() -> list[Problem]:
    import ctypes

    try:
        admin = bool(ctypes.windll.shell32.IsUserAnAdmin())  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        admin = False
    if admin:
        return []
    return [Problem("administrator", "not running as Administrator",
                    "run from an elevated prompt (right-click the terminal, Run as administrator)")]


def check_fail_open() -> list[Problem]:
    """What undoes failing open on Linux: no iproute2 for the guardian (then a killed oisp's
    filters stay and black-hole what they divert), and eBPFDivert filters that a dead
    process left in this network namespace, black-holing what they match now."""
    if sys.platform == "win32":  # WinDivert's handles go with their process
        return []
    from oisp.divert import guardian

    problems = []
    missing = guardian.missing_tools()
    if missing:
        problems.append(Problem(
            "guardian",
            f"fail-open on kill -9 is unavailable: {' and '.join(missing)} (iproute2) missing, so the filters "
            "of a killed oisp would black-hole the traffic they divert",
            "install iproute2: apt-get install iproute2 (Debian, Ubuntu) or dnf install iproute (Fedora, RHEL)"))
    try:
        orphans = guardian.orphaned_filters()
    except PermissionError:
        return problems  # without root nobody can tell whose they are
    if orphans:
        where = ", ".join(sorted({f"{f['dev']} {f['direction']}" for f in orphans}))
        problems.append(Problem(
            "orphaned filters",
            f"{len(orphans)} eBPFDivert filters ({where}) were left by a process that died; "
            "they black-hole the traffic they match",
            "oisp record removes them at start; or by hand: "
            + "; ".join(f"tc filter del dev {f['dev']} {f['direction']} pref {f['pref']} handle {f['handle']} bpf"
                        for f in orphans)))
    return problems


def sweep_orphaned_filters() -> int:
    """Remove the eBPFDivert filters in this network namespace whose process died; how many went."""
    if sys.platform == "win32":
        return 0
    from oisp.divert import guardian

    try:
        return guardian.delete_filters(guardian.orphaned_filters())
    except PermissionError:
        return 0
