"""Following a JSONL file of events while it grows, for ``oisp ui FILE``.

Reads whole lines only (a partial last line waits for its newline), bounds a line's
length, notices truncation (the file got shorter: start again from its top) and rotation
(the path names a new file: finish the old one, then read the new one from its start).
Bad lines are counted and skipped.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

from oisp.sinks.ui.store import EventStore

MAX_LINE = 16 * 1024 * 1024
READ_SIZE = 4 * 1024 * 1024


class Follower:
    def __init__(self, path: str | os.PathLike[str], store: EventStore, *, poll: float = 0.25,
                 max_line: int = MAX_LINE) -> None:
        self.path = Path(path)
        self.store = store
        self.poll = poll
        self.max_line = max_line
        self.counts = {"lines": 0, "bad_lines": 0, "too_long": 0, "truncations": 0, "rotations": 0, "bytes": 0}
        self.types: dict[str, int] = {}
        self._fh: BinaryIO | None = None
        self._ino: tuple[int, int] | None = None
        self._partial = b""
        self._skipping = False  # inside a line longer than max_line, until its newline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oisp-ui-tail", daemon=True)

    def status(self) -> dict[str, Any]:
        return {"mode": "file", "file": str(self.path), "read": dict(self.counts), "events_by_type": dict(self.types)}

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)
        if self._fh:
            self._fh.close()

    def _run(self) -> None:
        while True:
            self.poll_once()
            if self._stop.wait(self.poll):
                return

    def poll_once(self) -> None:
        """Read what is new; open, reopen or rewind as the file requires."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None  # rotated away and not yet recreated, or not made yet
        if self._fh is not None and st is not None and (st.st_dev, st.st_ino) != self._ino:
            self._drain()  # rotated: what was written to the old file before the rename
            self._fh.close()
            self._fh = None
            self.counts["rotations"] += 1
            self._partial, self._skipping = b"", False
        if self._fh is None:
            if st is None:
                return
            try:
                self._fh = open(self.path, "rb")  # noqa: SIM115 - held open across polls
            except FileNotFoundError:
                return
            st = os.fstat(self._fh.fileno())
            self._ino = (st.st_dev, st.st_ino)
        elif st is not None and st.st_size < self._fh.tell():
            self._fh.seek(0)
            self.counts["truncations"] += 1
            self._partial, self._skipping = b"", False
        self._drain()

    def _drain(self) -> None:
        assert self._fh is not None
        while True:
            chunk = self._fh.read(READ_SIZE)
            if not chunk:
                return
            self.counts["bytes"] += len(chunk)
            self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        *lines, rest = (self._partial + chunk).split(b"\n")
        events = []
        for line in lines:
            if self._skipping:  # the end of an overlong line
                self._skipping = False
                continue
            if len(line) > self.max_line:
                self.counts["too_long"] += 1
                continue
            event = self._parse(line)
            if event is not None:
                events.append(event)
        if self._skipping:  # still inside an overlong line
            rest = b""
        elif len(rest) > self.max_line:
            self.counts["too_long"] += 1
            self._skipping, rest = True, b""
        self._partial = rest
        if events:
            self.store.add_events(events)

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        line = line.strip()
        if not line:
            return None
        self.counts["lines"] += 1
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("event_type"), str):
            self.counts["bad_lines"] += 1
            return None
        kind = event["event_type"][:64]
        if kind in self.types or len(self.types) < 64:
            self.types[kind] = self.types.get(kind, 0) + 1
        return event
