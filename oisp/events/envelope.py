"""The OISP event envelope (oisp_version 0.1) around each event's ``data``."""

from __future__ import annotations

import datetime as _dt
import platform
import socket
from functools import lru_cache
from typing import Any

from oisp import __version__
from oisp.events.ulid import new_ulid

OISP_VERSION = "0.1"
COLLECTOR = "oisp"


def rfc3339(ts: float) -> str:
    """UTC, microseconds, 'Z' suffix: 2025-12-22T20:15:05.123456Z."""
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@lru_cache(maxsize=1)
def host_info() -> dict[str, str]:
    return {"hostname": socket.gethostname(), "os": platform.system().lower(), "arch": platform.machine().lower()}


def make_event(
    event_type: str,
    data: dict[str, Any],
    ts: float,
    *,
    process: dict[str, Any] | None = None,
    capture_method: str = "mitm_proxy",
    capture_point: str | None = None,
    level: str = "high",
    completeness: str = "full",
    reasons: list[str] | None = None,
    extra_confidence: dict[str, Any] | None = None,
) -> dict[str, Any]:
    source: dict[str, Any] = {"collector": COLLECTOR, "collector_version": __version__, "capture_method": capture_method}
    if capture_point:
        source["capture_point"] = capture_point
    confidence: dict[str, Any] = {"level": level, "completeness": completeness}
    if reasons:
        confidence["reasons"] = reasons
    confidence.update(extra_confidence or {})
    event: dict[str, Any] = {
        "oisp_version": OISP_VERSION,
        "event_id": new_ulid(ts),
        "event_type": event_type,
        "ts": rfc3339(ts),
        "host": host_info(),
        "source": source,
        "confidence": confidence,
        "data": data,
    }
    if process:
        event["process"] = process
    return event
