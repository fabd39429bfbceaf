"""WebSocket decoding: the openai SDK's ``responses.connect()`` against a real websockets server.

The bytes are real: a small TCP relay on loopback between the SDK client and
tests/fakews.py records each read in order; FlowRecorder is fed that trace
(as the proxy would feed it) and must give what the client assembled.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import struct
import threading
import time
import tracemalloc
import zlib

import jsonschema
import pytest
from openai import OpenAI
from websockets.sync.client import connect as ws_connect

from oisp.decode import Direction, FlowContext, FlowDecoder
from oisp.decode.websocket import WebSocketSession
from oisp.events import FlowRecorder, load_schema
from tests import fakews
from tests.events_compare import normalise

API_KEY = "sk-proj-" + "k" * 40
Trace = list[tuple[Direction, bytes, float]]
REQUESTS = [
    {"model": "gpt-test", "input": [], "generate": False},
    {"model": "gpt-test", "instructions": "be brief", "input": [{"role": "user", "content": "hello there"}],
     "temperature": 0.5, "max_output_tokens": 64, "metadata": {"stream_chunks": "4"}},
    {"model": "gpt-test", "input": [{"role": "user", "content": "weather in Paris?"}],
     "tools": [{"type": "function", "name": "get_weather", "description": "the weather", "parameters": {"type": "object"}}]},
    {"model": "bad-model", "input": "x"},
]


class Relay:
    """One TCP connection relayed to ``upstream``; every read is recorded as (direction, bytes, time)."""

    def __init__(self, upstream: int) -> None:
        self.trace: Trace = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._upstream = upstream
        self._done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(("127.0.0.1", self._upstream))
        pumps = [threading.Thread(target=self._pump, args=(a, b, d), daemon=True)
                 for a, b, d in ((client, server, Direction.REQUEST), (server, client, Direction.RESPONSE))]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join(20)
        client.close()
        server.close()
        self._listener.close()
        self._done.set()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with self._lock:  # recorded before it is forwarded: what it causes is recorded after it
                if data:
                    self.trace.append((direction, data, time.time()))
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            dst.sendall(data)

    def wait(self) -> Trace:
        assert self._done.wait(20), "relay did not finish"
        return self.trace


@pytest.fixture(scope="module")
def server():
    srv, port = fakews.start()
    yield port
    srv.shutdown()


def sdk_conversation(port: int, compression: str | None = "deflate") -> tuple[Trace, list[dict]]:
    """Four response.create on one socket (a warm-up, a text answer, a tool call, an error), by the openai SDK.

    The SDK leaves compression off unless asked (or given a max_size); real agents offer permessage-deflate.
    """
    relay = Relay(port)
    client = OpenAI(api_key=API_KEY, base_url="http://api.openai.com/v1")
    sock = socket.create_connection(("127.0.0.1", relay.port))
    results: list[dict] = []
    with client.responses.connect(websocket_connection_options={"sock": sock, "proxy": None, "compression": compression}) as conn:
        for req in REQUESTS:
            conn.send({"type": "response.create", **req})
            got = {"text": "", "calls": {}, "final": None, "error": None}
            for event in conn:
                if event.type == "response.output_text.delta":
                    got["text"] += event.delta
                elif event.type == "response.output_item.done" and event.item.type == "function_call":
                    got["calls"][event.item.call_id] = (event.item.name, event.item.arguments)
                elif event.type == "response.completed":
                    got["final"] = event.response
                    break
                elif event.type == "error":
                    got["error"] = event.error
                    break
            results.append(got)
    return relay.wait(), results


@pytest.fixture(scope="module", params=["deflate", None])
def conversation(server, request):
    return sdk_conversation(server, request.param)


def record(trace: Trace, **kw) -> tuple[list[dict], FlowRecorder]:
    t0 = trace[0][2]
    rec = FlowRecorder(FlowContext(("127.0.0.1", 50000), ("127.0.0.1", 80), t0), **kw)
    events = rec.start()
    for direction, data, ts in trace:
        events += rec.feed(direction, data, ts)
    events += rec.close(trace[-1][2] + 0.001)
    return events, rec


def test_the_client_negotiated_permessage_deflate(server) -> None:
    trace, _ = sdk_conversation(server)
    head = trace[0][1].split(b"\r\n\r\n")[0].lower()
    assert b"upgrade: websocket" in head
    assert b"permessage-deflate" in head
    resp = next(d for dr, d, _ in trace if dr is Direction.RESPONSE).split(b"\r\n\r\n")[0].lower()
    assert b"101" in resp.split(b"\r\n")[0]
    assert b"sec-websocket-extensions: permessage-deflate" in resp


def test_each_response_create_is_one_exchange_equal_to_what_the_client_assembled(conversation) -> None:
    trace, results = conversation
    events, rec = record(trace)
    assert rec.stats.decode_errors == 0, rec.stats.errors
    for ev in events:
        jsonschema.validate(ev, load_schema(ev["event_type"]))
    reqs = [e["data"] for e in events if e["event_type"] == "ai.request"]
    resps = [e["data"] for e in events if e["event_type"] == "ai.response"]
    assert len(reqs) == len(resps) == 4  # the upgrade itself is no AI exchange
    assert [r["request_id"] for r in reqs] == [r["request_id"] for r in resps]
    warm, text, tool, bad = zip(reqs, resps, results)

    assert warm[0]["parameters"] == {"generate": False}
    assert warm[1]["success"] is True
    assert warm[1]["provider_request_id"] == warm[2]["final"].id
    assert warm[1]["choices"][0]["message"]["content"] == ""

    req, resp, got = text
    assert req["model"] == {"id": "gpt-test"}
    assert req["streaming"] is True
    assert req["provider"]["endpoint"] == "ws://api.openai.com/v1/responses"
    assert [(m["role"], m["content"]) for m in req["messages"]] == [("system", "be brief"), ("user", "hello there")]
    assert req["parameters"] == {"temperature": 0.5, "max_tokens": 64}
    assert req["auth"]["key_prefix"] == "sk-proj-"
    assert API_KEY not in json.dumps(events)
    assert resp["choices"][0]["message"]["content"] == got["text"] == got["final"].output_text
    assert resp["thinking"] == got["final"].output[0].summary[0].text
    u = got["final"].usage
    assert resp["usage"] == {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                             "total_tokens": u.total_tokens,
                             "cached_tokens": u.input_tokens_details.cached_tokens,
                             "reasoning_tokens": u.output_tokens_details.reasoning_tokens}
    assert resp["finish_reason"] == "stop"
    assert resp["success"] is True
    assert resp["status_code"] == 101
    assert 0 <= resp["time_to_first_token_ms"] <= resp["latency_ms"]

    req, resp, got = tool
    assert req["tools"] == [{"type": "function", "name": "get_weather", "description": "the weather"}]
    assert {c["id"]: (c["name"], c["arguments"]) for c in resp["tool_calls"]} == got["calls"]
    assert resp["finish_reason"] == "tool_calls"

    req, resp, got = bad
    assert resp["success"] is False
    assert resp["finish_reason"] == "error"
    assert resp["error"] == {"type": got["error"].type, "code": got["error"].code, "message": got["error"].message}


def test_the_session_has_one_flow_record(conversation) -> None:
    trace, _ = conversation
    events, _ = record(trace)
    flows = [e["data"] for e in events if e["event_type"] == "network.flow"]
    assert len(flows) == 1
    f = flows[0]
    ws = f["websocket"]
    assert f["http"]["path"] == "/v1/responses"
    assert f["http"]["status_code"] == 101
    compressed = b"permessage-deflate" in trace[0][1]
    assert bool(ws["extensions"]) is compressed
    assert all(e.startswith("permessage-deflate") for e in ws["extensions"])
    assert ws["client"]["messages"] == 4
    assert ws["server"]["messages"] == sum(
        len(fakews.responses_events(r, n)) for n, r in enumerate(REQUESTS, 1))
    def after_head(d: Direction) -> int:  # the frames: what follows the upgrade's head each way
        data = b"".join(b for dr, b, _ in trace if dr is d)
        return len(data) - data.index(b"\r\n\r\n") - 4
    sent, received = after_head(Direction.REQUEST), after_head(Direction.RESPONSE)
    assert f["bytes_sent"] == sent
    assert f["bytes_received"] == received
    assert ws["close_code"] == 1000
    assert ws["closed_by"] == "client"
    assert ws["decode_errors"] == 0


def cut_everywhere(trace: Trace, stride: int = 1):
    """The trace with one of its reads cut in two at each position (same timestamps)."""
    flat = [(i, j) for i, (_, data, _) in enumerate(trace) for j in range(1, len(data), stride)]
    for i, j in flat:
        d, data, ts = trace[i]
        yield trace[:i] + [(d, data[:j], ts), (d, data[j:], ts)] + trace[i + 1:]


def _normal(trace: Trace) -> list[dict]:
    events, rec = record(trace, streaming_chunks=True)
    assert rec.stats.decode_errors == 0
    return normalise(events)


@pytest.mark.parametrize("kind", ["responses", "realtime"])
def test_the_same_bytes_cut_at_every_position_give_the_same_events(server, kind) -> None:
    trace, _ = sdk_conversation(server) if kind == "responses" else sdk_realtime(server)
    reference = _normal(trace)
    chunks = sum(e["event_type"] == "ai.streaming_chunk" for e in reference)
    assert chunks == (5 + 3 if kind == "responses" else 3 + 2 + 3)  # text or transcript deltas, argument deltas
    size = sum(len(d) for _, d, _ in trace)
    stride = max(1, size // 3000)  # every position of a conversation of a few kB
    for cut in cut_everywhere(trace, stride):
        assert _normal(cut) == reference
    one_byte = [(d, data[k:k + 1], ts) for d, data, ts in trace for k in range(len(data))]
    assert _normal(one_byte) == reference


# -- hostile input ---------------------------------------------------------------------------

UPGRADE = (b"GET /v1/responses HTTP/1.1\r\nHost: api.openai.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")
SWITCHED = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=12; client_max_window_bits=12\r\n\r\n")


def frame(payload: bytes, *, opcode: int = 1, fin: bool = True, rsv1: bool = False, mask: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    m = 0x80 if mask else 0
    head += (bytes([m | n]) if n < 126 else bytes([m | 126]) + struct.pack("!H", n) if n < 65536
             else bytes([m | 127]) + struct.pack("!Q", n))
    if not mask:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def deflated(data: bytes, bits: int = 12) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -bits)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def decoder(**limits) -> FlowDecoder:
    dec = FlowDecoder(FlowContext(("127.0.0.1", 1), ("127.0.0.1", 80), 0.0), **limits)
    upgrade = dec.feed(Direction.REQUEST, UPGRADE, 0.0)
    assert [r.exchange.match for r in upgrade] == [None]  # the GET is no AI request
    assert dec.feed(Direction.RESPONSE, SWITCHED, 0.0) == []
    return dec


def test_a_deflate_bomb_is_a_counted_truncated_message_in_bounded_memory() -> None:
    bomb = deflated(b"\x00" * (200 * 1024 * 1024))  # 200 MiB of zeros in ~200 kB
    create = json.dumps({"type": "response.create", "model": "m", "input": "after the bomb"}).encode()
    dec = decoder(max_message=1 << 20, max_inflate=300 << 20)
    tracemalloc.start()
    records = dec.feed(Direction.REQUEST, frame(bomb, opcode=2, rsv1=True), 1.0)
    records += dec.feed(Direction.REQUEST, frame(deflated(create), rsv1=True), 1.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes while inflating a 200 MiB bomb"
    st = dec._ws.session.stats.client
    assert st.truncated == 1
    assert st.payload_bytes >= 200 * 1024 * 1024
    assert st.messages == 2
    # the context was kept in step: the message after the bomb is read
    assert [r.exchange.ai_request.messages[0].content for r in records] == ["after the bomb"]

    capped = decoder(max_message=1 << 20, max_inflate=16 << 20)
    assert capped.feed(Direction.REQUEST, frame(bomb, opcode=2, rsv1=True), 1.0) == []
    assert capped.stats.decode_errors == 1
    assert "close code 1009" in capped.stats.last_error
    assert capped.feed(Direction.REQUEST, frame(deflated(create), rsv1=True), 1.0) == []  # that side is no longer read


@pytest.mark.parametrize("bad", [
    frame(b"x", opcode=3),  # reserved opcode
    frame(b"hi", mask=False),  # a client frame must be masked
    frame(b"\xff\xfe"),  # invalid UTF-8 in a text message
    frame(b"x" * 200, opcode=9),  # control frame longer than 125
    frame(b"garbage", rsv1=True),  # not deflate data
    frame(b"x", opcode=0),  # continuation with nothing to continue
])
def test_protocol_violations_are_one_counted_error(bad: bytes) -> None:
    dec = decoder()
    assert dec.feed(Direction.REQUEST, bad, 1.0) == []
    assert dec.stats.decode_errors == 1
    assert dec.feed(Direction.REQUEST, bad, 1.0) == []
    assert dec.stats.decode_errors == 1


def test_random_frames_never_raise_and_memory_stays_bounded() -> None:
    rng = random.Random(12)
    tracemalloc.start()
    for _ in range(300):
        dec = decoder(max_message=64 * 1024)
        for _ in range(rng.randrange(1, 6)):
            d = rng.choice(list(Direction))
            if rng.random() < 0.5:
                data = rng.randbytes(rng.randrange(1, 400))
            else:
                data = frame(rng.randbytes(rng.randrange(0, 300)), opcode=rng.choice([0, 1, 2, 8, 9, 10]), fin=rng.random() < 0.8,
                             rsv1=rng.random() < 0.5, mask=d is Direction.REQUEST)
            dec.feed(d, data, 1.0)
        dec.close(2.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 << 20


def test_a_truncated_connection_leaves_pending_responses_incomplete(server) -> None:
    trace, _ = sdk_conversation(server)
    # cut the server side off just after the first answer's text started streaming
    cut, seen = [], 0
    for d, data, ts in trace:
        if d is Direction.RESPONSE and seen > 2:
            break
        seen += d is Direction.RESPONSE
        cut.append((d, data, ts))
    events, rec = record(cut)
    kinds = [e["event_type"] for e in events]
    assert kinds.count("ai.request") == kinds.count("ai.response") >= 1
    last = [e for e in events if e["event_type"] == "ai.response"][-1]
    assert last["confidence"]["completeness"] == "partial" or last["data"]["success"] is True


def test_a_plain_websocket_is_recorded_as_a_session_only(server) -> None:
    relay = Relay(server)
    sock = socket.create_connection(("127.0.0.1", relay.port))
    with ws_connect("ws://api.openai.com/echo", sock=sock, proxy=None) as ws:
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send(b"\x00\x01" * 1000)
        assert ws.recv() == b"\x00\x01" * 1000
        ws.ping()
    events, rec = record(relay.wait())
    assert [e["event_type"] for e in events] == ["network.connect", "network.flow"]
    ws_data = events[1]["data"]["websocket"]
    assert ws_data["client"]["messages"] == ws_data["server"]["messages"] == 2
    assert ws_data["client"]["text_messages"] == 1
    assert ws_data["client"]["payload_bytes"] == 5 + 2000
    assert rec.stats.decode_errors == 0


def test_session_limits_are_parameters() -> None:
    s = WebSocketSession([("sec-websocket-extensions", "permessage-deflate")], lambda m: None, max_message=10)
    msgs = s.feed(Direction.REQUEST, frame("héllo wörld, more".encode()), 1.0)
    assert len(msgs) == 1
    assert msgs[0].truncated
    assert len(msgs[0].data) <= 10
    assert msgs[0].data.decode() == "héllo wö"


@pytest.mark.parametrize("params", [
    {},
    {"client_no_context_takeover": True, "server_no_context_takeover": True},
    {"client_max_window_bits": 9, "server_max_window_bits": 10},
    {"client_max_window_bits": 9, "client_no_context_takeover": True, "server_max_window_bits": 15},
], ids=["takeover", "no-takeover", "window-bits", "mixed"])
def test_permessage_deflate_parameters_as_wsproto_peers_negotiate_them(params) -> None:
    """Both ends are wsproto connections (an independent encoder): handshake, fragments, pings, close."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage
    from wsproto.extensions import PerMessageDeflate

    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    trace: Trace = []

    def c2s(event) -> None:
        data = client.send(event)
        server.receive_data(data)
        list(server.events())
        trace.append((Direction.REQUEST, data, 1.0))

    def s2c(event) -> None:
        data = server.send(event)
        client.receive_data(data)
        list(client.events())
        trace.append((Direction.RESPONSE, data, 2.0))

    c2s(Request(host="api.openai.com", target="/v1/responses", extensions=[PerMessageDeflate(**params)]))
    s2c(AcceptConnection(extensions=[PerMessageDeflate()]))
    assert b"permessage-deflate" in trace[1][1]
    texts = [f"question {i}: " + "the same words again and again " * 20 for i in range(3)]
    for i, text in enumerate(texts):
        create = json.dumps({"type": "response.create", "model": "m", "input": text})
        c2s(TextMessage(data=create[:40], message_finished=False))  # fragmented
        c2s(Ping(b"p"))  # a control frame between fragments
        c2s(TextMessage(data=create[40:]))
        for ev in fakews.responses_events({"model": "m", "input": text}, i + 1):
            s2c(TextMessage(data=json.dumps(ev)))
    c2s(CloseConnection(code=4000, reason="bye"))
    events, rec = record(trace)
    assert rec.stats.decode_errors == 0, rec.stats.errors
    assert [e["data"]["messages"][0]["content"] for e in events if e["event_type"] == "ai.request"] == texts
    assert [e["data"]["choices"][0]["message"]["content"] for e in events if e["event_type"] == "ai.response"] == [
        f"echo: {t} w0 w1 w2" for t in texts]
    ws = [e for e in events if e["event_type"] == "network.flow"][0]["data"]["websocket"]
    assert (ws["close_code"], ws["close_reason"], ws["closed_by"], ws["client"]["pings"]) == (4000, "bye", "client", 3)


