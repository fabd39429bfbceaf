"""The UI sink: hands recorded events to the dashboard without ever making recording wait.

``emit`` only appends to a bounded deque (a full one costs a counted lost event); a pump
thread moves the events into the :class:`EventStore` the pages read from.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from oisp.sinks.base import SinkStats, encode_event
from oisp.sinks.ui.server import DEFAULT_PORT, UIServer
from oisp.sinks.ui.store import SKIPPED_TYPES, EventStore

PUMP_INTERVAL = 0.05  # seconds between moves from the queue to the store: latency, not throughput
DEFAULT_MAX_PENDING = 50_000


class UISink:
    name = "ui"

    def __init__(self, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, store: EventStore | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, token: str | None = None) -> None:
        self.stats = SinkStats()
        self.store = store if store is not None else EventStore()  # an empty store is falsy (len 0)
        self._pending: deque[bytes] = deque()
        self._max_pending = max_pending
        self._status: dict[str, Any] = {"mode": "record"}
        self._stop = threading.Event()
        self.server = UIServer(self.store, host=host, port=port, health=self._health, token=token)
        self._pump = threading.Thread(target=self._run, name="oisp-ui-pump", daemon=True)
        self.server.start()
        self._pump.start()

    @property
    def url(self) -> str:
        return self.server.url

    def emit(self, event: dict[str, Any]) -> None:
        self.emit_line(event, encode_event(event))

    def emit_line(self, event: dict[str, Any], line: bytes) -> None:
        """Queue the event's line, encoded once for all sinks by FanOut (the page reads the same JSON)."""
        if event.get("event_type") in SKIPPED_TYPES:
            return
        # len() and append() on a deque are atomic under the GIL: no lock on the recording path.
        if len(self._pending) >= self._max_pending:
            self.stats.lost += 1
            return
        self._pending.append(line)

    def set_status(self, status: dict[str, Any]) -> None:
        """The recorder's latest counters for the health panel (replaced whole, so read without a lock)."""
        self._status = status

    def _health(self) -> dict[str, Any]:
        return {**self._status, "ui": {"queued": len(self._pending), "lost": self.stats.lost}}

    def _run(self) -> None:
        while not self._stop.wait(PUMP_INTERVAL):
            self._move()
        self._move()

    def _move(self) -> None:
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        if batch:
            try:
                self.store.add_encoded(batch)
                self.stats.emitted += len(batch)
            except Exception as e:  # noqa: BLE001 - whatever goes wrong costs that batch, not the pump
                self.stats.lost += len(batch)
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"

    def flush(self) -> None:
        """Nothing to do: the pump moves events within PUMP_INTERVAL."""

    def close(self) -> None:
        self._stop.set()
        self._pump.join(5)
        self.server.stop()
