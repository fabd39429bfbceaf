"""HTTP/1.1 framing: keep-alive, pipelining, HEAD/204/304, 100-continue, codings, read-until-close."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest

from oisp.decode import Direction, FlowContext, FlowDecoder, RequestComplete, ResponseComplete

CTX = FlowContext(("127.0.0.1", 40000), ("127.0.0.1", 11434), 0.0)
CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()
REPLY = json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": "héllo"}, "done": True,
                    "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2}).encode()


def req(method: str = "POST", path: str = "/api/chat", body: bytes = CHAT, extra: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: localhost:11434\r\n{length}{extra}\r\n".encode() + body


def resp(body: bytes = REPLY, status: str = "200 OK", extra: str = "", length: bool = True) -> bytes:
    cl = f"Content-Length: {len(body)}\r\n" if length else ""
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{cl}{extra}\r\n".encode() + body


def decode(request: bytes, response: bytes, close: bool = True) -> tuple[list, FlowDecoder]:
    d = FlowDecoder(CTX)
    out = d.feed(Direction.REQUEST, request, 1.0) + d.feed(Direction.RESPONSE, response, 2.0)
    if close:
        out += d.close(3.0)
    return out, d


def completed(records: list) -> list:
    return [r.exchange for r in records if isinstance(r, ResponseComplete)]


def test_keep_alive_three_exchanges() -> None:
    records, d = decode(req() * 3, resp() * 3, close=False)
    done = completed(records)
    assert [e.stream for e in done] == [0, 1, 2]
    assert all(e.ai_response.text == "héllo" and e.complete for e in done)
    assert d.stats.decode_errors == 0


def test_pipelined_requests_sent_before_any_response() -> None:
    d = FlowDecoder(CTX)
    first = d.feed(Direction.REQUEST, req() + req("GET", "/api/tags", b"") + req(), 1.0)
    assert sum(isinstance(r, RequestComplete) for r in first) == 1  # the rest wait for their turn
    records = d.feed(Direction.RESPONSE, resp() + resp(b'{"models":[]}') + resp(), 2.0)
    done = completed(records)
    assert [e.method for e in done] == ["POST", "GET", "POST"]
    assert done[1].match is None
    assert done[0].ai_response.text == done[2].ai_response.text == "héllo"


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_no_body_statuses(status: str) -> None:
    # 204/304 carry no body even if they announce one, and the next exchange follows at once.
    records, d = decode(req("GET", "/x", b"") + req(), resp(b"", status, length=False) + resp())
    done = completed(records)
    assert [e.status for e in done] == [int(status[:3]), 200]
    assert done[1].ai_response.text == "héllo"


def test_head_response_has_no_body_despite_content_length() -> None:
    head_resp = b"HTTP/1.1 200 OK\r\nContent-Length: 9999\r\n\r\n"
    records, d = decode(req("HEAD", "/api/chat", b"") + req(), head_resp + resp())
    done = completed(records)
    assert [e.method for e in done] == ["HEAD", "POST"]
    assert done[1].ai_response.text == "héllo"
    assert d.stats.decode_errors == 0


def test_expect_100_continue() -> None:
    d = FlowDecoder(CTX)
    head, body = req(extra="Expect: 100-continue\r\n").split(b"\r\n\r\n", 1)
    out = d.feed(Direction.REQUEST, head + b"\r\n\r\n", 1.0)
    out += d.feed(Direction.RESPONSE, b"HTTP/1.1 100 Continue\r\n\r\n", 1.1)
    out += d.feed(Direction.REQUEST, body, 1.2)
    out += d.feed(Direction.RESPONSE, resp(), 2.0)
    done = completed(out)
    assert len(done) == 1
    assert done[0].status == 200
    assert done[0].ai_response.text == "héllo"


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize(
    "name,encode",
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
        ("br", brotli.compress),
        ("zstd", _zstd),
        ("gzip, br", lambda b: brotli.compress(gzip.compress(b))),
    ],
)
def test_content_encodings(name: str, encode) -> None:
    body = encode(REPLY)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    response = f"HTTP/1.1 200 OK\r\nContent-Encoding: {name}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked
    records, d = decode(req(), response)
    assert completed(records)[0].ai_response.text == "héllo"
    assert d.stats.decode_errors == 0


def test_gzip_request_body() -> None:
    body = gzip.compress(CHAT)
    records, _ = decode(req(body=body, extra="Content-Encoding: gzip\r\n"), resp())
    assert completed(records)[0].ai_request.model == "llama3.2"


def test_body_read_until_close() -> None:
    records, d = decode(req(), b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + REPLY)
    done = completed(records)
    assert done[0].complete
    assert done[0].ai_response.text == "héllo"


def test_truncated_response_is_reported_incomplete() -> None:
    records, d = decode(req(), resp()[:-10])
    done = completed(records)
    assert len(done) == 1
    assert not done[0].complete
    assert "response_incomplete" in done[0].problems


def test_garbage_is_one_counted_error_and_no_exchange() -> None:
    records, d = decode(b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"\x00\xff" * 100)
    assert records == []
    assert d.stats.decode_errors == 1
    assert d.stats.abandoned


def test_malformed_after_good_exchange_keeps_the_good_one() -> None:
    records, d = decode(req() + b"NOT HTTP AT ALL\r\n\r\n", resp())
    assert len(completed(records)) == 1
    assert d.stats.decode_errors == 1
