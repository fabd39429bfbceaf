"""HTTP/1.1 against h11 as the reference: conversations are played between a real h11
client and a real h11 server; what each h11 peer parsed is what Http1Decoder, watching
the same bytes cut anywhere and interleaved in any order, must report."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from oisp.decode import Direction
from oisp.decode.http1 import Http1Decoder
from oisp.decode.messages import Body, End, RequestHead, ResponseHead

_names = st.sampled_from([b"Accept", b"x-trace-ID", b"User-Agent", b"X-Empty", b"Cookie"])
_values = st.binary(min_size=0, max_size=12).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E))
_pieces = st.lists(st.binary(min_size=0, max_size=40), max_size=4)  # body sent as several Data events


@st.composite
def _exchange(draw) -> dict:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT"]))
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
    return {
        "method": method,
        "target": draw(st.sampled_from([b"/", b"/v1/chat/completions", b"/api?q=1&x=%20"])),
        "headers": draw(st.lists(st.tuples(_names, _values), max_size=3)),
        "req_framing": draw(st.sampled_from(["length", "chunked", "none"])),
        "req_body": draw(_pieces),
        "informational": draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)),
        "status": status,
        "resp_framing": draw(st.sampled_from(["length", "chunked"])),
        "resp_body": draw(_pieces) if method != b"HEAD" and status not in (204, 304) else [],
        "head_length": draw(st.integers(0, 99)),  # a HEAD/304 response may announce a length it does not send
        "extensions": draw(st.booleans()),
        "trailers": draw(st.lists(st.tuples(st.sampled_from([b"X-Checksum", b"Server-Timing"]), _values), max_size=2)),
        "close": draw(st.booleans()) and draw(st.booleans()),
    }


def _send(conn: h11.Connection, event, extensions: bool) -> bytes:
    parts = conn.send_with_data_passthrough(event) or []
    chunk_size_line = parts and parts[0].endswith(b"\r\n") and parts[0][:-2].isalnum()
    if extensions and chunk_size_line and isinstance(event, (h11.Data, h11.EndOfMessage)):
        parts[0] = parts[0][:-2] + b';ext="x";n\r\n'  # a chunk-size line, given extensions h11 never writes
    return b"".join(parts)


def _body(conn: h11.Connection, pieces: list[bytes], framing: str, trailers: list, extensions: bool) -> bytes:
    out = b"".join(_send(conn, h11.Data(data=p), extensions) for p in pieces)
    return out + _send(conn, h11.EndOfMessage(headers=trailers if framing == "chunked" else []), extensions)


def _framing_headers(framing: str, pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
    if framing == "chunked":
        return [(b"Transfer-Encoding", b"chunked")]
    return [(b"Content-Length", str(sum(map(len, pieces))).encode())] if framing == "length" else []


def _parsed(conn: h11.Connection, data: bytes) -> list:
    conn.receive_data(data)
    events = []
    while (ev := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        events.append(ev)
    return events


def _play(exchanges: list[dict]) -> tuple[bytes, bytes, list]:
    """Run the conversation between h11 peers: the two byte streams and the messages they parsed."""
    client, server = h11.Connection(h11.CLIENT), h11.Connection(h11.SERVER)
    sent, answered, expected = b"", b"", []
    for stream, ex in enumerate(exchanges):
        connection = [(b"Connection", b"close")] if ex["close"] else []
        headers = [(b"Host", b"api.example"), *ex["headers"], *connection, *_framing_headers(ex["req_framing"], ex["req_body"])]
        pieces = ex["req_body"] if ex["req_framing"] != "none" else []
        wire = _send(client, h11.Request(method=ex["method"], target=ex["target"], headers=headers), False)
        wire += _body(client, pieces, ex["req_framing"], ex["trailers"], ex["extensions"])
        sent += wire
        for ev in _parsed(server, wire):
            if isinstance(ev, h11.Request):
                hs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
                expected.append(RequestHead(stream, ev.method.decode(), ev.target.decode(), "api.example", hs, "1.1", 1.0))
            elif isinstance(ev, h11.Data):
                expected.append(Body(stream, Direction.REQUEST, bytes(ev.data), 1.0))
            elif isinstance(ev, h11.EndOfMessage):
                expected.append(End(stream, Direction.REQUEST, 1.0))
        wire = b"".join(_send(server, h11.InformationalResponse(status_code=s, headers=[]), False) for s in ex["informational"])
        framing = ex["resp_framing"]
        if ex["method"] == b"HEAD" or ex["status"] == 304:
            framing, resp_headers = "none", [(b"Content-Length", str(ex["head_length"]).encode())]
        elif ex["status"] == 204:
            framing, resp_headers = "none", []
        else:
            resp_headers = _framing_headers(framing, ex["resp_body"])
        wire += _send(server,
                      h11.Response(status_code=ex["status"], headers=[(b"Content-Type", b"application/json"), *resp_headers]),
                      False)
        wire += _body(server, ex["resp_body"], framing, ex["trailers"], ex["extensions"])
        answered += wire
        for ev in _parsed(client, wire):
            if isinstance(ev, h11.Response):
                hs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
                expected.append(ResponseHead(stream, ev.status_code, hs, 1.0))
            elif isinstance(ev, h11.Data):
                expected.append(Body(stream, Direction.RESPONSE, bytes(ev.data), 1.0))
            elif isinstance(ev, h11.EndOfMessage):
                expected.append(End(stream, Direction.RESPONSE, 1.0))
        if client.our_state is not h11.DONE or server.our_state is not h11.DONE:
            break  # Connection: close ended the conversation
        client.start_next_cycle()
        server.start_next_cycle()
    return sent, answered, expected


def _merged(messages: list) -> list:
    """Adjacent Body pieces of one message joined: how a body is cut into pieces depends on the feeds."""
    out: list = []
    for m in messages:
        if (isinstance(m, Body) and out and isinstance(out[-1], Body)
                and (out[-1].stream, out[-1].direction) == (m.stream, m.direction)):
            out[-1] = Body(m.stream, m.direction, out[-1].data + m.data, m.ts)
        elif not (isinstance(m, Body) and not m.data):
            out.append(m)
    return out


def _per_message(messages: list) -> dict:
    by: dict = {}
    for m in messages:
        direction = (Direction.REQUEST if isinstance(m, RequestHead)
                     else Direction.RESPONSE if isinstance(m, ResponseHead) else m.direction)
        by.setdefault((m.stream, direction), []).append(m)
    return {k: _merged(v) for k, v in by.items()}


@settings(max_examples=300, deadline=None)
@given(st.lists(_exchange(), min_size=1, max_size=4), st.data())
def test_matches_h11_peers_whatever_the_cuts_and_interleaving(exchanges: list[dict], data) -> None:
    sent, answered, expected = _play(exchanges)
    feeds = []
    for direction, wire in ((Direction.REQUEST, sent), (Direction.RESPONSE, answered)):
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12), label=f"{direction.name} cuts"))
        bounds = [0, *cuts, len(wire)]
        feeds.append([(direction, wire[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a])
    requests, responses = feeds
    order = data.draw(st.lists(st.booleans(), min_size=len(requests) + len(responses), max_size=len(requests) + len(responses)),
                      label="interleaving")
    decoder, got = Http1Decoder(), []
    for take_request in order:
        queue = requests if (take_request and requests) or not responses else responses
        direction, piece = queue.pop(0)
        got += decoder.feed(direction, piece, 1.0)
    got += decoder.close(1.0)
    assert _per_message(got) == _per_message(expected)
    # Streams come in order, and each message's pieces in order: head, body, end.
    assert [m.stream for m in got if isinstance(m, RequestHead)] == list(range(len({m.stream for m in expected})))
    for pieces in _per_message(got).values():
        assert isinstance(pieces[0], (RequestHead, ResponseHead))
        assert isinstance(pieces[-1], End)
