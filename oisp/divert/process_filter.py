"""Which processes a command takes: `--process`, `--exclude` (record), `--process` (capture, flows).

One rule for every command: a list of pids and names, comma-separated or a list; a
process matches by its pid or by its name, names compared without case (Windows
names its programs "Python.exe" or "python.exe" alike).
"""

from __future__ import annotations

from typing import Iterable


class ProcessFilter:
    """Include/exclude by pid or name. With an include list only those are taken;
    an exclusion always wins."""

    def __init__(self, include: str | Iterable[str | int] = (), exclude: str | Iterable[str | int] = ()):
        self.include_pids, self.include_names = self._parse(include)
        self.exclude_pids, self.exclude_names = self._parse(exclude)

    @staticmethod
    def _parse(spec) -> tuple[set[int], set[str]]:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        items = [str(i).strip() for i in items if str(i).strip()]
        return {int(i) for i in items if i.isdigit()}, {i.lower() for i in items if not i.isdigit()}

    @property
    def active(self) -> bool:
        return bool(self.include_pids or self.include_names or self.exclude_pids or self.exclude_names)

    @property
    def needs_names(self) -> bool:
        """Whether `allows` can depend on the name (else a pid answers alone)."""
        return bool(self.include_names or self.exclude_names)

    def allows(self, pid: int | None, name: str | None) -> bool:
        name = (name or "").lower()
        if pid in self.exclude_pids or name in self.exclude_names:
            return False
        if self.include_pids or self.include_names:
            return pid in self.include_pids or name in self.include_names
        return True
