"""The two systemd units of `oisp service install`, built from a checked config: pure
functions, so tests read the text without root or systemd.

- oisp-redirector.service runs `oisp redirector` as root with only the capabilities
  divert and the IPC need (measured, see REDIRECTOR_CAPABILITIES), in a read-only
  system with no view of /home. Its socket lives in RuntimeDirectory=, which systemd
  makes root's and 0755, the way oisp.ipc.transport wants the socket's directory.
- oisp-sensor.service runs `oisp sensor` as the named user with no capabilities at all.
  It only Wants= the redirector (ordered After= it): a restart of the redirector must
  not restart the sensor, which reconnects by itself (Requires=, BindsTo= and PartOf=
  would all carry the restart over). Its files go to StateDirectory= (/var/lib/oisp,
  systemd makes it the user's, 0700), which is oisp's data directory there.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from oisp.config import Config

REDIRECTOR = "oisp-redirector.service"
SENSOR = "oisp-sensor.service"
UNITS = (REDIRECTOR, SENSOR)
MARKER = "# oisp-service-unit: written by `oisp service install`; `oisp service uninstall` removes it."
DEFAULT_SOCKET = "/run/oisp/ipc.sock"
STATE_BASE = "/var/lib"  # the sensor's XDG_DATA_HOME: oisp's data directory is STATE_BASE/oisp
STATE_DIR = "oisp"
# What `oisp redirector` needs, each one measured as root under a bounding set without it
# (tests/test_service.py runs the measurement again from the unit's own text):
#   CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON  open a divert handle (eBPFDivert attaches tc programs)
#   CAP_NET_RAW                          inject packets
#   CAP_CHOWN                            give the IPC socket to the sensor's user
#   CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH  read other users' /proc/PID/fd: whose socket a flow is
#                                        (psutil, the guardian), otherwise every owner is unknown
# Kernels before 5.8 have no CAP_BPF/CAP_PERFMON and want CAP_SYS_ADMIN instead (a drop-in:
# docs/service.md); it is left out here because it is most of root.
REDIRECTOR_CAPABILITIES = ("CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON", "CAP_CHOWN",
                           "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")
# ProtectHome=yes hides these from both units: nothing a service reads or writes may be there.
HIDDEN = ("/home", "/root", "/run/user")
_SAFE = re.compile(r"[A-Za-z0-9_./:@+,=-]+")  # what a path or name in a unit may hold unquoted


class UnitError(ValueError):
    """The config cannot be made into units; the message says what to change."""


@dataclass(frozen=True)
class Plan:
    """Everything the units say, decided from the config."""
    command: tuple[str, ...]  # how to run this oisp: (python, -I, -m, oisp)
    config_path: str
    user: str
    group: str | None
    socket: str
    user_override: bool  # the user came from `install --user`, so the redirector is told too
    writable: tuple[str, ...]  # directories the sensor writes outside its state directory
    shown: tuple[str, ...] = ()  # directories of the install under HIDDEN, shown read-only


def plan(config: Config, *, command: tuple[str, ...], user: str | None, install: tuple[str, ...] = ()) -> Plan:
    """Check that `config` can run as the two units, and decide what they say. `user`: the
    sensor's user as `install` got it (its --user, else the config's); `install`: the
    directories this oisp runs from (its interpreter's prefixes, its package's)."""
    where = config.path
    if not user:
        raise UnitError(f"{where}: name the sensor's user ([service] user = \"NAME\"), or: oisp service install --user NAME")
    if user in ("root", "0"):
        raise UnitError(f"{where}: the sensor must not run as root (the split exists so that it does not): "
                        "name an ordinary user")
    socket = config.get("service.socket", DEFAULT_SOCKET)
    runtime = posixpath.dirname(socket)
    if posixpath.dirname(runtime) != "/run" or runtime == "/run/user":
        raise UnitError(f"{where}: service.socket must be in a directory directly under /run (like {DEFAULT_SOCKET}): "
                        "the redirector's unit makes that directory (RuntimeDirectory=) and may write nowhere else")
    for name in ("capture.spec", "events.prices", "output.jsonl"):
        _visible(config, name, config.get(name))
    webhook = config.get("output.webhook") or ""
    if webhook.startswith("@"):
        _visible(config, "output.webhook", webhook[1:])
    writable = []
    jsonl = config.get("output.jsonl")
    state = posixpath.join(STATE_BASE, STATE_DIR)
    if jsonl and not _under(jsonl, state):
        writable.append(posixpath.dirname(jsonl))
    shown = tuple(sorted({d for d in install if any(_under(d, hidden) for hidden in HIDDEN)}))
    group = config.get("service.group")
    for text in (*command, str(config.path), user, group or "", socket, *writable, *shown):
        if text and not _SAFE.fullmatch(text):
            raise UnitError(f"{text!r}: a path or name a unit carries may hold only letters, digits and _ . / : @ + , = -")
    return Plan(command=tuple(command), config_path=str(config.path), user=user, group=group, socket=socket,
                user_override=user != config.get("service.user"), writable=tuple(writable), shown=shown)


def _visible(config: Config, name: str, path: str | None) -> None:
    if path and any(_under(path, hidden) for hidden in HIDDEN):
        raise UnitError(f"{config.path}: {name}: {path} is under {', '.join(HIDDEN)}, which the service units hide "
                        "(ProtectHome=yes): put it in /etc/oisp or /var/lib/oisp")


def _home(p: Plan) -> list[str]:
    """ProtectHome=yes, or when oisp itself is installed under a home directory, an empty
    one (tmpfs) with only the install's directories in it, read-only."""
    if not p.shown:
        return ["ProtectHome=yes"]
    return ["# oisp runs from under a home directory: only its own directories are shown, read-only.",
            "ProtectHome=tmpfs", f"BindReadOnlyPaths={' '.join(p.shown)}"]


