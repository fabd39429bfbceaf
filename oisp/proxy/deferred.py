"""Decoding a relayed connection just after its bytes, never between them.

The relay forwards a chunk and then hands it on for decoding. Decoding at once
put it between a request and the first chunk of its answer: the ai.request
event takes ~0.4 ms to build, an SSE chunk ~70 µs, and the upstream's reply
waited behind them (time to first chunk +1.2 ms through the proxy; +0.3 ms with
decoding off). So the bytes are queued, stamped with their arrival time, and
fed to the recorder `delay` seconds later: by then the answer has usually been
relayed, and the events carry the same timestamps as before.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from oisp.decode import Direction
from oisp.events import FlowRecorder

DECODE_DELAY = 0.001


class DeferredFeed:
    """`add(direction, data)` queues; the recorder's events go to `emit` once the delay has passed."""

    def __init__(self, recorder: FlowRecorder, emit: Callable[[list], None], delay: float = DECODE_DELAY):
        self.recorder, self.emit, self.delay = recorder, emit, delay
        self._loop = asyncio.get_running_loop()
        self._pending: list[tuple[Direction, bytes, float]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, direction: Direction, data: bytes, ts: float | None = None) -> None:
        """Queue `data`, stamped `ts` (its arrival; default now)."""
        self._pending.append((direction, data, time.time() if ts is None else ts))
        if self._timer is None:
            self._timer = self._loop.call_later(self.delay, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        for direction, data, ts in pending:
            self.emit(self.recorder.feed(direction, data, ts))

    def close(self) -> None:
        """Feed what is queued, then end the recorder."""
        self.flush()
        self.emit(self.recorder.close(time.time()))
