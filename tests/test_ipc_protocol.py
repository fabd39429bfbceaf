"""The IPC protocol (oisp.ipc.protocol), sans-IO: round trips of every message, every
refusal, and fuzzed frames that must end in a message or the protocol's own error,
with the decoder's buffer bounded."""

from __future__ import annotations

import json
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from oisp.ipc import protocol as p

INFO = p.FlowInfo(client_addr="10.200.0.1", client_port=40000, server_addr="2001:db8::5", server_port=443,
                  created=1764760000.25, token=7, pid=4242, process_name="python3", process_created=1764759990.5)
CLIENT_SAMPLES = [
    p.Hello(versions=(2,), software="oisp 0.1.0"),
    p.FlowLookup(id=1, peer_addr="::ffff:10.0.0.2", peer_port=443, proxy_port=8443, hold=False, name_owner=True),
    p.FlowRelease(token=7),
    p.PortRegister(id=2, port=61000, family=6),
    p.PortUnregister(port=61000, family=4),
    p.CountersGet(id=2**32 - 1),
    p.Goodbye(reason="stopping"),
]
SERVER_SAMPLES = [
    p.Welcome(version=2, software="oisp 0.1.0"),
    p.FlowAnswer(id=1, flow=INFO),
    p.FlowAnswer(id=1, flow=None),
    p.FlowAnswer(id=9, flow=p.FlowInfo(client_addr="::1", client_port=1, server_addr="::1", server_port=2, created=0.0)),
    p.Ok(id=2),
    p.Counters(id=3, values={"reflector.engine.dropped": 5, "flows": 0}),
    p.Note(text="DNS answers are not watched: no handle", level="degraded", ts=1.0),
    p.Error(code="internal", message="lookup failed", id=4),
    p.Error(code="busy"),
    p.Goodbye(),
]


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def refused(side: str, data: bytes) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as caught:
        p.Decoder(side).feed(data)
    return caught.value


@pytest.mark.parametrize("message", CLIENT_SAMPLES, ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message):
    assert p.Decoder("server").feed(p.encode(message)) == [message]


@pytest.mark.parametrize("message", SERVER_SAMPLES, ids=lambda m: type(m).__name__)
def test_server_messages_round_trip(message):
    assert p.Decoder("client").feed(p.encode(message)) == [message]


def test_wire_form_is_the_documented_json():
    """docs/ipc.md shows this frame; an independent JSON parser reads it the same."""
    data = p.encode(p.FlowLookup(id=5, peer_addr="10.0.0.2", peer_port=51000, proxy_port=8443,
                                 upstream=p.PortRef(port=40000, family=4)))
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert data[:4].hex() == "0000009c"
    assert json.loads(data[4:]) == {"type": "flow.lookup", "id": 5, "peer_addr": "10.0.0.2", "peer_port": 51000,
                                    "proxy_port": 8443, "hold": True, "name_owner": False,
                                    "upstream": {"port": 40000, "family": 4}}


def test_the_example_in_docs_ipc_md_is_what_the_encoder_writes():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "ipc.md").read_text()
    line = next(line for line in doc.splitlines() if line.startswith("00 00 00 "))
    prefix, body = bytes.fromhex(line[:11]), line[12:].encode()
    assert prefix + body == p.encode(p.FlowLookup(id=5, peer_addr="10.0.0.2", peer_port=51000, proxy_port=8443,
                                                  upstream=p.PortRef(port=40000, family=4)))
    assert p.Decoder("server").feed(prefix + body)[0].peer_port == 51000


@given(st.data())
@settings(max_examples=50, deadline=None)
def test_any_split_gives_the_same_messages(data):
    stream = b"".join(p.encode(m) for m in SERVER_SAMPLES)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder, out, last = p.Decoder("client"), [], 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert out == SERVER_SAMPLES
    assert decoder.buffered == 0


