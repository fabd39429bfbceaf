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
from provider_cases import Case, context, http1_request, http1_response, load_cases

from oisp.decode import Direction, FlowContext, FlowDecoder
from oisp.events import FlowRecorder
from tests.events_compare import normalise

CASES = load_cases()


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


CLEAN_REQUESTS = {c.name: [e for e in run(c, [], []) if e["event_type"] == "ai.request"] for c in CASES}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=16))
def test_corrupted_valid_stream_is_counted_not_raised(pos: int, junk: bytes) -> None:
    """Junk in a response: the request stays as it was, the exchange is still reported once, and
    a response the decoder had to give up on is never presented as complete."""
    case = CASES[pos % len(CASES)]
    response = http1_response(case)
    at = pos % len(response)
    rec = FlowRecorder(context(case), streaming_chunks=True)
    events = rec.feed(Direction.REQUEST, http1_request(case), 5.0)
    events += rec.feed(Direction.RESPONSE, response[:at] + junk + response[at:], 5.0)
    events += rec.close(6.0)
    events = normalise(events)
    assert [e for e in events if e["event_type"] == "ai.request"] == CLEAN_REQUESTS[case.name]
    responses = [e for e in events if e["event_type"] == "ai.response"]
    assert len(responses) == 1
    if rec.stats.abandoned:
        assert responses[0]["confidence"]["completeness"] == "partial"


def test_http_garbage_counts_exactly_one_error() -> None:
    d = FlowDecoder(FlowContext(("1.1.1.1", 1), ("2.2.2.2", 80), 0.0))
    assert d.feed(Direction.REQUEST, b"\x00\x01\x02 not http \r\n\r\n" * 50, 1.0) == []
    assert d.feed(Direction.RESPONSE, b"more garbage", 1.0) == []
    d.close(2.0)
    assert d.stats.decode_errors == 1


# -- the standing fuzz: every decoder entry point, each input bounded in time and memory ----
#
# Hypothesis with a fixed seed (derandomize) and a bounded number of examples, so CI runs the
# same corpus every time in a few seconds. Each input must finish within LIMIT_S and peak under
# LIMIT_BYTES of Python allocations (tracemalloc) - far above what a linear, bounded decoder
# needs for inputs this small, far below what an unbounded one reaches.

import time  # noqa: E402
import tracemalloc  # noqa: E402
import zlib  # noqa: E402

import brotli  # noqa: E402
import hpack  # noqa: E402
import zstandard  # noqa: E402

from oisp.decode.content_encoding import BodyDecoder, ContentDecodingError  # noqa: E402
from oisp.decode.framing import JSONArraySplitter, NDJSONSplitter  # noqa: E402
from oisp.decode.http2 import PREFACE  # noqa: E402
from oisp.decode.sse import SSEParser  # noqa: E402
from oisp.pcapng import CaptureFormatError, TcpReassembler, parse_segment, read_packets  # noqa: E402
from oisp.pcapng.reader import ReadStats  # noqa: E402

LIMIT_S = 2.0
LIMIT_BYTES = 48 * 1024 * 1024
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def bounded(fn) -> object:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"
    assert peak < LIMIT_BYTES, f"peak {peak >> 20} MiB"
    return result


def chunks(max_size: int = 256) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.binary(max_size=max_size), max_size=12)


def compressible() -> st.SearchStrategy[bytes]:
    """Text-like bytes (with SSE/JSON punctuation), sometimes repeated into a small bomb."""
    punctuation = [b"data: ", b"\n\n", b"\r\n", b'{"a": [1, "x"]}', b"\n", b"[", b"]", b",", b'"\\']
    piece = st.binary(max_size=64) | st.sampled_from(punctuation)
    return st.tuples(st.lists(piece, max_size=16), st.integers(1, 200_000)).map(
        lambda t: b"".join(t[0]) * (t[1] if len(b"".join(t[0])) < 8 else 1))


ENCODERS = {
    "gzip": lambda b: zlib.compress(b, wbits=31),
    "deflate": zlib.compress,
    "br": lambda b: brotli.compress(b, quality=1),
    "zstd": lambda b: zstandard.ZstdCompressor(level=1).compress(b),
    "gzip, br": lambda b: brotli.compress(zlib.compress(b, wbits=31), quality=1),
}


