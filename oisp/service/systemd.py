"""The I/O of the systemd service: writing and removing oisp's unit files, and asking
systemd (systemctl, journalctl) to load, start, stop and describe them.

Only files that carry oisp's marker line (oisp.service.units.MARKER) are replaced or
removed: a unit of the same name that someone else wrote is left alone and reported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from oisp.service import units

UNIT_DIR = Path("/etc/systemd/system")
SHOWN = ("LoadState", "ActiveState", "SubState", "UnitFileState", "User", "MainPID", "NRestarts",
         "ExecMainStatus", "ActiveEnterTimestamp", "Result")
TIMEOUT = 90.0  # systemctl waits for the units to start or stop


class ServiceError(RuntimeError):
    """What stops the service from being installed, removed or read; says what to do."""


@dataclass(frozen=True)
class Written:
    name: str
    path: Path
    state: str  # "new", "changed" or "unchanged"


def booted() -> bool:
    """Whether systemd is this system's init (sd_booted(3): /run/systemd/system exists)."""
    return os.path.isdir("/run/systemd/system")


def init_name() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip() or "?"
    except OSError:
        return "?"


def write_units(unit_dir: Path, texts: dict[str, str]) -> list[Written]:
    """Write each unit (0644, replaced in one rename), refusing to touch one that is not ours.
    Checks every file before writing any, so a refusal leaves nothing half installed."""
    unit_dir = Path(unit_dir)
    if not unit_dir.is_dir():
        raise ServiceError(f"{unit_dir}: no such directory")
    old = {}
    for name in texts:
        existing = _read(unit_dir / name)
        if existing is not None and not units.is_ours(existing):
            raise ServiceError(f"{unit_dir / name} exists and was not written by oisp: remove or rename it, then install again")
        old[name] = existing
    done = []
    for name, text in texts.items():
        path = unit_dir / name
        if old[name] == text:
            done.append(Written(name, path, "unchanged"))
            continue
        temporary = unit_dir / f".{name}.oisp-{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(text)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        done.append(Written(name, path, "new" if old[name] is None else "changed"))
    return done


def remove_units(unit_dir: Path) -> tuple[list[Path], list[Path]]:
    """Remove oisp's unit files from `unit_dir`: (removed, left because not ours)."""
    removed, foreign = [], []
    for name in units.UNITS:
        path = Path(unit_dir) / name
        text = _read(path)
        if text is None:
            continue
        if units.is_ours(text):
            path.unlink()
            removed.append(path)
        else:
            foreign.append(path)
    return removed, foreign


def installed(unit_dir: Path) -> dict[str, dict]:
    """Per unit: whether its file is there, whether it is ours, and the user it runs as."""
    out = {}
    for name in units.UNITS:
        text = _read(Path(unit_dir) / name)
        out[name] = {"file": str(Path(unit_dir) / name) if text is not None else None,
                     "ours": bool(text and units.is_ours(text)),
                     "user": (units.unit_setting(text, "User") or "root") if text else None}
    return out


def _read(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except FileNotFoundError:
        return None


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("systemctl") is None:
        raise ServiceError("systemctl is not installed")
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=TIMEOUT)
    if check and done.returncode != 0:
        raise ServiceError(f"systemctl {' '.join(args)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")
    return done


def show(unit: str) -> dict[str, str]:
    """The unit's properties as systemd holds them (`systemctl show`: key=value lines, made
    for programs, unlike `systemctl status`)."""
    done = systemctl("show", f"--property={','.join(SHOWN)}", unit)
    props = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props


def journal(unit: str, lines: int) -> str:
    if shutil.which("journalctl") is None:
        raise ServiceError("journalctl is not installed")
    done = subprocess.run(["journalctl", "--no-pager", "-o", "short-iso", "-n", str(lines), "-u", unit],
                          capture_output=True, text=True, timeout=30)
    return (done.stdout or done.stderr).rstrip()


def state(unit_dir: Path = UNIT_DIR) -> dict:
    """The service as `oisp check` and `oisp service status` report it."""
    files = installed(unit_dir)
    report: dict = {"unit_dir": str(unit_dir), "systemd": booted(), "units": {}}
    for name, info in files.items():
        entry = dict(info)
        if report["systemd"] and info["file"]:
            try:
                entry["systemd"] = show(name)
            except (ServiceError, OSError, subprocess.SubprocessError) as e:
                entry["systemd"] = {"error": str(e)}
        report["units"][name] = entry
    report["installed"] = all(u["ours"] for u in report["units"].values())
    return report