# -- Realtime API ----------------------------------------------------------------------------

def sdk_realtime(port: int) -> tuple[Trace, list[dict]]:
    """A Realtime session by the openai SDK: text turn, a function call, an audio turn (audio in and out)."""
    relay = Relay(port)
    client = OpenAI(api_key=API_KEY, base_url="http://api.openai.com/v1")
    sock = socket.create_connection(("127.0.0.1", relay.port))
    results: list[dict] = []

    def turn() -> dict:
        got = {"text": "", "audio": 0, "final": None}
        for event in conn:
            if event.type in ("response.output_text.delta", "response.output_audio_transcript.delta"):
                got["text"] += event.delta
            elif event.type == "response.output_audio.delta":
                got["audio"] += len(base64.b64decode(event.delta))
            elif event.type == "response.done":
                got["final"] = event.response
                return got
        raise AssertionError("the session ended mid-response")

    with client.realtime.connect(model="gpt-realtime",
                                 websocket_connection_options={"sock": sock, "proxy": None, "compression": "deflate"}) as conn:
        conn.session.update(session={"type": "realtime", "instructions": "answer briefly", "output_modalities": ["text"]})
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "hi realtime"}]})
        conn.response.create()
        results.append(turn())
        conn.response.create(response={"tools": [{"type": "function", "name": "lookup", "description": "look it up",
                                                  "parameters": {"type": "object"}}]})
        results.append(turn())
        conn.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
        for _ in range(3):
            conn.input_audio_buffer.append(audio=base64.b64encode(b"\x01\x02" * 1500).decode())
        conn.input_audio_buffer.commit()
        conn.response.create()
        results.append(turn())
    return relay.wait(), results


