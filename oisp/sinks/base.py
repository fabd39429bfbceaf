"""Sinks receive finished, redacted events. A sink failure is counted, never raised to capture."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

log = logging.getLogger("oisp.sinks")
_last: tuple[Any, bytes] | None = None  # the event last serialized, and its bytes


def event_json(event: dict[str, Any]) -> bytes:
    """The event as one line of JSON (no newline). FanOut hands the same event to each sink
    in turn, so the last one serialized is kept: the JSONL and OTLP sinks share one
    encoding. Sinks never change the events they are given."""
    global _last
    last = _last
    if last is not None and last[0] is event:
        return last[1]
    line = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
    _last = (event, line)
    return line


@dataclass
class SinkStats:
    emitted: int = 0  # handed to the destination successfully
    lost: int = 0  # given up on (after retries, or dropped because a queue was full)
    errors: int = 0  # failed attempts, including ones a retry later fixed
    last_error: str | None = None


class Sink(Protocol):
    name: str
    stats: SinkStats

    def emit(self, event: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class FanOut:
    """Hands each event to every sink; one sink's exception costs that sink one lost event."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)

    def emit(self, event: dict[str, Any]) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception as e:  # noqa: BLE001 - capture must go on whatever a sink does
                sink.stats.lost += 1
                sink.stats.errors += 1
                sink.stats.last_error = f"{type(e).__name__}: {e}"
                log.warning("sink %s lost an event: %s", sink.name, e)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                sink.stats.errors += 1
                sink.stats.last_error = f"{type(e).__name__}: {e}"

    def report(self) -> dict[str, dict[str, Any]]:
        return {s.name: vars(s.stats).copy() for s in self.sinks}
