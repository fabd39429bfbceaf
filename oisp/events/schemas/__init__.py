"""The JSON Schemas shipped with the package, one per event type (draft 2020-12).

Each file is self-contained: the OISP 0.1 envelope plus that type's ``data``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

EVENT_TYPES = ("ai.request", "ai.response", "ai.streaming_chunk", "network.connect", "network.flow")


@lru_cache(maxsize=None)
def load_schema(event_type: str) -> dict[str, Any]:
    if event_type not in EVENT_TYPES:
        raise KeyError(f"no schema for event type {event_type!r}")
    text = resources.files("oisp.events.schemas").joinpath(f"{event_type}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)
