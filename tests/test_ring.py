"""The receive ring's consumer side, without a handle."""

from __future__ import annotations

import threading
import time

import pytest

from oisp._native.ring import ReceiveRing


def test_a_consumer_that_asks_before_the_receiver_runs_waits():
    """Regression: take() used to return 'stopped' at once when the receiver thread had
    not been scheduled yet, which ended an `for batch in engine` loop before it began."""
    ring = ReceiveRing(0, 0, 0, 0, nslots=2)
    started = time.monotonic()
    assert ring.take(200) == -1
    assert time.monotonic() - started >= 0.15  # it waited for data, as asked


def test_a_stopped_ring_returns_at_once():
    """take(-1) waits for ever unless the ring is stopped: on a stopped ring it must return
    (judged by whether it returns at all, not by a wall-clock window a loaded machine misses)."""
    ring = ReceiveRing(0, 0, 0, 0, nslots=2)
    ring.stop()
    results: list[int] = []
    taker = threading.Thread(target=lambda: results.append(ring.take(-1)), daemon=True)
    taker.start()
    taker.join(10)
    assert not taker.is_alive()
    assert results == [-1]


def test_a_slot_the_consumer_does_not_hold_cannot_be_handed_back():
    """Regression: handing back a slot never taken pushed it on the free stack anyway; each
    one wrote past the stack's array (heap corruption) and later gave two batches one slot."""
    ring = ReceiveRing(0, 0, 0, 0, nslots=2)
    for hand_back in (ring.release_consumed, ring.release_dropped, ring.commit):
        with pytest.raises(ValueError, match="not held"):
            hand_back(1)
    assert ring.occupancy() == (0, 0)
    assert ring.releases == ring.consumed == ring.dropped_verdict == ring.sent == 0
    with pytest.raises(ValueError, match="no slot"):
        ring.release_dropped(2)
