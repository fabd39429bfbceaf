"""The service on Windows: the same split as on Linux. NEVER RUN HERE (this project's
machines are Linux): written to the documented interfaces, to be run on Windows before
it is relied on.

- The redirector is a Windows service, `oisp-redirector`, started at boot as
  LocalSystem (WinDivert needs Administrator rights). python.exe cannot answer the
  Service Control Manager itself, so pywin32's service host (pythonservice.exe) runs
  oisp.service.windows_host.RedirectorService, which starts `python -I -m oisp
  redirector --config FILE` and stops it when the SCM says so. Installed with
  win32serviceutil.InstallService; the config path is the service's custom option
  "config" (win32serviceutil.SetServiceCustomOption), read by the host.
- The sensor runs as the user, not as a service: a Task Scheduler task, \\oisp\\sensor,
  at that user's logon, with limited rights (schtasks /Create /SC ONLOGON /RU USER /IT
  /RL LIMITED), restarted by nothing but the next logon (the sensor reconnects to the
  redirector by itself).
- The config's directory gets a protected ACL (icacls): SYSTEM and Administrators full
  control, Users read, so no user can change what the LocalSystem service reads.
  (oisp.config checks POSIX modes only; this ACL is the Windows side of that rule.)

The decisions (command lines) are pure functions; `_run` is the one seam to the system.
"""

from __future__ import annotations

import csv
import io
import ntpath
import subprocess

from oisp.config import Config

SERVICE = "oisp-redirector"
TASK = r"\oisp\sensor"
HOST_CLASS = "oisp.service.windows_host.RedirectorService"
# Well-known SIDs, so the ACL does not depend on the system's language.
SYSTEM, ADMINISTRATORS, USERS = "*S-1-5-18", "*S-1-5-32-544", "*S-1-5-32-545"
TR_LIMIT = 261  # schtasks /TR takes at most this many characters


class WindowsServiceError(RuntimeError):
    """What stops the Windows service from being installed; says what to do."""


def quote(arg: str) -> str:
    """One argument for a Windows command line (the MSVC runtime's parsing rules)."""
    return subprocess.list2cmdline([arg])


def redirector_command(command: tuple[str, ...], config_path: str, user: str | None) -> list[str]:
    args = [*command, "redirector", "--config", config_path]
    return args + (["--user", user] if user else [])


def sensor_task(command: tuple[str, ...], config_path: str, user: str) -> list[str]:
    """schtasks arguments creating (or, /F, replacing) the sensor's logon task."""
    run = subprocess.list2cmdline([*command, "sensor", "--config", config_path])
    if len(run) > TR_LIMIT:
        raise WindowsServiceError(f"the sensor's command line is {len(run)} characters, more than schtasks takes "
                                  f"({TR_LIMIT}): install oisp in a shorter path")
    return ["schtasks", "/Create", "/TN", TASK, "/SC", "ONLOGON", "/RU", user, "/IT", "/RL", "LIMITED",
            "/TR", run, "/F"]


def config_acl(config_path: str) -> list[str]:
    """icacls arguments that leave the config's directory changeable by SYSTEM and Administrators only."""
    return ["icacls", ntpath.dirname(config_path), "/inheritance:r",
            "/grant:r", f"{SYSTEM}:(OI)(CI)F", "/grant:r", f"{ADMINISTRATORS}:(OI)(CI)F",
            "/grant:r", f"{USERS}:(OI)(CI)RX"]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise WindowsServiceError(f"{argv[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done


def install(command: tuple[str, ...], loaded: Config, user: str | None, *, start: bool) -> list[str]:
    """Install (or replace) the redirector service and the sensor's logon task; what was done, line by line."""
    import pywintypes
    import win32service
    import win32serviceutil

    user = user or loaded.get("service.user")
    if not user:
        raise WindowsServiceError(f"{loaded.path}: name the sensor's user ([service] user = \"NAME\"), or --user NAME")
    config_path = str(loaded.path)
    done = []
    _run(config_acl(config_path))
    done.append(f"{ntpath.dirname(config_path)}: changeable by SYSTEM and Administrators only")
    try:
        win32serviceutil.RemoveService(SERVICE)  # replacing keeps install idempotent
    except pywintypes.error:  # there is none: nothing to replace
        pass
    win32serviceutil.InstallService(
        HOST_CLASS, SERVICE, "oisp redirector", startType=win32service.SERVICE_AUTO_START,
        description="Diverts programs' connections to AI providers into the oisp sensor (LocalSystem)")
    win32serviceutil.SetServiceCustomOption(SERVICE, "config", config_path)
    win32serviceutil.SetServiceCustomOption(SERVICE, "command", subprocess.list2cmdline(
        redirector_command(command, config_path, user if user != loaded.get("service.user") else None)))
    done.append(f"service {SERVICE} installed (LocalSystem, starts at boot)")
    _run(sensor_task(command, config_path, user))
    done.append(f"task {TASK} installed (runs the sensor as {user} at logon)")
    if start:
        win32serviceutil.StartService(SERVICE)
        _run(["schtasks", "/Run", "/TN", TASK])
        done.append("started")
    return done


def uninstall() -> list[str]:
    import pywintypes
    import win32serviceutil

    done = []
    try:
        _run(["schtasks", "/End", "/TN", TASK])
    except WindowsServiceError:
        pass  # not running
    try:
        _run(["schtasks", "/Delete", "/TN", TASK, "/F"])
        done.append(f"task {TASK} removed")
    except WindowsServiceError as e:
        done.append(f"task {TASK}: {e}")
    try:
        win32serviceutil.StopService(SERVICE)
    except pywintypes.error:  # not running
        pass
    try:
        win32serviceutil.RemoveService(SERVICE)
        done.append(f"service {SERVICE} removed")
    except pywintypes.error as e:  # not installed
        done.append(f"service {SERVICE}: {e}")
    return done


STATES = {1: "stopped", 2: "start pending", 3: "stop pending", 4: "running", 5: "continue pending",
          6: "pause pending", 7: "paused"}  # SERVICE_STATUS.dwCurrentState


def state() -> dict:
    """The service and the task as `oisp check` and `oisp service status` report them."""
    report: dict = {"systemd": False, "not_running": "", "units": {}}
    service: dict = {"file": None, "ours": False, "user": None}
    try:
        import pywintypes
        import win32serviceutil
    except ImportError:  # no pywin32: nothing can have been installed with it
        pywintypes = None
    if pywintypes is not None:
        try:
            status = win32serviceutil.QueryServiceStatus(SERVICE)
            service = {"file": SERVICE, "ours": True, "user": "LocalSystem",
                       "systemd": {"ActiveState": STATES.get(status[1], str(status[1])), "SubState": "service"}}
        except pywintypes.error:  # not installed
            pass
    report["units"][SERVICE] = service
    try:
        done = _run(["schtasks", "/Query", "/TN", TASK, "/FO", "CSV", "/V"])
        row = next(csv.DictReader(io.StringIO(done.stdout)))
        report["units"][TASK] = {"file": TASK, "ours": True, "user": row.get("Run As User"),
                                 "systemd": {"ActiveState": row.get("Status", "?"), "SubState": "logon task"}}
    except (WindowsServiceError, OSError, StopIteration):
        report["units"][TASK] = {"file": None, "ours": False, "user": None}
    report["installed"] = all(u["ours"] for u in report["units"].values())
    return report
