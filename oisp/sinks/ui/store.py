"""The dashboard's memory: the last events, encoded once as JSON, each with a sequence number.

Bounded in count and bytes; the oldest go first and are counted. Pages read it by sequence
number, so a slow page only lags (and, if it falls behind the oldest kept event, skips a
counted stretch): there is no per-page buffer that could grow.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

# encode_event escapes CR and LF inside strings, so one event is one line: safe in an SSE data field.
from oisp.sinks.base import encode_event

# Four events per call (connect, request, response, flow): about the last 100,000 calls.
DEFAULT_MAX_EVENTS = 400_000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
# Kinds the page has no use for: stream chunks repeat the response piece by piece.
SKIPPED_TYPES = frozenset({"ai.streaming_chunk"})


class EventStore:
    def __init__(self, *, max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.evicted = 0  # dropped as the oldest, to stay within the bounds
        self._items: list[bytes] = []
        self._first_seq = 1  # sequence number of _items[0]
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._items) - 1

    def __len__(self) -> int:
        return len(self._items)

    def add_events(self, events: Iterable[dict[str, Any]]) -> int:
        """Encode and keep the events the page shows; returns how many were kept."""
        return self.add_encoded(encode_event(e) for e in events if e.get("event_type") not in SKIPPED_TYPES)

    def add_encoded(self, lines: Iterable[bytes]) -> int:
        lines = [line for line in lines if len(line) <= self.max_bytes]
        if not lines:
            return 0
        with self._cond:
            self._items.extend(lines)
            self._bytes += sum(len(line) for line in lines)
            self._evict()
            self._cond.notify_all()
        return len(lines)

    def _evict(self) -> None:
        # Drop a slice at a time (a sixteenth of the bound at least): deleting from the front
        # of a list moves the rest, so one event at a time would be quadratic.
        n = 0
        if len(self._items) > self.max_events:
            n = len(self._items) - self.max_events + self.max_events // 16
        if self._bytes > self.max_bytes:
            excess, freed, k = self._bytes - self.max_bytes * 15 // 16, 0, 0
            while freed < excess and k < len(self._items):
                freed += len(self._items[k])
                k += 1
            n = max(n, k)
        if n:
            n = min(n, len(self._items))
            self._bytes -= sum(len(line) for line in self._items[:n])
            del self._items[:n]
            self._first_seq += n
            self.evicted += n

    def since(self, seq: int, *, max_bytes: int = 1024 * 1024) -> tuple[list[bytes], int, int]:
        """Events after `seq`, up to about `max_bytes`: (lines, sequence of the last one, events skipped
        because they were evicted before this reader got to them)."""
        with self._cond:
            start = seq + 1
            skipped = max(0, self._first_seq - start)
            index = max(0, start - self._first_seq)
            out: list[bytes] = []
            size = 0
            while index < len(self._items) and (not out or size + len(self._items[index]) <= max_bytes):
                out.append(self._items[index])
                size += len(self._items[index])
                index += 1
            return out, self._first_seq + index - 1 if out else max(seq, self._first_seq - 1), skipped

    def wait(self, seq: int, timeout: float) -> bool:
        """Wait until there is an event after `seq` (or close); True if there is one."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed or self.last_seq > seq, timeout) and not self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
