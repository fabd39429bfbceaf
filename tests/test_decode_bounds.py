"""Hostile bodies cost a bounded amount: decompression bombs stop at the body budget,
long lines and header blocks are capped, and decoding stays linear in its input.

Bombs are made with the real compressors (brotli, zlib, zstandard); memory is
measured with tracemalloc, time with generous bounds that the quadratic or
unbounded code misses by far more than this machine's noise.
"""

from __future__ import annotations

import functools
import json
import time
import tracemalloc
import zlib

import brotli
import pytest
import zstandard

from oisp.decode import Direction, FlowContext, FlowDecoder, ResponseComplete
from oisp.decode.content_encoding import BodyDecoder
from oisp.decode.exchange import MAX_BODY_BYTES
from oisp.events import FlowRecorder

MiB = 1024 * 1024
BOMB = 256 * MiB  # decoded size of every bomb: eight times the body budget
CTX = FlowContext(("10.0.0.2", 50000), ("10.0.0.9", 443), 0.0, sni="api.openai.com", tls_version="TLSv1.3", alpn="http/1.1")


def _stream(compressor, pattern: bytes, size: int, finish) -> bytes:
    piece = pattern * (MiB // len(pattern))
    return b"".join([compressor(piece) for _ in range(size // len(piece))] + [finish()])


@functools.cache
def bomb(coding: str, pattern: bytes = b"\0") -> bytes:
    """``BOMB`` bytes of ``pattern`` under ``coding`` (compressed in 1 MiB pieces: quick to make)."""
    if coding == "br":
        c = brotli.Compressor(quality=5)
        return _stream(c.process, pattern, BOMB, c.finish)
    if coding in ("gzip", "deflate"):
        z = zlib.compressobj(1, zlib.DEFLATED, 31 if coding == "gzip" else 15)
        return _stream(z.compress, pattern, BOMB, z.flush)
    if coding == "zstd":
        z = zstandard.ZstdCompressor(level=3).compressobj()
        return _stream(z.compress, pattern, BOMB, z.flush)
    if coding == "gzip, br":  # a bomb inside a bomb: each coding of a chain is bounded too
        return brotli.compress(bomb("gzip", pattern))
    raise ValueError(coding)


def request(body: bytes, coding: str | None = None, path: str = "/v1/chat/completions") -> bytes:
    enc = f"Content-Encoding: {coding}\r\n" if coding else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n"
            f"{enc}Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def response(body: bytes, coding: str | None = None, ctype: str = "application/json") -> bytes:
    enc = f"Content-Encoding: {coding}\r\n" if coding else ""
    return f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{enc}Content-Length: {len(body)}\r\n\r\n".encode() + body


CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
REPLY = json.dumps({"id": "c1", "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                                 "finish_reason": "stop"}]}).encode()


def peak_while(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def feed_all(target, request_bytes: bytes, response_bytes: bytes, segment: int = 16384) -> list:
    out = []
    for direction, data in ((Direction.REQUEST, request_bytes), (Direction.RESPONSE, response_bytes)):
        for i in range(0, len(data), segment):
            out += target.feed(direction, data[i : i + segment], 1.0)
    return out


# -- decompression bombs -----------------------------------------------------------------


@pytest.mark.parametrize("coding", ["br", "gzip", "deflate", "zstd", "gzip, br"])
def test_request_bomb_stops_at_the_budget_and_the_connection_goes_on(coding: str) -> None:
    rec = FlowRecorder(CTX)
    wire = request(bomb(coding), coding) + request(CHAT)  # a well-behaved request follows on the same connection
    events, peak = peak_while(lambda: feed_all(rec, wire, response(REPLY) + response(REPLY)) + rec.close(2.0))
    # Kept: the budget once, plus its copy as the exchange's bytes; never the 256 MiB.
    assert peak < 2 * MAX_BODY_BYTES + 16 * MiB, f"peak {peak / MiB:.0f} MiB"
    assert rec.stats.bodies_truncated == 1
    assert rec.stats.decode_errors == 0
    requests = [e for e in events if e["event_type"] == "ai.request"]
    assert len(requests) == 2
    bombed, good = requests
    assert bombed["confidence"]["completeness"] == "partial"
    assert "body_truncated" in bombed["confidence"]["reasons"]
    assert "body_truncated" in bombed["confidence"]["limitations"]
    assert good["confidence"]["completeness"] == "full"
    assert good["data"]["model"]["id"] == "gpt-4o-mini"


@pytest.mark.parametrize("coding", ["br", "zstd"])
def test_streamed_response_bomb_is_parsed_up_to_the_budget_in_little_memory(coding: str) -> None:
    """A framed (SSE) body is not kept, so a bomb there must not be held either: it is parsed piece by piece."""
    stream = bomb(coding, b": " + b"k" * 1021 + b"\n")  # SSE comment lines: cheap to parse, nothing to assemble
    d = FlowDecoder(CTX)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "stream": True}).encode()
    records, peak = peak_while(lambda: feed_all(d, request(body), response(stream, coding, "text/event-stream")) + d.close(2.0))
    assert peak < 8 * MiB, f"peak {peak / MiB:.0f} MiB"
    done = [r.exchange for r in records if isinstance(r, ResponseComplete)]
    assert len(done) == 1
    assert "body_truncated" in done[0].problems
    assert d.stats.bodies_truncated == 1


def test_body_decoder_never_returns_more_than_asked() -> None:
    for coding in ("br", "gzip", "zstd", "gzip, br"):
        dec = BodyDecoder(coding)
        dec.feed(bomb(coding)[:100_000])
        sizes = [len(dec.read(n)) for n in (1, 1000, 65536, 300_000, 7)]
        assert all(s <= n for s, n in zip(sizes, (1, 1000, 65536, 300_000, 7))), (coding, sizes)
        assert sum(sizes) > 0, (coding, sizes)


@pytest.mark.parametrize("coding", ["br", "gzip", "deflate", "zstd", "gzip, br"])
def test_bounded_reading_gives_back_exactly_the_original(coding: str) -> None:
    """An independent check of the stepwise decoders: what comes out is zlib/brotli/zstd's one-shot answer."""
    original = b"".join(b"line %d of a body that compresses somewhat\n" % i for i in range(40_000))
    encoded = {
        "br": lambda b: brotli.compress(b, quality=5),
        "gzip": lambda b: zlib.compress(b, wbits=31),
        "deflate": lambda b: zlib.compress(b),
        "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
        "gzip, br": lambda b: brotli.compress(zlib.compress(b, wbits=31), quality=5),
    }[coding](original)
    dec = BodyDecoder(coding)
    out = bytearray()
    for i in range(0, len(encoded), 777):
        dec.feed(encoded[i : i + 777])
        while piece := dec.read(4096):
            out += piece
    assert bytes(out) == original


# -- long lines, big header blocks, long streams -----------------------------------------

LONG = 25 * MiB  # one line without a line end, fed as TCP would deliver it


def pieces(data: bytes, size: int = 16384):
    return (data[i : i + size] for i in range(0, len(data), size))


def timed(fn) -> tuple[object, float]:
    """`fn()` and the CPU seconds this process spent on it: CPU time, not wall time, so other
    programs loading the machine do not count. The bounds below are a few times what the linear
    code needs here and several times less than the quadratic code they guard took (20+ s)."""
    t0 = time.process_time()
    result = fn()
    return result, time.process_time() - t0


def test_sse_long_line_is_linear_and_dropped_with_one_error() -> None:
    from oisp.decode.sse import SSEParser

    errors: list[str] = []
    p = SSEParser(errors.append)
    stream = b"data: " + b"x" * LONG + b"\n\ndata: after\n\n"
    events, elapsed = timed(lambda: [e for piece in pieces(stream) for e in p.feed(piece)])
    assert elapsed < 3.0, f"{elapsed:.1f} s"  # the rescanning parser took 24.6 s
    assert [e.data for e in events] == ["after"]
    assert len(errors) == 1


def test_sse_scans_only_new_bytes_below_the_cap() -> None:
    """A line just under the cap, in small pieces: kept, and still linear."""
    from oisp.decode.sse import MAX_LINE_BYTES, SSEParser

    p = SSEParser()
    line = b"data: " + b"y" * (MAX_LINE_BYTES - 100) + b"\r"
    events, elapsed = timed(lambda: [e for piece in pieces(line + b"\n\r\n", 4096) for e in p.feed(piece)])
    assert elapsed < 3.0, f"{elapsed:.1f} s"
    assert len(events) == 1
    assert len(events[0].data) == MAX_LINE_BYTES - 100


def test_sse_oversized_event_is_dropped_and_the_stream_goes_on() -> None:
    from oisp.decode.sse import MAX_EVENT_BYTES, SSEParser

    errors: list[str] = []
    p = SSEParser(errors.append)
    line = b"data: " + b"z" * (1024 * 1024) + b"\n"
    stream = line * (MAX_EVENT_BYTES // (1024 * 1024) + 2) + b"\n" + b"data: next\n\n"
    events = [e for piece in pieces(stream, 65536) for e in p.feed(piece)]
    assert [e.data for e in events] == ["next"]
    assert len(errors) == 1


def test_sse_long_line_through_the_decoder_is_one_counted_error() -> None:
    chunk = {"id": "c", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
    body = b"data: " + b"x" * LONG + b"\n\n" + b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    d = FlowDecoder(CTX)
    req_body = json.dumps({"model": "gpt-4o-mini", "messages": [], "stream": True}).encode()
    records, elapsed = timed(lambda: feed_all(d, request(req_body), response(body, ctype="text/event-stream")) + d.close(2.0))
    done = [r.exchange for r in records if isinstance(r, ResponseComplete)]
    assert elapsed < 4.0, f"{elapsed:.1f} s"
    assert done[0].ai_response.text == "ok"
    assert d.stats.decode_errors == 1
    assert not d.stats.abandoned


def test_ndjson_long_line_is_linear_and_dropped_with_one_error() -> None:
    from oisp.decode.framing import NDJSONSplitter

    errors: list[str] = []
    nd = NDJSONSplitter(errors.append)
    stream = b'{"a": "' + b"x" * LONG + b'"}\n{"b": 1}\n{"c": 2}'
    lines, elapsed = timed(lambda: [ln for piece in pieces(stream) for ln in nd.feed(piece)] + nd.close())
    assert elapsed < 3.0, f"{elapsed:.1f} s"
    assert lines == [b'{"b": 1}', b'{"c": 2}']
    assert len(errors) == 1


def test_json_array_oversized_element_is_dropped_and_the_array_goes_on() -> None:
    from oisp.decode.framing import JSONArraySplitter

    errors: list[str] = []
    arr = JSONArraySplitter(errors.append)
    stream = b'[{"a": "' + b"x" * LONG + b'", "n": [1, {"m": 2}]}, {"b": 1}]'
    elements, elapsed = timed(lambda: [el for piece in pieces(stream) for el in arr.feed(piece)])
    assert elapsed < 3.0, f"{elapsed:.1f} s"
    assert elements == [b'{"b": 1}']
    assert len(errors) == 1


def test_http2_continuation_flood_is_refused_in_bounded_memory() -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames without end: 160 MiB of header block."""
    import hpack
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    from oisp.decode.http2 import PREFACE

    head = HeadersFrame(1,
                        hpack.Encoder().encode([(":method", "POST"), (":path", "/v1/chat/completions"),
                                                (":authority", "api.openai.com"), (":scheme", "https")]))
    cont = ContinuationFrame(1, b"\x00" * 16384).serialize()
    d = FlowDecoder(FlowContext(("10.0.0.2", 50000), ("10.0.0.9", 443), 0.0, alpn="h2", tls_version="TLSv1.3"))

    def flood() -> None:
        d.feed(Direction.REQUEST, PREFACE + head.serialize(), 1.0)
        for _ in range(10_000):
            d.feed(Direction.REQUEST, cont, 1.0)

    _, peak = peak_while(flood)
    assert peak < 8 * MiB, f"peak {peak / MiB:.0f} MiB"
    assert d.stats.decode_errors == 1
    assert d.stats.abandoned
    assert "header block" in (d.stats.last_error or "")


def _deltas(api: str, piece: str, n: int) -> list[object]:
    """``n`` streamed objects of ``api``'s format, each carrying ``piece`` as text (and, where the
    format has them, as tool-call arguments and thinking)."""
    if api == "openai.chat":
        return [{"choices": [{"index": 0,
                              "delta": {"content": piece, "reasoning_content": piece,
                                        "tool_calls": [{"index": 0, "function": {"arguments": piece}}]}}]}] * n
    if api == "openai.responses":
        added = {"type": "response.output_item.added", "item": {"type": "function_call", "id": "fc", "name": "f"}}
        return [added] + [{"type": t, "delta": piece, "item_id": "fc"} for _ in range(n)
                          for t in ("response.output_text.delta", "response.function_call_arguments.delta",
                                    "response.reasoning_text.delta")]
    if api == "anthropic.messages":
        starts = [{"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
                  {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f"}}]
        return starts + [
            d for _ in range(n)
            for d in ({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                      {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}},
                      {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": piece}})
        ]
    if api == "gemini.generate":
        return [{"candidates": [{"index": 0, "content": {"parts": [{"text": piece}, {"text": piece, "thought": True}]}}]}] * n
    if api == "ollama.chat":
        return [{"message": {"content": piece, "thinking": piece}}] * n
    if api == "cohere.chat":
        start = {"type": "tool-call-start", "delta": {"message": {"tool_calls": {"id": "t", "function": {"name": "f"}}}}}
        return [start] + [
            d for _ in range(n)
            for d in ({"type": "content-delta", "delta": {"message": {"content": {"text": piece}}}},
                      {"type": "tool-call-delta", "delta": {"message": {"tool_calls": {"function": {"arguments": piece}}}}})
        ]
    raise ValueError(api)


@pytest.mark.parametrize("api",
                         ["openai.chat", "openai.responses", "anthropic.messages", "gemini.generate", "ollama.chat",
                          "cohere.chat"])
def test_assemblers_are_linear_in_the_number_of_deltas(api: str) -> None:
    from oisp.decode.providers import FORMATS

    n, piece = 10_000, "x" * 1023 + "."
    objs = _deltas(api, piece, n)
    asm = FORMATS[api].assembler()
    info, elapsed = timed(lambda: [asm.on_json(o, 1.0) for o in objs] and asm.finish())
    assert elapsed < 3.0, f"{elapsed:.1f} s"  # text built with += took 21 s
    assert info.text == piece * n
    if api != "ollama.chat" and api != "gemini.generate":
        assert info.tool_calls[0].arguments == piece * n
    if api != "cohere.chat":
        assert info.thinking == piece * n
