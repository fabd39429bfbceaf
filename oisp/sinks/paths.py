"""Where oisp keeps its data by default, per platform conventions."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def data_dir() -> Path:
    """XDG_DATA_HOME/oisp on Linux, %LOCALAPPDATA%\\oisp on Windows, Application Support on macOS."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "oisp"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "oisp"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "oisp"


def default_events_path() -> Path:
    return data_dir() / "events.jsonl"
