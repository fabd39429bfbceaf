"""`oisp service install|uninstall|status`: oisp as a service that starts at boot.

Two units, as the split runs by hand: `oisp redirector` as root with only the
capabilities divert needs, and `oisp sensor` as the user named in the config (or
--user), with none. Both read the same config file (default /etc/oisp/oisp.toml,
docs/config.md) and log to the journal: journalctl -u oisp-redirector -u oisp-sensor.
Windows: the redirector as a LocalSystem service and the sensor as a task at the
user's logon (docs/service.md; written to the documented APIs, never run here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from oisp import config
from oisp.cli.configured import add_config_option


def register(sub) -> None:
    parser = sub.add_parser("service", help="install, remove or show oisp's service (redirector as root, sensor as a user)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = actions.add_parser("install", help="write the units, check the config, enable and start them (root)")
    add_config_option(install, default=str(config.DEFAULT_PATH))
    install.add_argument("--user", metavar="NAME", help="the sensor's user (default: [service] user in the config)")
    install.add_argument("--no-start", action="store_true", help="only write the units: no enable, no start")
    uninstall = actions.add_parser("uninstall", help="stop, disable and remove what install wrote (root)")
    status = actions.add_parser("status", help="each unit's state, and with --journal its last log lines")
    status.add_argument("--journal", metavar="LINES", type=int, nargs="?", const=20,
                        help="also print the last LINES journal lines of each unit (default 20)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    if sys.platform != "win32":
        from oisp.service.systemd import UNIT_DIR

        for p in (install, uninstall, status):
            p.add_argument("--unit-dir", metavar="DIR", type=Path, default=UNIT_DIR,
                           help=f"where the unit files go (default {UNIT_DIR}; another directory: only the files, "
                                "systemctl is not run)")
    install.set_defaults(func=run_install)
    uninstall.set_defaults(func=run_uninstall)
    status.set_defaults(func=run_status)


def oisp_command() -> tuple[str, ...]:
    """How a unit runs this very install of oisp: its interpreter, isolated (-I: no user
    site-packages, no PYTHON* variables, no current directory on the path), with -m oisp."""
    return (os.path.abspath(sys.executable), "-I", "-m", "oisp")


def _imported_by(command: tuple[str, ...]) -> Path | None:
    """The oisp package that `command`'s interpreter imports (as the units will run it), or None."""
    try:
        done = subprocess.run([command[0], "-I", "-c", "import oisp; print(oisp.__file__)"],
                              capture_output=True, text=True, timeout=60, cwd="/")
    except (OSError, subprocess.SubprocessError):
        return None
    there = done.stdout.strip()
    return Path(there).resolve().parent if done.returncode == 0 and there else None


def install_dirs(package: Path | None) -> tuple[str, ...]:
    """The directories the units' interpreter runs from: its prefixes and oisp's own."""
    dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    if package is not None:
        dirs.add(str(package.parent))
    return tuple(sorted(dirs))


def _refuse_unprivileged(args, what: str) -> int | None:
    if sys.platform == "win32":
        from oisp.divert.preflight import check_privileges

        if check_privileges():
            print(f"oisp service {what}: needs Administrator: run it from an elevated prompt", file=sys.stderr)
            return 3
        return None
    from oisp.service.systemd import UNIT_DIR

    if os.geteuid() != 0 and Path(args.unit_dir) == UNIT_DIR:
        print(f"oisp service {what}: needs root to change {UNIT_DIR} and systemd: sudo oisp service {what} …",
              file=sys.stderr)
        return 3
    return None


def run_install(args) -> int:
    refused = _refuse_unprivileged(args, "install")
    if refused is not None:
        return refused
    loaded: config.Config = args.config_file
    problem = _check_runnable(loaded, args.user)
    if problem:
        print(f"oisp service install: {problem}", file=sys.stderr)
        return 2
    command = oisp_command()
    if sys.platform == "win32":
        from oisp.service import windows

        try:
            for line in windows.install(command, loaded, args.user, start=not args.no_start):
                print(f"oisp service install: {line}")
        except windows.WindowsServiceError as e:
            print(f"oisp service install: {e}", file=sys.stderr)
            return 1
        return 0
    from oisp.service import systemd, units

    package, here = _imported_by(command), Path(__file__).resolve().parents[1]
    if package is None:
        print(f"oisp service install: {command[0]} -I cannot import oisp, so the units could not run it: "
              "install oisp for that interpreter (python -m pip install oisp)", file=sys.stderr)
        return 2
    if package != here:
        print(f"oisp service install: note: {command[0]} -I imports {package}, not this oisp ({here}): "
              "the units run that one", file=sys.stderr)
    try:
        plan = units.plan(loaded, command=command, user=args.user, install=install_dirs(package))
    except units.UnitError as e:
        print(f"oisp service install: {e}", file=sys.stderr)
        return 2
    try:
        written = systemd.write_units(args.unit_dir, units.build(plan))
    except (systemd.ServiceError, OSError) as e:
        print(f"oisp service install: {e}", file=sys.stderr)
        return 1
    for w in written:
        print(f"oisp service install: {w.path} {w.state}")
    if Path(args.unit_dir) != systemd.UNIT_DIR:
        print(f"oisp service install: {args.unit_dir} is not systemd's directory: systemctl not run")
        return 0
    if not systemd.booted():
        print(f"oisp service install: systemd is not running here (PID 1 is {systemd.init_name()}): the units are "
              f"written; once it runs: systemctl enable --now {' '.join(units.UNITS)}",
              file=sys.stderr)
        return 0 if args.no_start else 1
    try:
        systemd.systemctl("daemon-reload")
        if not args.no_start:
            systemd.systemctl("enable", "--now", *units.UNITS)
            changed = [w.name for w in written if w.state == "changed"]
            if changed:  # running with the old text: start them again with the new
                systemd.systemctl("try-restart", *changed)
    except (systemd.ServiceError, OSError, subprocess.SubprocessError) as e:
        print(f"oisp service install: {e}\n  see: journalctl -u oisp-redirector -u oisp-sensor", file=sys.stderr)
        return 1
    from oisp.proxy.ca import CERT_FILE

    print("oisp service install: " + ("enabled and started" if not args.no_start else "loaded, not started")
          + f"; the sensor's CA is {units.STATE_BASE}/{units.STATE_DIR}/{CERT_FILE} once it has run: {plan.user} "
          f"trusts it with  sudo env XDG_DATA_HOME={units.STATE_BASE} oisp ca install  (docs/service.md)")
    return 0


