"""The OTLP sink's own process: `python -m oisp.sinks.otlp.child`, started by OtlpSink.

Reads its settings (one JSON line), then lines of ``E<event JSON>`` and ``H<health
JSON>`` on stdin, and drives an :class:`OtlpExporter` with them; writes the exporter's
counts as JSON lines on stdout (every STATS_INTERVAL while they change, and once more
at the end). Its end of input is the sensor's "close": it exports what it holds within
the close timeout, reports, and exits. It ignores SIGINT, which a terminal sends to
the sensor's whole process group: the sensor decides when it stops, by closing the pipe.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

STATS_INTERVAL = 0.25


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
    for line in stdin:
        kind, payload = line[:1], line[1:]
        try:
            if kind == b"E":
                exporter.emit(json.loads(payload))
            elif kind == b"H":
                exporter.set_health(json.loads(payload))
        except ValueError:  # a torn line (the sensor died mid-write): counted, never fatal
            exporter.stats.lost += 1
            exporter.stats.errors += 1
    exporter.close(timeout=float(settings.get("close_timeout", 5.0)))
    done.set()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
