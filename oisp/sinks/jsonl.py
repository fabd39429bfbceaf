"""JSON Lines file sink, rotated by size: events.jsonl → events.jsonl.1 → … .N."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from oisp.paths import default_events_path
from oisp.safefile import open_private_file
from oisp.sinks.base import SinkStats, encode_event


class JsonlSink:
    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_bytes: int = 64 * 1024 * 1024,
                 backups: int = 5) -> None:
        self.path = Path(path) if path else default_events_path()
        self.max_bytes = max_bytes
        self.backups = backups
        self.stats = SinkStats()
        self._fh = open_private_file(self.path, "ab")  # recorded conversations: 0600, never through a link
        self._size = self._fh.tell()

    def emit(self, event: dict[str, Any]) -> None:
        self.emit_line(event, encode_event(event))

    def emit_line(self, event: dict[str, Any], line: bytes) -> None:
        line += b"\n"
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._fh.write(line)
        self._fh.flush()  # write-through: `tail -f` sees it, and a killed sensor loses nothing written
        self._size += len(line)
        self.stats.emitted += 1

    def _rotate(self) -> None:
        self._fh.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._fh = open_private_file(self.path, "ab")
        self._size = 0

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
