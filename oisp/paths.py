"""Where oisp keeps its data by default, per platform conventions (the ground floor:
the CA, the sinks and the CLI all use it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def data_dir() -> Path:
    """Where oisp keeps its files (oisp.safefile creates them: 0700, owned by the user, never
    through a symlink). XDG_DATA_HOME/oisp on Linux, %LOCALAPPDATA%\\oisp on Windows, Application Support on macOS.

    Under sudo, the invoking user's directory, not root's: `sudo oisp record` must
    use the same CA the user trusted with `oisp ca env`.

    Remembered per set of inputs (the environment variables and euid it reads): the
    redactor asks for every secret it hashes, and the passwd lookup under sudo costs
    ~10 us a time."""
    inputs = (os.environ.get("XDG_DATA_HOME"), os.environ.get("LOCALAPPDATA"), os.environ.get("HOME"),
              os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID"), os.geteuid() if hasattr(os, "geteuid") else None)
    found = _data_dirs.get(inputs)
    if found is None:
        if len(_data_dirs) >= 64:  # tests switch XDG_DATA_HOME often: never grows without bound
            _data_dirs.clear()
        found = _data_dirs[inputs] = _find_data_dir()
    return found


_data_dirs: dict[tuple, Path] = {}


def _find_data_dir() -> Path:
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "oisp"
    home = _sudo_user_home() or Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "oisp"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "oisp"


def invoking_user() -> tuple[int, int] | None:
    """(uid, gid) of the user who ran sudo, when running as root under sudo."""
    if sys.platform == "win32" or os.geteuid() != 0:
        return None
    try:
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None
    return (uid, gid) if uid != 0 else None


def _sudo_user_home() -> Path | None:
    ids = invoking_user()
    if ids is None:
        return None
    import pwd

    try:
        return Path(pwd.getpwuid(ids[0]).pw_dir)
    except KeyError:
        return None


def default_events_path() -> Path:
    return data_dir() / "events.jsonl"
