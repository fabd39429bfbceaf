"""Is the installed pydivert carrying exactly the backend files we tested?

The list lives in deps/backends.json; setup.py copies it into the package as
pinned_backends.json.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from oisp.divert.library import pydivert_dir

MANIFEST = Path(__file__).with_name("pinned_backends.json")


@dataclass(frozen=True)
class FileCheck:
    path: Path
    expected: str
    actual: str | None  # None: file missing

    @property
    def ok(self) -> bool:
        return self.actual == self.expected


def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def platform_key() -> str:
    machine = platform.machine().lower()
    if sys.platform == "win32":
        return "win_amd64" if machine in ("amd64", "x86_64") else f"win_{machine}"
    return {"amd64": "linux_x86_64", "arm64": "linux_aarch64"}.get(machine, f"linux_{machine}")


def backend_name() -> str:
    return "windivert" if sys.platform == "win32" else "ebpfdivert"


def sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def check_installed() -> tuple[str, list[FileCheck]]:
    """(pinned backend version, one check per native file). Raises LookupError when
    this platform has no pinned files at all."""
    entry = manifest()["backends"][backend_name()]
    files = entry["files"].get(platform_key())
    if files is None:
        raise LookupError(f"no tested {backend_name()} build for {platform_key()}; tested: {', '.join(entry['files'])}")
    root = pydivert_dir()
    return entry["version"], [FileCheck(root / rel, digest, sha256(root / rel)) for rel, digest in files.items()]