@FUZZ
@given(st.sampled_from(sorted(ENCODERS)), compressible(),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4), st.integers(1, 9000))
def test_fuzz_content_decoders(coding: str, plain: bytes, flips: list[tuple[int, int]], step: int) -> None:
    """Valid, damaged and bomb-like encoded bodies: bounded reads, errors only as ContentDecodingError."""
    data = bytearray(ENCODERS[coding](plain))
    for at, value in flips:
        data[at % len(data)] = value

    cap = 4 * 1024 * 1024  # what a caller with a small budget asks for at most

    def run() -> bytes:
        dec, out = BodyDecoder(coding), bytearray()
        try:
            for i in range(0, len(data), step):
                dec.feed(bytes(data[i : i + step]))
                while len(out) < cap and (piece := dec.read(65536)):
                    assert len(piece) <= 65536
                    out += piece
        except ContentDecodingError:
            pass
        return bytes(out)

    out = bounded(run)
    if not flips:  # undamaged: exactly the original, up to what was asked for
        assert out == plain[: len(out)]
        assert len(out) >= min(len(plain), cap)


@FUZZ
@given(chunks())
def test_fuzz_sse(pieces: list[bytes]) -> None:
    def run() -> list:
        p = SSEParser()
        return [e for piece in pieces for e in p.feed(piece)]

    assert bounded(run) == SSEParser().feed(b"".join(pieces))  # cut-invariant


@FUZZ
@given(chunks())
def test_fuzz_ndjson_and_json_array(pieces: list[bytes]) -> None:
    whole = b"".join(pieces)

    def run() -> tuple[list[bytes], list[bytes]]:
        nd, arr = NDJSONSplitter(), JSONArraySplitter()
        return [x for p in pieces for x in nd.feed(p)] + nd.close(), [x for p in pieces for x in arr.feed(p)]

    lines, elements = bounded(run)
    nd, arr = NDJSONSplitter(), JSONArraySplitter()
    # cut-invariant
    assert lines == nd.feed(whole) + nd.close()
    assert elements == arr.feed(whole)


def _http1_message(start: str, headers: list[str], body: bytes, chunked: bool) -> bytes:
    if chunked:
        headers = [*headers, "Transfer-Encoding: chunked"]
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 50]), body[i : i + 50])
                        for i in range(0, len(body), 50)) + b"0\r\n\r\n"
    else:
        headers = [*headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join([start, *headers]) + "\r\n\r\n").encode() + body


@FUZZ
@given(
    st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/responses", "/api/chat",
                     "/v1beta/models/gemini-2.0-flash:streamGenerateContent", "/x"]),
    st.sampled_from(["text/event-stream", "application/x-ndjson", "application/json", "text/plain"]),
    st.sampled_from([None, *sorted(ENCODERS)]),
    compressible(),
    st.booleans(),
    st.lists(st.integers(1, 4000), max_size=6),
)
def test_fuzz_http1_exchanges(path: str, ctype: str, coding: str | None, body: bytes, chunked: bool, cuts: list[int]) -> None:
    """Well-framed HTTP/1.1 carrying hostile bodies in every framing and coding, cut anywhere."""
    req_body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    request = _http1_message(f"POST {path} HTTP/1.1", ["Host: api.openai.com", "Content-Type: application/json"], req_body, False)
    encoded = ENCODERS[coding](body) if coding else body
    response = _http1_message("HTTP/1.1 200 OK", [f"Content-Type: {ctype}", *([f"Content-Encoding: {coding}"] if coding else [])],
                              encoded, chunked)

    def run() -> list:
        rec = FlowRecorder(FlowContext(("10.0.0.2", 5), ("10.0.0.9", 443), 0.0, sni="api.openai.com", alpn="http/1.1",
                                       tls_version="TLSv1.3"), streaming_chunks=True)
        out = rec.feed(Direction.REQUEST, request, 1.0)
        bounds = [0, *sorted(c % max(len(response), 1) for c in cuts), len(response)]
        for a, b in zip(bounds, bounds[1:]):
            out += rec.feed(Direction.RESPONSE, response[a:b], 2.0)
        return out + rec.close(3.0), rec

    events, rec = bounded(run)
    # Well-framed HTTP: whatever the body holds, the connection is never given up and the exchange is reported.
    assert not rec.stats.abandoned
    assert [e["event_type"] for e in events
            if e["event_type"] in ("ai.request", "ai.response")] in (["ai.request", "ai.response"], [])