def test_a_realtime_session_gives_one_exchange_per_response(server) -> None:
    trace, results = sdk_realtime(server)
    assert b"/v1/realtime?model=gpt-realtime" in trace[0][1]
    events, rec = record(trace)
    assert rec.stats.decode_errors == 0, rec.stats.errors
    for ev in events:
        jsonschema.validate(ev, load_schema(ev["event_type"]))
    reqs = [e["data"] for e in events if e["event_type"] == "ai.request"]
    resps = [e["data"] for e in events if e["event_type"] == "ai.response"]
    assert len(reqs) == len(resps) == 3
    text, tool, audio = zip(reqs, resps, results)

    req, resp, got = text
    assert req["model"] == {"id": "gpt-realtime"}
    assert req["parameters"] == {"modalities": ["text"]}
    assert [(m["role"], m["content"]) for m in req["messages"]] == [("system", "answer briefly"), ("user", "hi realtime")]
    assert resp["choices"][0]["message"]["content"] == got["text"] == got["final"].output[0].content[0].text
    u = got["final"].usage
    assert resp["usage"] == {
        "prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total_tokens,
        "cached_tokens": u.input_token_details.cached_tokens, "input_text_tokens": u.input_token_details.text_tokens,
        "input_audio_tokens": u.input_token_details.audio_tokens, "output_text_tokens": u.output_token_details.text_tokens,
        "output_audio_tokens": u.output_token_details.audio_tokens}
    assert resp["provider_request_id"] == got["final"].id
    assert resp["finish_reason"] == "stop"
    assert resp["success"]
    assert resp["provider"]["endpoint"] == "ws://api.openai.com/v1/realtime"

    req, resp, got = tool
    assert req["tools"] == [{"type": "function", "name": "lookup", "description": "look it up"}]
    assert req["messages"][-1] == {"role": "assistant", "content": results[0]["text"], "content_length": len(results[0]["text"])}
    call = got["final"].output[0]
    assert [(c["id"], c["name"], c["arguments"]) for c in resp["tool_calls"]] == [(call.call_id, call.name, call.arguments)]
    assert resp["finish_reason"] == "tool_calls"

    req, resp, got = audio
    assert req["parameters"] == {"modalities": ["audio"]}
    assert req["messages"][-1]["content"] == "spoken words"
    assert resp["choices"][0]["message"]["content"] == got["text"] == got["final"].output[0].content[0].transcript
    flow = [e["data"] for e in events if e["event_type"] == "network.flow"][0]["websocket"]
    assert flow["client"]["audio_bytes"] == 3 * 3000
    assert flow["server"]["audio_bytes"] == got["audio"] > 0
    # audio is never written
    assert "AAAA" not in json.dumps(events)
    assert "AQIBAg" not in json.dumps(events)


