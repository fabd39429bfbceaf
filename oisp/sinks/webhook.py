"""HTTP webhook sink: events batched as a JSON array, POSTed from a background thread,
retried with exponential back-off. ``emit`` never blocks on the network: when the
queue is full the event is counted lost."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from oisp.sinks.base import SinkStats, log

_STOP = object()


class WebhookSink:
    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 100,
        flush_interval: float = 1.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 10.0,
        max_queue: int = 10_000,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.stats = SinkStats()
        self.batches_sent = 0
        self._queue: queue.Queue[Any] = queue.Queue(max_queue)
        self._flush_now = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oisp-webhook", daemon=True)
        self._thread.start()

    def emit(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.stats.lost += 1

    def flush(self) -> None:
        self._flush_now.set()

    def close(self, timeout: float | None = None) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        batch: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.flush_interval
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, min(deadline - time.monotonic(), 0.1)))
            except queue.Empty:
                item = None
            if item is _STOP:
                if batch:
                    self._send(batch)
                return
            if item is not None:
                batch.append(item)
            due = time.monotonic() >= deadline or self._flush_now.is_set()
            if batch and (len(batch) >= self.batch_size or due):
                self._flush_now.clear()
                self._send(batch)
                batch = []
            if due:
                deadline = time.monotonic() + self.flush_interval

    def _send(self, batch: list[dict[str, Any]]) -> None:
        body = json.dumps(batch, ensure_ascii=False).encode()
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read()
                self.stats.emitted += len(batch)
                self.batches_sent += 1
                return
            except (urllib.error.URLError, OSError, ValueError) as e:
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                if attempt < self.max_retries:
                    time.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
        self.stats.lost += len(batch)
        log.warning("webhook %s: %d events lost after %d attempts (%s)", self.url, len(batch), self.max_retries + 1, self.stats.last_error)