def _under(path: str, directory: str) -> bool:
    path = posixpath.normpath(path)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def redirector_unit(p: Plan) -> str:
    args = [*p.command, "redirector", "--config", p.config_path]
    if p.user_override:
        args += ["--user", p.user]
    return "\n".join([
        MARKER,
        "[Unit]",
        "Description=oisp redirector: diverts programs' connections to AI providers into the oisp sensor",
        "After=network.target",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={' '.join(args)}",
        "Restart=on-failure",
        "RestartSec=1s",
        "SyslogIdentifier=oisp-redirector",
        "Environment=PYTHONUNBUFFERED=1",
        "# The IPC socket's directory: root's, 0755, made and removed by systemd.",
        f"RuntimeDirectory={posixpath.basename(posixpath.dirname(p.socket))}",
        "RuntimeDirectoryMode=0755",
        f"CapabilityBoundingSet={' '.join(REDIRECTOR_CAPABILITIES)}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        *_home(p),
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "PrivateMounts=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "# Not ProtectKernelTunables= nor ProtectControlGroups=: eBPFDivert pins its maps under",
        "# /sys/fs/bpf, and its FLOW and SOCKET layers attach to the cgroup2 hierarchy.",
        "# Not ProtectProc=: naming which process owns a connection reads every /proc/PID.",
        "ReadWritePaths=-/sys/fs/bpf -/run/ebpfdivert.lock",
        "# tc and ss (the guardian's fail-open cleanup) speak netlink.",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "# Older kernels charge BPF maps to locked memory.",
        "LimitMEMLOCK=infinity",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def sensor_unit(p: Plan) -> str:
    args = [*p.command, "sensor", "--config", p.config_path]
    lines = [
        MARKER,
        "[Unit]",
        f"Description=oisp sensor: records what programs send to AI providers and what comes back (as {p.user})",
        "# Wants=, not Requires= or BindsTo=: a restart of the redirector leaves the sensor running,",
        "# and it reconnects by itself.",
        f"Wants={REDIRECTOR}",
        f"After={REDIRECTOR} network.target",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={' '.join(args)}",
        "Restart=on-failure",
        "RestartSec=2s",
        "SyslogIdentifier=oisp-sensor",
        f"User={p.user}",
    ]
    if p.group:
        lines.append(f"Group={p.group}")
    lines += [
        "# oisp's data directory (the CA, the events) is /var/lib/oisp, the user's and 0700.",
        f"Environment=PYTHONUNBUFFERED=1 XDG_DATA_HOME={STATE_BASE}",
        f"StateDirectory={STATE_DIR}",
        "StateDirectoryMode=0700",
    ]
    if p.writable:
        lines.append("ReadWritePaths=" + " ".join(p.writable))
    lines += [
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        *_home(p),
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "PrivateMounts=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "# Not ProtectProc= nor ProcSubset=: events name the client process from its /proc/PID (and",
        "# psutil its start time from /proc/stat). Not RemoveIPC=: the user's own session may hold IPC.",
        "# Not MemoryDenyWriteExecute=: never tried with the compiled libraries (cryptography, brotli, zstd).",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        "# Each proxied connection holds two descriptors.",
        "LimitNOFILE=65536",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def build(p: Plan) -> dict[str, str]:
    """File name -> text, in the order they start."""
    return {REDIRECTOR: redirector_unit(p), SENSOR: sensor_unit(p)}


def is_ours(text: str) -> bool:
    return text.startswith(MARKER + "\n")


def unit_setting(text: str, name: str) -> str | None:
    """The last `name=` line of a unit's text (what systemd would use), or None."""
    found = None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name:
            found = value.strip()
    return found
