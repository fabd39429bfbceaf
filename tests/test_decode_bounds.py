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
    head = f"POST {path} HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n{enc}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def response(body: bytes, coding: str | None = None, ctype: str = "application/json") -> bytes:
    enc = f"Content-Encoding: {coding}\r\n" if coding else ""
    return f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{enc}Content-Length: {len(body)}\r\n\r\n".encode() + body


CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
REPLY = json.dumps({"id": "c1", "model": "gpt-4o-mini", "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]}).encode()


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
    assert rec.stats.bodies_truncated == 1 and rec.stats.decode_errors == 0
    requests = [e for e in events if e["event_type"] == "ai.request"]
    assert len(requests) == 2
    bombed, good = requests
    assert bombed["confidence"]["completeness"] == "partial" and "body_truncated" in bombed["confidence"]["reasons"]
    assert "body_truncated" in bombed["confidence"]["limitations"]
    assert good["confidence"]["completeness"] == "full" and good["data"]["model"]["id"] == "gpt-4o-mini"


@pytest.mark.parametrize("coding", ["br", "zstd"])
def test_streamed_response_bomb_is_parsed_up_to_the_budget_in_little_memory(coding: str) -> None:
    """A framed (SSE) body is not kept, so a bomb there must not be held either: it is parsed piece by piece."""
    stream = bomb(coding, b": " + b"k" * 1021 + b"\n")  # SSE comment lines: cheap to parse, nothing to assemble
    d = FlowDecoder(CTX)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "stream": True}).encode()
    records, peak = peak_while(lambda: feed_all(d, request(body), response(stream, coding, "text/event-stream")) + d.close(2.0))
    assert peak < 8 * MiB, f"peak {peak / MiB:.0f} MiB"
    done = [r.exchange for r in records if isinstance(r, ResponseComplete)]
    assert len(done) == 1 and "body_truncated" in done[0].problems and d.stats.bodies_truncated == 1


def test_body_decoder_never_returns_more_than_asked() -> None:
    for coding in ("br", "gzip", "zstd", "gzip, br"):
        dec = BodyDecoder(coding)
        dec.feed(bomb(coding)[:100_000])
        sizes = [len(dec.read(n)) for n in (1, 1000, 65536, 300_000, 7)]
        assert all(s <= n for s, n in zip(sizes, (1, 1000, 65536, 300_000, 7))) and sum(sizes) > 0, (coding, sizes)


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
