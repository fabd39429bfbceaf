"""The OTLP sink as the sensor sees it: a pipe to the exporter's own process.

The exporter (spans, log records, metrics through the OpenTelemetry SDK) costs several
times what the sensor spends on a small request, and in the sensor's process it also
held the GIL the proxy and the reflector need. So it runs in a child process
(oisp/sinks/otlp/child.py), and here ``emit_line`` only queues the event's JSON line
(the one FanOut made once for every line-based sink, oisp.sinks.base.encode_event)
for a writer thread, which sends what has gathered every WRITE_INTERVAL. A full queue,
or a child that is gone, costs the event, counted. The child's counts come back on its
stdout and are this sink's ``stats``, with the losses on this side added.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import oisp

from oisp.sinks.base import encode_event
from oisp.sinks.otlp.config import Endpoint
from oisp.sinks.otlp.exporter import CLOSE_TIMEOUT, OtlpStats

QUEUE = 10_000  # lines waiting for the writer
WRITE_INTERVAL = 0.02  # seconds between the writer's rounds
PIPE_FULL = "the queue to the OTLP exporter process was full (it took the events slower than they came)"
UNREPORTED = "the OTLP exporter process ended before it reported them"


class OtlpSink:
    name = "otlp"

    def __init__(self, target: Endpoint, *, content: bool = False, metric_interval_ms: float | None = None,
                 close_timeout: float = CLOSE_TIMEOUT) -> None:
        self.target = target
        self.display_url = target.shown
        self.content = content
        self.stats = OtlpStats()
        self._close_timeout = close_timeout
        self._lock = threading.Lock()
        self._own_lost = 0  # dropped on this side: queue full, or the child gone
        self._sent = 0  # events written to the child
        self._child: dict[str, Any] = {}
        self._lines: deque[bytes] = deque()  # appended by emit, taken by the writer (deque ops are atomic)
        self._stop = threading.Event()
        self._closed = False
        # stderr is the sensor's: the child's warnings (endpoint unreachable, export failing) reach the user.
        # The child imports the same oisp as this process, wherever that was loaded from.
        root = str(Path(oisp.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "oisp.sinks.otlp.child"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, close_fds=True, env=env)
        settings = {"protocol": target.protocol, "base": target.base, "content": content,
                    "metric_interval_ms": metric_interval_ms, "close_timeout": max(0.5, close_timeout - 0.5)}
        self._proc.stdin.write(json.dumps(settings).encode() + b"\n")  # the base URL stays off the command line
        self._proc.stdin.flush()  # the child starts exporting (health, the reachability check) before any event
        self._writer = threading.Thread(target=self._write, name="oisp-otlp-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, name="oisp-otlp-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    def __repr__(self) -> str:
        return f"OtlpSink({self.target.protocol} {self.display_url})"

    def emit(self, event: dict[str, Any]) -> None:
        self.emit_line(event, encode_event(event))

    def emit_line(self, event: dict[str, Any], line: bytes) -> None:
        """FanOut's call, with the line it made once for every line-based sink."""
        # A deque and no wake-up: a writer woken per event cost the sensor more than the rest of this.
        if len(self._lines) >= QUEUE:
            with self._lock:
                self._own_lost += 1
                self.stats.last_error = PIPE_FULL
                self._update()
            return
        self._lines.append(b"E" + line + b"\n")

    def flush(self) -> None:
        """Nothing to do: the writer sends as soon as it has lines, the child batches."""

    def set_health(self, health: dict[str, Any]) -> None:
        """The recorder's counters, for the oisp.* metrics (dropped if the queue is full: the next one follows)."""
        if len(self._lines) < QUEUE:
            self._lines.append(b"H" + json.dumps(health).encode() + b"\n")

    def _write(self) -> None:
        """Every WRITE_INTERVAL, whatever has queued goes to the child in one write."""
        stream = self._proc.stdin
        alive = True
        while True:
            stop = self._stop.wait(WRITE_INTERVAL)
            lines = []
            while self._lines:
                lines.append(self._lines.popleft())
            events = sum(1 for line in lines if line[:1] == b"E")
            if alive and lines:
                try:
                    stream.write(b"".join(lines))
                    stream.flush()
                    with self._lock:
                        self._sent += events
                except (BrokenPipeError, OSError, ValueError):
                    alive = False
            if not alive and events:
                with self._lock:
                    self._own_lost += events
                    self.stats.last_error = f"the OTLP exporter process ended ({self._proc.poll()})"
                    self._update()
            if stop and not self._lines:
                try:
                    stream.close()
                except OSError:
                    pass
                return

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                stats = json.loads(line)["stats"]
            except (ValueError, KeyError, TypeError):
                continue
            with self._lock:
                if stats.get("last_error") and stats["last_error"] != self._child.get("last_error"):
                    self.stats.last_error = stats["last_error"]  # the newest reason, the child's or this side's
                self._child = stats
                self._update()

    def _update(self) -> None:
        """stats = the child's counts plus this side's losses (call with the lock held); the
        last_error is set where a loss happens, here or in the child (_read)."""
        child = self._child
        for key in ("emitted", "spans_exported", "spans_lost", "metric_exports_failed", "errors"):
            setattr(self.stats, key, int(child.get(key, 0)))
        self.stats.lost = int(child.get("lost", 0)) + self._own_lost

    def close(self, timeout: float | None = None) -> None:
        """Hand over what is queued and let the child export it, waiting at most ``timeout``
        seconds (default: the close timeout given at start); what was not delivered by
        then is counted lost."""
        if self._closed:
            return
        self._closed = True
        timeout = self._close_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._writer.join(max(0.0, deadline - time.monotonic()))
        try:
            self._proc.wait(max(0.1, deadline - time.monotonic()) + 1.0)  # the child keeps its own bound
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(2.0)
        with self._lock:
            never_written = sum(1 for line in self._lines if line[:1] == b"E")
            accounted = int(self._child.get("emitted", 0)) + int(self._child.get("lost", 0))
            unreported = max(0, self._sent - accounted)  # written, never reported back
            self._own_lost += never_written + unreported
            if never_written:
                self.stats.last_error = f"the OTLP exporter process ended ({self._proc.poll()})"
            elif unreported:
                self.stats.last_error = UNREPORTED
            self._update()
