"""HTTP webhook sink: events batched as a JSON array, POSTed from a background thread,
retried with exponential back-off. ``emit`` never blocks on the network: when the
queue is full the event is counted lost. ``close`` waits a bounded time for what is
queued; what has not gone by then is counted lost.

A webhook URL often carries its token (in the path, the query or user:password@),
so it is never logged or shown whole: only scheme://host[:port]. And since a
command line is visible to every user (`ps`), the URL can come from the
OISP_WEBHOOK_URL variable or from a file (``--webhook @FILE``) instead.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from oisp.sinks.base import SinkStats, log

URL_ENV = "OISP_WEBHOOK_URL"
CLOSE_TIMEOUT = 5.0  # seconds close() waits for queued events by default
_STOP = object()


def webhook_url(option: str | None) -> str | None:
    """The URL from ``--webhook`` (a URL, or @FILE holding one), else from $OISP_WEBHOOK_URL."""
    if option and option.startswith("@"):
        return Path(option[1:]).read_text(encoding="utf-8").strip() or None
    if option:
        if _has_secret_parts(option):
            print(f"oisp: warning: the webhook URL on the command line is visible to every user (ps); "
                  f"use {URL_ENV}=URL or --webhook @FILE", file=sys.stderr)
        return option
    return os.environ.get(URL_ENV) or None


def display_url(url: str) -> str:
    """What may be shown of a webhook URL: scheme://host[:port], never user info, path or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable webhook URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme or '?'}://{host}{port}"


def _has_secret_parts(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return True
    return bool(parts.username or parts.password or parts.query or parts.path.strip("/"))


def _secret_parts(url: str) -> list[str]:
    """Pieces of the URL that must not appear in a message, longest first."""
    try:
        parts = urlsplit(url)
        pieces = [url, parts.netloc if "@" in parts.netloc else "", parts.path, parts.query,
                  parts.username or "", parts.password or ""]
    except ValueError:
        pieces = [url]
    return sorted({p for p in pieces if len(p) > 1}, key=len, reverse=True)


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
        self.display_url = display_url(url)
        self._hidden = _secret_parts(url)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.stats = SinkStats()
        self.batches_sent = 0
        self._accepted = 0
        self._lost_of_accepted = 0  # lost after being queued (a full queue's losses never were)
        self._lock = threading.Lock()  # stats are updated by the sender and, on an abandoned close, by close()
        self._abandoned = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue(max_queue)
        self._flush_now = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oisp-webhook", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"WebhookSink({self.display_url})"

    def emit(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self.stats.lost += 1
        else:
            with self._lock:
                self._accepted += 1

    def flush(self) -> None:
        self._flush_now.set()

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Send what is queued, waiting at most `timeout` seconds (None: as long as it takes);
        whatever has not been delivered or given up on by then is counted lost."""
        if self._abandoned.is_set():
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # the queue may be full: the stop marker waits for room, within the bound
            try:
                self._queue.put(_STOP, timeout=0.05)
                break
            except queue.Full:
                if deadline is not None and time.monotonic() >= deadline:
                    break
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            with self._lock:
                self._abandoned.set()  # the sender may still finish a request; it no longer counts
                left = self._accepted - self.stats.emitted - self._lost_of_accepted
                self.stats.lost += left
                self._lost_of_accepted += left
            log.warning("webhook %s: %d events not delivered within %.1f s of closing", self.display_url, left,
                        timeout)

    def _run(self) -> None:
        batch: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.flush_interval
        while not self._abandoned.is_set():
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
                with self._lock:
                    if not self._abandoned.is_set():
                        self.stats.emitted += len(batch)
                        self.batches_sent += 1
                return
            except (urllib.error.URLError, OSError, ValueError) as e:
                with self._lock:
                    self.stats.errors += 1
                    self.stats.last_error = self._hide(f"{type(e).__name__}: {e}")
                if attempt < self.max_retries and self._abandoned.wait(delay):
                    return  # closed while backing off: close() counted the batch
                delay = min(delay * 2, self.max_backoff)
        with self._lock:
            if self._abandoned.is_set():
                return
            self.stats.lost += len(batch)
            self._lost_of_accepted += len(batch)
        log.warning("webhook %s: %d events lost after %d attempts (%s)", self.display_url, len(batch),
                    self.max_retries + 1, self.stats.last_error)

    def _hide(self, message: str) -> str:
        """An error message without the URL's secret parts (urllib quotes the URL in some errors)."""
        for piece in self._hidden:
            message = message.replace(piece, "…")
        return message
