"""Find and load the divert backend that the installed pydivert ships.

pydivert 4.0.1 carries WinDivert 2.2.2 (`pydivert/windivert_dll/WinDivert64.dll`
+ `.sys`) on Windows and eBPFDivert 0.0.5 (`pydivert/bpf/libebpfdivert.so`) on
Linux. We dlopen by absolute path, never through the loader's search path, so
the checked file (see pinned.py) is the one that runs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from oisp._native._divert_cffi import ffi
from oisp.divert.errors import BackendMissingError

WINDOWS = sys.platform == "win32"


@dataclass(frozen=True)
class LibraryLocation:
    backend: str  # "windivert" or "ebpfdivert"
    path: Path  # the library to dlopen
    files: tuple[Path, ...]  # every native file the backend needs (dll + sys on Windows)


def pydivert_dir() -> Path:
    """pydivert's package directory, found without importing pydivert itself
    (its import pulls in asyncio machinery we do not use)."""
    spec = importlib.util.find_spec("pydivert")
    if spec is None or not spec.submodule_search_locations:
        raise BackendMissingError("pydivert is not installed", hint="pip install 'pydivert>=4.0.1'")
    return Path(next(iter(spec.submodule_search_locations)))


def locate() -> LibraryLocation:
    root = pydivert_dir()
    if WINDOWS:
        dll = root / "windivert_dll" / "WinDivert64.dll"
        return LibraryLocation("windivert", dll, (dll, dll.with_suffix(".sys")))
    so = root / "bpf" / "libebpfdivert.so"
    return LibraryLocation("ebpfdivert", so, (so,))


# eBPFDivert starts a detached worker thread on its first open that nothing can stop.
# Unmapping the library under it crashes the process (SIGSEGV) as soon as the thread
# wakes up, and cffi unmaps it when the library object is freed, which interpreter
# exit does: so it stays loaded until the process ends.
DLOPEN_FLAGS = 0 if WINDOWS else ffi.RTLD_NOW | ffi.RTLD_NODELETE


@functools.lru_cache(maxsize=None)
def load(path: str):
    """dlopen one library once per process, for good (see DLOPEN_FLAGS)."""
    if not os.path.isfile(path):
        raise BackendMissingError(
            f"the divert library {path} is missing",
            hint="reinstall pydivert: pip install --force-reinstall 'pydivert>=4.0.1'",
            winerror=2,
        )
    try:
        return ffi.dlopen(path, DLOPEN_FLAGS)
    except OSError as exc:
        raise BackendMissingError(
            f"cannot load {path}: {exc}",
            hint="reinstall pydivert: pip install --force-reinstall 'pydivert>=4.0.1'",
        ) from exc