@pytest.mark.parametrize("body, code", [
    (b"not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (b'"hello"', "malformed"),
    (b'{"id": 1}', "malformed"),  # no type
    (b"\xff\xfe{}", "malformed"),
    (b'{"type": "flow.lookup", "id": 1, "peer_addr": "10.0.0.1", "peer_port": 1, "proxy_port": 2', "malformed"),
    (b'{"type": "shutdown"}', "unknown_type"),
    (b'{"type": "welcome", "version": 1}', "unknown_type"),  # a server's message sent to the server
    (b'{"type": "flow.lookup", "id": 0, "peer_addr": "10.0.0.1", "peer_port": 1, "proxy_port": 2}', "bad_field"),
    (b'{"type": "flow.lookup", "id": 1, "peer_addr": "10.0.0.1", "peer_port": 65536, "proxy_port": 2}', "bad_field"),
    (b'{"type": "flow.lookup", "id": 1, "peer_addr": "example.com", "peer_port": 1, "proxy_port": 2}', "bad_field"),
    (b'{"type": "flow.lookup", "id": 1, "peer_addr": "10.0.0.1", "peer_port": 1, "proxy_port": 2, "x": 1}',
     "bad_field"),  # unknown fields are refused, not ignored
    (b'{"type": "flow.lookup", "id": "1", "peer_addr": "10.0.0.1", "peer_port": 1, "proxy_port": 2}', "bad_field"),
    (b'{"type": "port.register", "id": 1, "port": 1, "family": 5}', "bad_field"),
    (b'{"type": "hello", "versions": []}', "bad_field"),
    (b'{"type": "hello", "versions": [2], "proto": "other"}', "bad_field"),
    (b'{"type": "goodbye", "reason": "' + b"x" * 257 + b'"}', "bad_field"),
])
def test_server_side_refusals(body, code):
    assert refused("server", frame(body)).code == code


@pytest.mark.parametrize("body, code", [
    (b'{"type": "note", "text": "' + b"n" * 513 + b'"}', "bad_field"),
    (b'{"type": "counters", "id": 1, "values": {"Bad Name": 1}}', "bad_field"),
    (b'{"type": "counters", "id": 1, "values": {"x": -1}}', "bad_field"),
    (b'{"type": "counters", "id": 1, "values": {' + b",".join(b'"c%d": 1' % i for i in range(513)) + b"}}",
     "bad_field"),
    (b'{"type": "flow.answer", "id": 1, "flow": {"client_addr": "1.2.3.4", "client_port": 1, "server_addr": "1.2.3",'
     b' "server_port": 1, "created": 0}}', "bad_field"),
    (b'{"type": "flow.lookup", "id": 1, "peer_addr": "10.0.0.1", "peer_port": 1, "proxy_port": 2}', "unknown_type"),
])
def test_client_side_refusals(body, code):
    assert refused("client", frame(body)).code == code


def test_oversized_frame_is_refused_from_its_length_alone():
    decoder = p.Decoder("server")
    with pytest.raises(p.ProtocolError) as caught:
        decoder.feed(struct.pack(">I", p.MAX_FRAME + 1))  # no body sent: refused on the prefix
    assert caught.value.code == "too_large"
    assert decoder.buffered == 0
    assert refused("server", struct.pack(">I", 0)).code == "too_large"
    assert p.Decoder("server").feed(struct.pack(">I", p.MAX_FRAME)) == []  # at the limit: waits for the body


def test_a_failed_decoder_stays_failed():
    decoder = p.Decoder("server")
    with pytest.raises(p.ProtocolError):
        decoder.feed(frame(b"{}"))
    with pytest.raises(p.ProtocolError):
        decoder.feed(p.encode(CLIENT_SAMPLES[0]))  # a good frame after a bad one is not trusted


def test_messages_after_a_bad_one_in_the_same_chunk_are_not_delivered():
    decoder = p.Decoder("server")
    with pytest.raises(p.ProtocolError):
        decoder.feed(p.encode(CLIENT_SAMPLES[0]) + frame(b"junk") + p.encode(CLIENT_SAMPLES[1]))


def test_encode_refuses_what_no_peer_would_take():
    with pytest.raises(p.ProtocolError) as caught:
        p.encode(p.Note(text="x" * (p.MAX_FRAME + 1)))
    assert caught.value.code == "too_large"


def test_version_negotiation():
    # Version 1 had no listeners.set: a sensor of version 1 could never be reflected to.
    assert p.negotiate([1]) is None
    assert p.negotiate([1, 2, 3]) == 2
    assert p.negotiate([3]) is None


def test_version_2_messages_and_their_bounds():
    lookup = p.FlowLookup(id=1, peer_addr="10.0.0.2", peer_port=51000, proxy_port=8443,
                          upstream=p.PortRef(port=40000, family=6))
    assert p.Decoder("server").feed(p.encode(lookup)) == [lookup]
    listeners = p.ListenersSet(id=2, listeners=(p.Listen(server_port=443, listener_port=8443),))
    assert p.Decoder("server").feed(p.encode(listeners)) == [listeners]
    welcome = p.Welcome(version=2, listen=(p.Listen(server_port=11434, listener_port=40001),))
    refused = p.QuicRefused(client_addr="10.0.0.1", client_port=5000, server_addr="fd00::2", server_port=443, ts=1.5)
    assert p.Decoder("client").feed(p.encode(welcome) + p.encode(refused)) == [welcome, refused]
    for body, code in [
        (b'{"type":"flow.lookup","id":1,"peer_addr":"10.0.0.2","peer_port":1,"proxy_port":1,'
         b'"upstream":{"port":1,"family":5}}', "bad_field"),
        (b'{"type":"flow.lookup","id":1,"peer_addr":"10.0.0.2","peer_port":1,"proxy_port":1,'
         b'"upstream":{"port":1,"family":4,"extra":1}}', "bad_field"),
        (b'{"type":"listeners.set","id":1,"listeners":[' + b",".join(
            b'{"server_port":1,"listener_port":2}' for _ in range(p.MAX_LISTENERS + 1)) + b"]}", "bad_field"),
        (b'{"type":"listeners.set","id":1,"listeners":[{"server_port":0,"listener_port":2}]}', "bad_field"),
        (b'{"type":"quic.refused","client_addr":"x","client_port":1,"server_addr":"::1","server_port":1,"ts":0}',
         "unknown_type"),  # a server's message
    ]:
        with pytest.raises(p.ProtocolError) as caught:
            p.Decoder("server").feed(p.HEADER.pack(len(body)) + body)
        assert caught.value.code == code, body[:80]


def test_flatten_counters_keeps_integers_under_schema_names():
    tree = {"reflector": {"engine": {"Dropped": 3, "held slots": 2, "ok": True, "why": "text"}, "ratio": 0.5},
            "dns": {}, "big": 2**63}
    flat = p.flatten_counters(tree)
    assert flat == {"reflector.engine.dropped": 3, "reflector.engine.held_slots": 2, "reflector.engine.ok": 1}
    assert p.Decoder("client").feed(p.encode(p.Counters(id=1, values=flat)))[0].values == flat
    many = p.flatten_counters({f"c{i}": i for i in range(2 * p.MAX_COUNTERS)})
    assert len(many) == p.MAX_COUNTERS


def test_clip():
    assert p.clip("short", 10) == "short"
    assert len(p.clip("x" * 600, p.MAX_NOTE)) == p.MAX_NOTE


# -- fuzz: whatever arrives, a message or ProtocolError, in bounded memory and time ------------
MUTATIONS = st.sampled_from([p.encode(m) for m in CLIENT_SAMPLES + SERVER_SAMPLES])


def _feed_all(side: str, chunks: list[bytes]) -> None:
    decoder = p.Decoder(side)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except p.ProtocolError:
            assert decoder.buffered == 0
            return
        assert decoder.buffered <= p.MAX_FRAME + 3


@given(st.sampled_from(["server", "client"]), st.lists(st.binary(max_size=2048), max_size=20))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_random_bytes(side, chunks):
    _feed_all(side, chunks)


@given(st.sampled_from(["server", "client"]), MUTATIONS, st.data())
@settings(max_examples=300, deadline=None)
def test_fuzz_mutated_valid_frames(side, good, data):
    """Flip, drop and insert bytes in real frames (past the prefix, so the schema is hit)."""
    body = bytearray(good[4:])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        action = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if action == "flip":
            body[at] ^= data.draw(st.integers(1, 255))
        elif action == "drop" and len(body) > 1:
            del body[at]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    _feed_all(side, [frame(bytes(body))])


@given(st.sampled_from(["server", "client"]),
       st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
                    max_leaves=40),
       st.sampled_from(sorted(p.CLIENT_TYPES | p.SERVER_TYPES) + ["", "x"]))
