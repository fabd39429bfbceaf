"""Process attribution: pid → {pid, ppid, name, exe, cmdline, user, start_time}, via psutil;
the command line without the secrets it held.

Cached per pid and keyed by the process's creation time, so a pid reused by a
new process is looked up afresh rather than given the old owner's identity.
A process that has exited keeps what we learned while it was alive; one we
never saw alive yields just its pid.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import psutil

from oisp.events.envelope import rfc3339
from oisp.events.redact import scrub_cmdline


class ProcessAttributor:
    def __init__(self, max_entries: int = 4096, revalidate_after_s: float = 2.0) -> None:
        # pid → (create_time, checked_at, info)
        self._cache: OrderedDict[int, tuple[float, float, dict[str, Any]]] = OrderedDict()
        self._max = max_entries
        self._revalidate = revalidate_after_s
        self.lookups = 0

    def process(self, pid: int | None) -> dict[str, Any] | None:
        if pid is None or pid < 0:
            return None
        now = time.monotonic()
        cached = self._cache.get(pid)
        if cached is not None and now - cached[1] < self._revalidate:
            return dict(cached[2])
        try:
            proc = psutil.Process(pid)
            created = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            # Exited (or hidden): what we knew while it lived is still the best answer.
            return dict(cached[2]) if cached is not None else {"pid": pid}
        if cached is not None and cached[0] == created:
            self._cache[pid] = (created, now, cached[2])
            self._cache.move_to_end(pid)
            return dict(cached[2])
        info = self._describe(proc, created)
        self._cache[pid] = (created, now, info)
        self._cache.move_to_end(pid)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return dict(info)

    def _describe(self, proc: psutil.Process, created: float) -> dict[str, Any]:
        self.lookups += 1
        info: dict[str, Any] = {"pid": proc.pid, "start_time": rfc3339(created)}
        with proc.oneshot():
            for key, getter in (("ppid", proc.ppid), ("name", proc.name), ("exe", proc.exe), ("cmdline_args", proc.cmdline),
                                ("user", proc.username)):
                try:
                    value = getter()
                except (psutil.Error, OSError):
                    continue
                if value not in (None, "", []):
                    info[key] = value
        if "cmdline_args" in info:
            # Scrubbed here, at the source, in every redaction mode: `--api-key K`, `-H 'x-api-key: K'`
            # and the like are credentials, not content.
            info["cmdline_args"], info["cmdline"] = scrub_cmdline(info["cmdline_args"])
        return info
