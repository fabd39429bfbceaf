"""Where oisp keeps its data by default, per platform conventions (the ground floor:
the CA, the sinks and the CLI all use it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def data_dir() -> Path:
    """XDG_DATA_HOME/oisp on Linux, %LOCALAPPDATA%\\oisp on Windows, Application Support on macOS.

    Under sudo, the invoking user's directory, not root's: `sudo oisp record` must
    use the same CA the user trusted with `oisp ca env`."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "oisp"
    home = _sudo_user_home() or Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "oisp"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "oisp"


def _sudo_ids() -> tuple[int, int] | None:
    """(uid, gid) of the user who ran sudo, when running as root under sudo."""
    if sys.platform == "win32" or os.geteuid() != 0:
        return None
    try:
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None
    return (uid, gid) if uid != 0 else None


def _sudo_user_home() -> Path | None:
    ids = _sudo_ids()
    if ids is None:
        return None
    import pwd

    try:
        return Path(pwd.getpwuid(ids[0]).pw_dir)
    except KeyError:
        return None


def give_to_invoking_user(*paths: Path) -> None:
    """Under sudo, files made in the user's data directory belong to the user, so
    their own `oisp ca env` and later runs can use them."""
    ids = _sudo_ids()
    if ids is None:
        return
    for path in paths:
        try:
            os.chown(path, *ids)
        except OSError:
            pass


def default_events_path() -> Path:
    return data_dir() / "events.jsonl"