def _check_runnable(loaded: config.Config, user: str | None) -> str | None:
    """What the config names that cannot be used, checked before any unit is written: the
    user and group exist, the spec and the price table load."""
    if sys.platform != "win32":
        import grp
        import pwd

        if user:
            try:
                if pwd.getpwnam(user).pw_uid == 0:
                    return f"{user} is root: the sensor must run as an ordinary user"
            except KeyError:
                return f"no user {user!r} on this system ({loaded.path}: service.user, or --user)"
        group = loaded.get("service.group")
        if group:
            try:
                grp.getgrnam(group)
            except KeyError:
                return f"{loaded.path}: service.group: no group {group!r} on this system"
        if user and not _readable_by(loaded.path, pwd.getpwnam(user), group):
            return (f"{loaded.path}: the sensor runs as {user} and could not read it: chmod 0644 {loaded.path} "
                    f"(or, when it names a webhook URL: chgrp {group or user} {loaded.path}; chmod 0640 {loaded.path})")
    spec = loaded.get("capture.spec")
    if spec:
        from oisp.spec import load_spec

        try:
            load_spec(spec)
        except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:
            return f"{loaded.path}: capture.spec: {spec}: {e}"
    prices = loaded.get("events.prices")
    if prices:
        from oisp.events.cost import PriceTableError, load_prices

        try:
            load_prices(prices)
        except PriceTableError as e:
            return f"{loaded.path}: events.prices: {e}"
    return None


def _readable_by(path: Path, user, group: str | None) -> bool:
    """Whether the sensor (this user, with its groups or the configured one) may read `path`."""
    import grp

    info = os.stat(path)
    if info.st_mode & 0o004 or (info.st_uid == user.pw_uid and info.st_mode & 0o400):
        return True
    gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    if group:
        gids.add(grp.getgrnam(group).gr_gid)
    return bool(info.st_gid in gids and info.st_mode & 0o040)


def run_uninstall(args) -> int:
    refused = _refuse_unprivileged(args, "uninstall")
    if refused is not None:
        return refused
    if sys.platform == "win32":
        from oisp.service import windows

        for line in windows.uninstall():
            print(f"oisp service uninstall: {line}")
        return 0
    from oisp.service import systemd, units

    ours = [name for name, info in systemd.installed(args.unit_dir).items() if info["ours"]]
    managed = Path(args.unit_dir) == systemd.UNIT_DIR and systemd.booted()
    if managed and ours:
        try:  # the sensor first: it stops recording before its connections lose the redirector
            systemd.systemctl("disable", "--now", *sorted(ours, key=lambda n: n != units.SENSOR))
        except (systemd.ServiceError, OSError, subprocess.SubprocessError) as e:
            print(f"oisp service uninstall: {e}", file=sys.stderr)
            return 1
    removed, foreign = systemd.remove_units(args.unit_dir)
    if managed and removed:
        systemd.systemctl("daemon-reload", check=False)
    for path in removed:
        print(f"oisp service uninstall: removed {path}")
    for path in foreign:
        print(f"oisp service uninstall: left {path}: not written by oisp", file=sys.stderr)
    if not removed and not foreign:
        print(f"oisp service uninstall: nothing of oisp's in {args.unit_dir}")
    return 1 if foreign else 0


def run_status(args) -> int:
    if sys.platform == "win32":
        from oisp.service import windows

        report = windows.state()
    else:
        from oisp.service import systemd

        report = systemd.state(args.unit_dir)
        if args.journal and report["systemd"]:
            for name, entry in report["units"].items():
                if entry["file"]:
                    entry["journal"] = systemd.journal(name, args.journal)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in describe(report):
            print(line)
        for name, entry in report["units"].items():
            if entry.get("journal"):
                print(f"--- {name}, last {args.journal} journal lines\n{entry['journal']}")
    return 0 if report["installed"] else 1


def describe(report: dict) -> list[str]:
    """One line per unit: installed?, whose, which user, and what systemd says of it."""
    lines = []
    for name, entry in report["units"].items():
        if not entry["file"]:
            lines.append(f"{name:24} not installed")
            continue
        what = "installed" if entry["ours"] else "present but not oisp's"
        running = entry.get("systemd") or {}
        if "error" in running:
            live = f"systemd: {running['error']}"
        elif running:
            live = (f"{running.get('ActiveState', '?')} ({running.get('SubState', '?')}), "
                    f"{running.get('UnitFileState') or 'not enabled'}"
                    + (f", pid {running['MainPID']}" if running.get("MainPID", "0") != "0" else "")
                    + (f", {running['NRestarts']} restarts" if running.get("NRestarts", "0") != "0" else ""))
        else:
            live = report.get("not_running", "systemd is not running here")
        lines.append(f"{name:24} {what}, as {entry['user']}; {live}")
    return lines