@settings(max_examples=300, deadline=None)
def test_fuzz_schema_with_random_json(side, value, tag):
    """Well-formed JSON of every shape under a real type tag: the schema, not the parser, decides."""
    obj = dict(value, type=tag) if isinstance(value, dict) else value
    _feed_all(side, [frame(json.dumps(obj).encode())])


def test_oversized_streams_stay_bounded_and_fast():
    """Large hostile inputs: a maximal frame of junk, deep nesting and a long string
    are each refused in well under a second with nothing left buffered."""
    hostile = [
        b"[" * p.MAX_FRAME,
        b'{"type": "hello", "versions": [' + b"[" * (p.MAX_FRAME - 40) + b"]}",
        b'{"type": "note", "text": "' + b"a" * (p.MAX_FRAME - 40) + b'"}',
        b'{"type": "counters", "id": 1, "values": {' + b",".join(b'"c%d": 1' % i for i in range(5500)) + b"}}",
    ]
    for side in ("server", "client"):
        for body in hostile:
            decoder = p.Decoder(side)
            started = time.process_time()
            with pytest.raises(p.ProtocolError):
                for at in range(0, len(body) + 4, 4096):  # arrives in pieces
                    decoder.feed(frame(body[:p.MAX_FRAME])[at:at + 4096])
            assert time.process_time() - started < 1.0
            assert decoder.buffered == 0


def test_a_long_stream_of_frames_at_the_limit_holds_one_frame_at_most():
    """10 MB arriving in 1,000-byte pieces, frames of 64 KiB that are refused only once
    whole (valid JSON, wrong schema): the decoder's peak allocation stays near one frame."""
    import tracemalloc

    body = b'{"type": "note", "text": "' + b"a" * (p.MAX_FRAME - 28) + b'"}'
    one = frame(body)
    assert len(one) == p.MAX_FRAME + 4
    tracemalloc.start()
    try:
        refused_frames = 0
        for _ in range(160):  # each frame on a fresh decoder: one refusal ends a connection
            decoder = p.Decoder("client")
            try:
                for at in range(0, len(one), 1000):
                    decoder.feed(one[at:at + 1000])
            except p.ProtocolError as e:
                refused_frames += e.code == "bad_field"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused_frames == 160
    assert peak < 4 * p.MAX_FRAME  # the frame, its body's copy and the decoder's parse: not the stream

