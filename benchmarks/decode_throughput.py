"""Decode throughput: 1,000 HTTP/1.1 exchanges on one keep-alive connection, and one SSE
stream of 500 chunks, through the decoder alone and through the full recorder
(decode + OISP events + redaction). Prints events/s and MB/s of wire bytes.

    PYTHONPATH=. python benchmarks/decode_throughput.py [--repeat 5] [--segment 1460]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from oisp.decode import Direction, FlowContext, FlowDecoder
from oisp.events import FlowRecorder
from oisp.spec import default_spec

CTX = FlowContext(("10.0.0.2", 50000), ("10.0.0.9", 443), 0.0, sni="api.openai.com", tls_version="TLSv1.3", alpn="http/1.1")
HEAD = ("POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-proj-BENCHKEY0000000000000000\r\n"
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n")


def exchanges(n: int = 1000) -> tuple[bytes, bytes]:
    """n non-streaming chat completions, requests and responses each back to back."""
    reqs, resps = [], []
    for i in range(n):
        body = json.dumps({"model": "gpt-4o-mini",
                           "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}],
                           "temperature": 0.2}).encode()
        reqs.append(HEAD.format(len(body)).encode() + body)
        out = json.dumps({"id": f"chatcmpl-{i}", "object": "chat.completion", "model": "gpt-4o-mini",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": f"The answer is {2 * i}."},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 25, "completion_tokens": 6, "total_tokens": 31}}).encode()
        resps.append(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
    return b"".join(reqs), b"".join(resps)


def sse_stream(chunks: int = 500) -> tuple[bytes, bytes]:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me a story."}],
                       "stream": True}).encode()
    events = [{"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
               "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]} for i in range(chunks)]
    events.append({"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}})
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(sse[i : i + 200]), sse[i : i + 200])
                       for i in range(0, len(sse), 200)) + b"0\r\n\r\n"
    response_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return HEAD.format(len(body)).encode() + body, response_head + chunked


def run_once(kind: str, request: bytes, response: bytes, segment: int, streaming_chunks: bool) -> tuple[float, int]:
    """Feed in `segment`-byte pieces like TCP reads; returns (seconds, items out)."""
    spec = default_spec()
    target = FlowDecoder(CTX, spec) if kind == "decoder" else FlowRecorder(CTX, spec=spec, streaming_chunks=streaming_chunks)
    t0 = time.perf_counter()
    out = 0
    for direction, data in ((Direction.REQUEST, request), (Direction.RESPONSE, response)):
        for i in range(0, len(data), segment):
            out += len(target.feed(direction, data[i : i + segment], 1.0))
    out += len(target.close(2.0))
    elapsed = time.perf_counter() - t0
    assert target.stats.decode_errors == 0
    return elapsed, out


def measure(name: str, request: bytes, response: bytes, repeat: int, segment: int) -> list[dict]:
    rows = []
    for kind, chunks, label in (("decoder", False, "decode records"), ("recorder", False, "OISP events"),
                                ("recorder", True, "OISP events + streaming_chunk")):
        if chunks and "SSE" not in name:
            continue
        best, items = min(run_once(kind, request, response, segment, chunks) for _ in range(repeat))
        mb = (len(request) + len(response)) / 1e6
        rows.append({"workload": name, "output": label, "items": items, "seconds": best, "items_per_s": items / best,
                     "mb_per_s": mb / best, "wire_mb": mb})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="best of N runs (default 5)")
    ap.add_argument("--segment", type=int, default=1460, help="bytes per feed() call (default 1460, one TCP MSS)")
    args = ap.parse_args()
    rows = measure("1,000 HTTP/1.1 exchanges (keep-alive)", *exchanges(1000), args.repeat, args.segment)
    rows += measure("SSE stream, 500 chunks", *sse_stream(500), args.repeat, args.segment)
    print(f"Python {platform.python_version()} on {platform.machine()}, best of {args.repeat}, {args.segment}-byte feeds")
    print(f"{'workload':<40} {'output':<32} {'items':>6} {'ms':>8} {'items/s':>10} {'MB/s':>7}")
    for r in rows:
        print(f"{r['workload']:<40} {r['output']:<32} {r['items']:>6} {r['seconds'] * 1000:>8.1f} {r['items_per_s']:>10,.0f} "
              f"{r['mb_per_s']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
