"""Cut-invariance and garbage: the same bytes cut anywhere give the same events;
random bytes give a counted decode error and never an exception or a hang."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import Case, context, http1_request, http1_response, load_cases  # noqa: E402

from oisp.decode import Direction, FlowContext, FlowDecoder  # noqa: E402
from oisp.events import FlowRecorder  # noqa: E402

CASES = load_cases()
VOLATILE = ("event_id", "request_id")


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


def run(case: Case, req_cuts: list[int], resp_cuts: list[int]) -> list[dict]:
    rec = FlowRecorder(context(case), streaming_chunks=True)
    request, response = http1_request(case), http1_response(case)
    events = []
    for data, cuts, direction in ((request, req_cuts, Direction.REQUEST), (response, resp_cuts, Direction.RESPONSE)):
        bounds = [0, *sorted(cuts), len(data)]
        for a, b in zip(bounds, bounds[1:]):
            events += rec.feed(direction, data[a:b], 5.0)
    return normalise(events + rec.close(6.0))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_single_cut_position_gives_the_same_events(case: Case) -> None:
    reference = run(case, [], [])
    assert any(e["event_type"] == "ai.response" for e in reference)
    request_len, response_len = len(http1_request(case)), len(http1_response(case))
    for i in range(1, request_len):
        assert run(case, [i], []) == reference, f"request cut at {i}"
    for i in range(1, response_len):
        assert run(case, [], [i]) == reference, f"response cut at {i}"


@pytest.mark.parametrize("seed", range(20))
def test_random_multi_cuts(seed: int) -> None:
    rng = random.Random(seed)
    case = CASES[seed % len(CASES)]
    reference = run(case, [], [])
    rl, pl = len(http1_request(case)), len(http1_response(case))
    assert run(case, rng.sample(range(1, rl), min(rl - 1, 25)), rng.sample(range(1, pl), min(pl - 1, 60))) == reference


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=64)), max_size=20))
def test_garbage_never_raises(chunks: list[tuple[bool, bytes]]) -> None:
    d = FlowDecoder(FlowContext(("1.1.1.1", 1), ("2.2.2.2", 443), 0.0, sni="api.openai.com"))
    for is_req, data in chunks:
        d.feed(Direction.REQUEST if is_req else Direction.RESPONSE, data, 1.0)
    d.close(2.0)
    assert d.stats.decode_errors in (0, 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=16))
def test_corrupted_valid_stream_is_counted_not_raised(pos: int, junk: bytes) -> None:
    case = CASES[pos % len(CASES)]
    response = http1_response(case)
    at = pos % len(response)
    rec = FlowRecorder(context(case))
    rec.feed(Direction.REQUEST, http1_request(case), 1.0)
    rec.feed(Direction.RESPONSE, response[:at] + junk + response[at:], 2.0)
    rec.close(3.0)
    assert rec.stats.decode_errors >= 0  # reaching here without an exception is the property


def test_http_garbage_counts_exactly_one_error() -> None:
    d = FlowDecoder(FlowContext(("1.1.1.1", 1), ("2.2.2.2", 80), 0.0))
    assert d.feed(Direction.REQUEST, b"\x00\x01\x02 not http \r\n\r\n" * 50, 1.0) == []
    assert d.feed(Direction.RESPONSE, b"more garbage", 1.0) == []
    d.close(2.0)
    assert d.stats.decode_errors == 1
