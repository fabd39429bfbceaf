"""Sinks receive finished, redacted events. A sink failure is counted, never raised to capture."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

log = logging.getLogger("oisp.sinks")


@dataclass
class SinkStats:
    emitted: int = 0  # handed to the destination successfully
    lost: int = 0  # given up on (after retries, or dropped because a queue was full)
    errors: int = 0  # failed attempts, including ones a retry later fixed
    last_error: str | None = None


def encode_event(event: dict[str, Any]) -> bytes:
    """An event as one line of compact JSON (no newline; CR and LF inside strings are escaped).

    The one encoding every line-based sink writes, so FanOut makes it once per event for all
    of them (at a few tens of microseconds per event it is most of what a sink costs)."""
    try:
        return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate (a client's JSON escape): escape all non-ASCII instead
        return json.dumps(event, separators=(",", ":")).encode()


class Sink(Protocol):
    """A sink may also have ``emit_line(event, line)``, which FanOut calls instead of ``emit``
    with the event's :func:`encode_event` line, made once for all such sinks."""

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
        line = None
        for sink in self.sinks:
            try:
                emit_line = getattr(sink, "emit_line", None)
                if emit_line is not None:
                    if line is None:
                        line = encode_event(event)
                    emit_line(event, line)
                else:
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