_FRAME_TYPES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x0A, 0xFF])


@st.composite
def h2_frames(draw) -> bytes:
    """A preface, then frames with real headers but random types, flags, streams and payloads."""
    enc = hpack.Encoder()
    out = [PREFACE]
    for _ in range(draw(st.integers(0, 12))):
        ftype = draw(_FRAME_TYPES)
        if ftype in (1, 9) and draw(st.booleans()):
            payload = enc.encode([(":method", "POST"), (":path", draw(st.sampled_from(["/v1/chat/completions", "/v1/messages"]))),
                                  (":authority", "api.openai.com"), (":scheme", "https"),
                                  ("content-type", draw(st.sampled_from(["text/event-stream", "application/json"])))])
            payload = payload[: draw(st.integers(0, len(payload)))]
        else:
            payload = draw(st.binary(max_size=80))
        flags, stream = draw(st.integers(0, 255)), draw(st.sampled_from([0, 1, 3, 5, 2**31 - 1]))
        out.append(len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload)
    return b"".join(out)


@FUZZ
@given(h2_frames(), h2_frames(), st.integers(1, 200))
def test_fuzz_http2(requests: bytes, responses: bytes, step: int) -> None:
    def run() -> FlowDecoder:
        d = FlowDecoder(FlowContext(("10.0.0.2", 5), ("10.0.0.9", 443), 0.0, sni="api.openai.com", alpn="h2",
                                    tls_version="TLSv1.3"))
        for i in range(0, max(len(requests), len(responses)), step):
            d.feed(Direction.REQUEST, requests[i : i + step], 1.0)
            d.feed(Direction.RESPONSE, responses[i + len(PREFACE) : i + len(PREFACE) + step], 1.5)
        d.close(2.0)
        return d

    d = bounded(run)
    # Given up only for a protocol error, never for an exception the decoder did not expect (a bug).
    assert not d.stats.abandoned or (d.stats.last_error or "").startswith("HTTP/2: "), d.stats.last_error


_PCAPNG_SHB = bytes.fromhex("0a0d0d0a1c0000004d3c2b1a01000000ffffffffffffffff1c000000")
_IDB = bytes.fromhex("0100000014000000010000000000040014000000")


@FUZZ
@given(st.sampled_from(["pcapng", "pcap"]), st.lists(st.binary(max_size=120), max_size=10),
       st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=5))
def test_fuzz_capture_reader(tmp_path_factory, kind: str, frames: list[bytes], flips: list[tuple[int, int]]) -> None:
    """Captures with random frames and damaged bytes: packets, counted skips or CaptureFormatError only."""
    if kind == "pcapng":
        blocks = [_PCAPNG_SHB, _IDB]
        for f in frames:
            body = (0).to_bytes(4, "little") * 3 + len(f).to_bytes(4, "little") * 2 + f + b"\0" * (-len(f) % 4)
            length = (len(body) + 12).to_bytes(4, "little")
            blocks.append((6).to_bytes(4, "little") + length + body + length)
    else:
        blocks = [bytes.fromhex("d4c3b2a1020004000000000000000000ffff000001000000")]
        blocks += [(0).to_bytes(8, "little") + len(f).to_bytes(4, "little") * 2 + f for f in frames]
    data = bytearray(b"".join(blocks))
    for at, value in flips:
        data[at % len(data)] = value
    path = tmp_path_factory.mktemp("cap") / "f"
    path.write_bytes(bytes(data))

    def run() -> int:
        n = 0
        try:
            for item in TcpReassembler().segments(s for p in read_packets(path, ReadStats())
                                                  if (s := parse_segment(p)) is not None):
                n += 1
        except CaptureFormatError:
            pass
        return n

    bounded(run)
