"""Comparing two runs' OISP events."""

from __future__ import annotations


def normalise(events: list[dict]) -> list[dict]:
    """Events minus what is random by design (ULIDs); request ids are mapped to their order."""
    ids: dict[str, int] = {}
    out = []
    for ev in events:
        ev = {k: v for k, v in ev.items() if k != "event_id"}
        data = dict(ev["data"])
        if "request_id" in data:
            data["request_id"] = ids.setdefault(data["request_id"], len(ids))
        ev["data"] = data
        out.append(ev)
    return out
