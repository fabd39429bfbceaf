"""HTTP/2: every provider fixture on one connection, streams interleaved frame by frame.
The frames are produced by the h2 library, an encoder independent of our hyperframe/hpack reader."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import http2_conversation, load_cases, validate

from oisp.decode import Direction, FlowContext, FlowDecoder, ResponseComplete
from oisp.events import FlowRecorder

TLS_CASES = [c for c in load_cases() if c.tls]


def feed_all(target, convo, step: int | None = None) -> list:
    out = []
    for n, (label, data) in enumerate(convo):
        direction = Direction.REQUEST if label == "req" else Direction.RESPONSE
        pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
        for p in pieces:
            out += target.feed(direction, p, 10.0 + n * 0.001)
    return out + target.close(20.0)


def test_concurrent_streams_each_yield_their_pair() -> None:
    convo = http2_conversation(TLS_CASES)
    rec = FlowRecorder(FlowContext(("10.0.0.2", 50000), ("10.9.9.9", 443), 9.0, sni=None, alpn="h2", tls_version="TLSv1.3"))
    events = feed_all(rec, convo)
    validate(events)
    assert rec.stats.decode_errors == 0
    assert rec.stats.protocol == "HTTP/2"
    responses = [e["data"] for e in events if e["event_type"] == "ai.response"]
    assert len(responses) == len(TLS_CASES)
    # Requests were sent in case order, so ai.request events come out in that order too.
    case_of = {e["data"]["request_id"]: c for e, c in zip([e for e in events if e["event_type"] == "ai.request"], TLS_CASES)}
    for resp in responses:
        case = case_of[resp["request_id"]]
        text = resp["choices"][0]["message"]["content"] if resp.get("choices") else ""
        assert text == case.expected["text"]
        assert resp.get("usage", {}) == case.expected["usage"]
        assert resp.get("finish_reason") == case.expected["finish_reason"]


def test_h2_detected_from_preface_without_alpn_and_cut_small() -> None:
    convo = http2_conversation(TLS_CASES[:3])
    d = FlowDecoder(FlowContext(("10.0.0.2", 50000), ("10.9.9.9", 443), 9.0))
    whole = [r for r in feed_all(d, convo) if isinstance(r, ResponseComplete)]
    d2 = FlowDecoder(FlowContext(("10.0.0.2", 50000), ("10.9.9.9", 443), 9.0))
    cut = [r for r in feed_all(d2, convo, step=7) if isinstance(r, ResponseComplete)]
    assert d.stats.protocol == "HTTP/2"
    assert len(whole) == 3
    assert ([(r.exchange.stream, r.exchange.ai_response.text) for r in whole]
            == [(r.exchange.stream, r.exchange.ai_response.text) for r in cut])