# -- Gemini Live ----------------------------------------------------------------------------

def wsproto_trace(target: str, host: str, client_msgs: list, server_msgs: list, extensions=True, headers=()) -> Trace:
    """A session between two wsproto peers: the handshake, then each client message followed by the server's answers."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage
    from wsproto.extensions import PerMessageDeflate

    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    trace: Trace = []
    t = [100.0]

    def send(src, dst, direction, event) -> None:
        data = src.send(event)
        dst.receive_data(data)
        list(dst.events())
        t[0] += 0.01
        trace.append((direction, data, t[0]))

    send(client, server, Direction.REQUEST,
         Request(host=host, target=target, extensions=[PerMessageDeflate()] if extensions else [],
                                                          extra_headers=list(headers)))
    send(server, client, Direction.RESPONSE, AcceptConnection(extensions=[PerMessageDeflate()] if extensions else []))
    for msg, answers in zip(client_msgs, server_msgs):
        send(client, server, Direction.REQUEST, TextMessage(data=json.dumps(msg)))
        for a in answers:
            send(server, client, Direction.RESPONSE, BytesMessage(data=json.dumps(a).encode()))
    send(client, server, Direction.REQUEST, CloseConnection(code=1000))
    return trace


LIVE_KEY = "AIzaSyLIVEKEY0123456789abcdefghijklmnopq"
LIVE_CLIENT = [
    {"setup": {"model": "models/gemini-live-x", "generationConfig": {"responseModalities": ["AUDIO"], "temperature": 0.2},
               "systemInstruction": {"parts": [{"text": "be kind"}]}}},
    {"client_content": {"turns": [{"role": "user", "parts": [{"text": "say hi"}]}], "turnComplete": True}},
    {"realtimeInput": {"audio": {"mimeType": "audio/pcm;rate=16000", "data": base64.b64encode(b"\x00\x01" * 800).decode()}}},
]
LIVE_SERVER = [
    [{"setupComplete": {}}],
    [{"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm",
                                                                "data": base64.b64encode(b"\x07" * 960).decode()}}]},
                        "outputTranscription": {"text": "hi "}}},
     {"serverContent": {"outputTranscription": {"text": "there"}}},
     {"serverContent": {"turnComplete": True}, "usageMetadata": fakews.live_usage(1)}],
    [{"serverContent": {"outputTranscription": {"text": "heard you"}}},
     {"serverContent": {"interrupted": True}},
     {"serverContent": {"turnComplete": True}}],
]


def test_gemini_live_turns_audio_counted_and_the_url_key_never_written() -> None:
    target = f"/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key={LIVE_KEY}"
    trace = wsproto_trace(target, "generativelanguage.googleapis.com", LIVE_CLIENT, LIVE_SERVER)
    events, rec = record(trace)
    assert rec.stats.decode_errors == 0, rec.stats.errors
    for ev in events:
        jsonschema.validate(ev, load_schema(ev["event_type"]))
    reqs = [e["data"] for e in events if e["event_type"] == "ai.request"]
    resps = [e["data"] for e in events if e["event_type"] == "ai.response"]
    assert len(reqs) == len(resps) == 2
    assert reqs[0]["model"] == {"id": "gemini-live-x"}
    assert reqs[0]["parameters"] == {"temperature": 0.2, "modalities": ["audio"]}
    assert [(m["role"], m["content"]) for m in reqs[0]["messages"]] == [("system", "be kind"), ("user", "say hi")]
    assert resps[0]["choices"][0]["message"]["content"] == "hi there"
    assert resps[0]["finish_reason"] == "stop"
    assert resps[0]["usage"] == {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11, "input_text_tokens": 8,
                                 "output_text_tokens": 3}
    # the second turn was the server's, on realtime audio; it was interrupted
    assert reqs[1]["messages"][-1] == {"role": "assistant", "content": "hi there", "content_length": 8}
    assert resps[1]["choices"][0]["message"]["content"] == "heard you"
    assert resps[1]["finish_reason"] == "other"
    assert reqs[0]["auth"]["key_prefix"] == "AIza"
    assert reqs[0]["provider"]["endpoint"].endswith("BidiGenerateContent")
    flow = [e["data"] for e in events if e["event_type"] == "network.flow"][0]
    assert flow["websocket"]["client"]["audio_bytes"] == 1600
    assert flow["websocket"]["server"]["audio_bytes"] == 960
    text = json.dumps(events)
    assert LIVE_KEY not in text
    assert "LIVEKEY" not in text
    reference = _normal(trace)
    for cut in cut_everywhere(trace):
        assert _normal(cut) == reference


@pytest.mark.parametrize("kind", ["realtime-ephemeral-bearer", "live-access-token"])
def test_ephemeral_secrets_of_a_session_are_hashed_never_written(kind) -> None:
    secret = "ek_68a1SECRETSECRETSECRET0123" if kind.startswith("realtime") else "auth_tokens/SECRETSECRETSECRET0123"
    leaked = "sk-proj-" + "LEAKED" * 5  # a key pasted into instructions: the Redactor's patterns still apply
    if kind.startswith("realtime"):
        headers = [(b"authorization", f"Bearer {secret}".encode())]
        target, host = "/v1/realtime?model=gpt-realtime", "api.openai.com"
        msgs = [{"type": "session.update", "session": {"type": "realtime", "instructions": f"key {leaked}"}},
                {"type": "response.create"}]
        answers = [[{"type": "session.updated", "session": {"model": "gpt-realtime"}}],
                   [{"type": "response.created", "response": {"id": "r1"}},
                    {"type": "response.done", "response": {"id": "r1", "status": "completed", "output": []}}]]
    else:
        target = ("/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained"
                  f"?access_token={secret}")
        host, headers = "generativelanguage.googleapis.com", []
        msgs = [{"setup": {"model": "models/m", "systemInstruction": {"parts": [{"text": f"key {leaked}"}]}}},
                {"clientContent": {"turns": [{"role": "user", "parts": [{"text": "x"}]}], "turnComplete": True}}]
        answers = [[{"setupComplete": {}}], [{"serverContent": {"turnComplete": True}}]]
    events, rec = record(wsproto_trace(target, host, msgs, answers, headers=headers))
    assert rec.stats.decode_errors == 0
    req = [e["data"] for e in events if e["event_type"] == "ai.request"]
    assert len(req) == 1
    assert req[0]["auth"]["key_hash"].startswith("sha256:")
    assert "[REDACTED:openai:sk-proj-:" in req[0]["messages"][0]["content"]
    text = json.dumps(events)
    assert "SECRETSECRET" not in text
    assert "LEAKED" not in text


def test_frames_sent_before_the_101_and_with_it_are_decoded() -> None:
    """A client may send its first message right behind the upgrade; the server its first with the 101."""
    create = json.dumps({"type": "response.create", "model": "m", "input": "early"}).encode()
    answer = json.dumps({"type": "response.completed", "response": {"id": "r", "status": "completed", "output": []}}).encode()
    dec = FlowDecoder(FlowContext(("127.0.0.1", 1), ("127.0.0.1", 80), 0.0))
    out = dec.feed(Direction.REQUEST, UPGRADE + frame(deflated(create), rsv1=True), 0.0)
    out += dec.feed(Direction.RESPONSE, SWITCHED + frame(deflated(answer), rsv1=True, mask=False), 1.0)
    assert dec.stats.decode_errors == 0, dec.stats.errors
    done = [r.exchange for r in out if r.exchange.protocol == "WebSocket"]
    assert [e.ai_request.messages[0].content for e in done[:1]] == ["early"]
    assert done[-1].ai_response.response_id == "r"


def test_a_refused_upgrade_is_plain_http_and_no_session() -> None:
    dec = FlowDecoder(FlowContext(("127.0.0.1", 1), ("127.0.0.1", 80), 0.0))
    dec.feed(Direction.REQUEST, UPGRADE, 0.0)
    body = b'{"error": {"message": "no"}}'
    out = dec.feed(Direction.RESPONSE, b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(body) + body, 1.0)
    out += dec.close(2.0)
    assert [type(r).__name__ for r in out] == ["ResponseComplete"]
    assert out[0].exchange.status == 401
    assert dec.stats.protocol == "HTTP/1.1"
    assert dec.stats.decode_errors == 0
