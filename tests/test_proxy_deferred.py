"""Decoding after relaying: events come a moment later, timed as the bytes arrived."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from oisp.decode import Direction
from oisp.events import FlowRecorder
from oisp.proxy.deferred import DeferredFeed

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import context, http1_request, http1_response, load_cases, pair

CASE = next(c for c in load_cases() if c.status == 200 and not c.expected["streaming"])


def test_events_follow_the_delay_and_keep_the_arrival_times():
    async def go():
        emitted: list[dict] = []
        feed = DeferredFeed(FlowRecorder(context(CASE)), emitted.extend, delay=0.2)
        sent = time.time()
        feed.add(Direction.REQUEST, http1_request(CASE))
        assert emitted == []  # nothing decoded in the relay's callback
        await asyncio.sleep(0.3)
        assert [e["event_type"] for e in emitted][-1] == "ai.request"
        response = http1_response(CASE)
        feed.add(Direction.RESPONSE, response[:10])
        await asyncio.sleep(0.05)  # not decoded yet ...
        last = time.time()
        feed.add(Direction.RESPONSE, response[10:])
        feed.close()  # ... all decoded now, with no wait
        return emitted, (last - sent) * 1000

    emitted, arrival_ms = asyncio.run(go())
    request, response = pair(emitted)
    # The latency runs from the request's arrival to the last byte's (0.3 + 0.05 s at least,
    # as long as the loop took), not between the moments the decoder saw them (150 ms).
    assert arrival_ms >= 340
    assert abs(response["latency_ms"] - arrival_ms) < 20, (response["latency_ms"], arrival_ms)
    assert response["choices"][0]["message"]["content"] == CASE.expected["text"]
    assert emitted[-1]["event_type"] == "network.flow"
