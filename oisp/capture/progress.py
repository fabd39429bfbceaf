"""A one-line live status on stderr, redrawn in place at most a few times a second."""

from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """`update()` is cheap to call every loop; it redraws every `interval` seconds."""

    def __init__(self, stream=None, *, enabled: bool | None = None, interval: float = 0.5):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self._last_draw = 0.0
        self._last_packets = 0
        self._width = 0

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self._last_draw >= self.interval

    def draw(self, packets: int, nbytes: int, drops: int) -> None:
        now = time.monotonic()
        elapsed = now - self._last_draw if self._last_draw else 0.0
        rate = (packets - self._last_packets) / elapsed if elapsed > 0 else 0.0
        self._last_draw, self._last_packets = now, packets
        line = f"{packets:,} packets  {human_bytes(nbytes)}  {drops:,} dropped  {rate:,.0f} packets/s"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def finish(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
