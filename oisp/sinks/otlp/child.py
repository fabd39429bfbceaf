"""The OTLP sink's own process: `python -m oisp.sinks.otlp.child`, started by OtlpSink.

Reads its settings (one JSON line), then lines of ``E<event JSON>`` and ``H<health
JSON>`` on stdin, and drives an :class:`OtlpExporter` with them; writes the exporter's
counts as JSON lines on stdout (every STATS_INTERVAL while they change, and once more
at the end). Its end of input is the sensor's "close": it exports what it holds within
the close timeout, reports, and exits. It ignores SIGINT, which a terminal sends to
the sensor's whole process group: the sensor decides when it stops, by closing the pipe.

The pipe is read in chunks of what has arrived (the sensor writes every 20 ms), and the
events of one chunk go to the exporter as one batch, each with its line: decoding with
msgspec and one queue hand-off per chunk instead of per event halved what this process
spent before the exporter's own work (benchmarks/otlp_child_cost.py).
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import threading
from typing import BinaryIO, Iterator

import msgspec

STATS_INTERVAL = 0.25
# The SDK allocates some hundred objects per event, nearly all freed by reference counting;
# with the default threshold (700) the cyclic collector ran every few events. Start-up
# objects (modules, the SDK's providers) are frozen out of its reach; 11 % less CPU.
GC_THRESHOLD = (20_000, 50, 50)
READ = 1 << 20  # bytes taken from the pipe at once, at most
LINE_MAX = 256 << 20  # longer than any event the sensor writes (its bodies stop at 32 MiB): not read whole


def chunks(stream: BinaryIO) -> Iterator[list[bytes | None]]:
    """The complete lines of each read (without their newline), as they arrive. A line longer
    than LINE_MAX is given as None once its end arrives (its bytes were not kept). A last line
    with no newline (the sensor died mid-write) is given too, and fails to decode."""
    pending: list[bytes] = []  # the start of a line whose end has not arrived
    size = 0  # of that line so far
    while True:
        chunk = stream.read1(READ)
        if not chunk:
            if size:
                yield [b"".join(pending) if size <= LINE_MAX else None]
            return
        lines: list[bytes | None] = chunk.split(b"\n")
        tail = lines.pop()  # after the last newline: the start of the next line, or b""
        if lines and size:
            size += len(lines[0])
            lines[0] = b"".join(pending) + lines[0] if size <= LINE_MAX else None
            pending, size = [], 0
        if tail:
            size += len(tail)
            if size <= LINE_MAX:
                pending.append(tail)
            else:
                pending.clear()
        if lines:
            yield lines


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from oisp.sinks.otlp.config import Endpoint
    from oisp.sinks.otlp.exporter import OtlpExporter

    stdin, stdout = sys.stdin.buffer, sys.stdout
    first = stdin.readline()
    if not first:  # the sensor ended before it said anything
        return 0
    settings = json.loads(first)
    exporter = OtlpExporter(Endpoint(settings["protocol"], settings.get("base")), content=bool(settings.get("content")),
                            metric_interval_ms=settings.get("metric_interval_ms"))
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    lock = threading.Lock()

    def report() -> None:
        with lock:
            try:
                stdout.write(json.dumps({"stats": vars(exporter.stats)}) + "\n")
                stdout.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass  # the sensor is gone: what it held is still exported, nobody hears the counts

    done = threading.Event()

    def reporter() -> None:
        last = None
        while not done.wait(STATS_INTERVAL):
            now = dict(vars(exporter.stats))
            if now != last:
                report()
                last = now

    threading.Thread(target=reporter, name="oisp-otlp-stats", daemon=True).start()
    decode = msgspec.json.Decoder().decode
    for lines in chunks(stdin):
        batch, torn = [], 0
        for line in lines:
            if line is None:  # past LINE_MAX
                torn += 1
                continue
            kind, payload = line[:1], line[1:]
            try:
                if kind == b"E":
                    try:
                        batch.append((decode(payload), payload))
                    except msgspec.DecodeError:  # what msgspec refuses, e.g. a lone surrogate's escape
                        batch.append((json.loads(payload), payload))
                elif kind == b"H":
                    exporter.set_health(json.loads(payload))
            except ValueError:  # a torn line (the sensor died mid-write): counted, never fatal
                torn += 1
        if batch:
            exporter.emit_many(batch)
        if torn:
            exporter.count_unreadable(torn)
    exporter.close(timeout=float(settings.get("close_timeout", 5.0)))
    done.set()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
