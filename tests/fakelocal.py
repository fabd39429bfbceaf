"""A fake local model server for the plaintext tests: plain HTTP (HTTP/1.1 with
keep-alive and chunked streams, h2c by prior knowledge: hypercorn), speaking
Ollama's native API and the OpenAI-compatible API local servers expose, in their
documented wire formats:

- POST /api/chat, /api/generate: NDJSON (application/x-ndjson), one object per
  token, the last with "done": true, "done_reason" and the eval counts; "stream":
  false gives one JSON object (Ollama streams by default);
- GET /api/version, /api/tags: what the ollama client may ask;
- POST /v1/chat/completions, /v1/completions: SSE with a final usage chunk when
  stream_options.include_usage is set, or one JSON body; /v1/embeddings.

Replies are deterministic: "echo: <last user text>" then FILLER words (`"stream_chunks":
N` in the body picks how many pieces; `"think_seconds": S` waits before answering;
`"chunk_delay": S` between pieces). A non-streamed body is gzip'd when the client
accepts gzip.

    python tests/fakelocal.py --host 127.0.0.1 --port 11434 [--log FILE]

With --log, one JSON line per reply says how it went on the wire (HTTP version,
gzip'd, streamed without a length: chunked on HTTP/1.1), for tests to check.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import time

from fakeprovider import request_body  # a sibling script: tests/ is this script's sys.path[0]

FILLER = "the quick brown fox jumps over the lazy dog".split()
PROMPT_TOKENS = 11


def pieces(text: str, count: int) -> list[str]:
    """The reply as `count` pieces (at least the echo): their join is the whole reply."""
    words = [text] + [f" {FILLER[i % len(FILLER)]}" for i in range(max(0, count - 1))]
    return words


def last_user(messages) -> str:
    for m in reversed(messages or []):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def ollama(path: str, body: dict) -> tuple[str, list[bytes]]:
    chat = path == "/api/chat"
    text = "echo: " + (last_user(body.get("messages")) if chat else str(body.get("prompt", "")))
    parts = pieces(text, int(body.get("stream_chunks", 4)))
    model = body.get("model", "llama3.2")
    final = {"done": True, "done_reason": "stop", "total_duration": 5_000_000, "load_duration": 1_000_000,
             "prompt_eval_count": PROMPT_TOKENS, "prompt_eval_duration": 1_000_000, "eval_count": len(parts),
             "eval_duration": 2_000_000}

    def piece(content: str, done: bool) -> dict:
        out = {"model": model, "created_at": _now()}
        out.update({"message": {"role": "assistant", "content": content}} if chat else {"response": content})
        out["done"] = done
        return out

    if body.get("stream", True) is False:
        whole = {**piece("".join(parts), True), **final}
        if not chat:
            whole["context"] = [1, 2, 3]
        return "application/json", [json.dumps(whole).encode()]
    lines = [json.dumps(piece(p, False)).encode() + b"\n" for p in parts]
    lines.append(json.dumps({**piece("", True), **final}).encode() + b"\n")
    return "application/x-ndjson", lines


def openai(path: str, body: dict) -> tuple[str, list[bytes]]:
    model = body.get("model", "local-model")
    if path.endswith("/embeddings"):
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        return "application/json", [json.dumps({"object": "list", "data": data, "model": model,
                                                "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode()]
    chat = path.endswith("/chat/completions")
    text = "echo: " + (last_user(body.get("messages")) if chat else str(body.get("prompt", "")))
    parts = pieces(text, int(body.get("stream_chunks", 4)))
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(parts),
             "total_tokens": PROMPT_TOKENS + len(parts)}
    base = {"id": "chatcmpl-local" if chat else "cmpl-local", "created": int(time.time()), "model": model}
    if not body.get("stream"):
        choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(parts)}, "finish_reason": "stop"}
                  if chat else {"index": 0, "text": "".join(parts), "finish_reason": "stop"})
        obj = {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage}
        return "application/json", [json.dumps(obj).encode()]
    kind = "chat.completion.chunk" if chat else "text_completion"
    events = []
    for i, p in enumerate(parts):
        delta = ({"role": "assistant", "content": p} if i == 0 else {"content": p}) if chat else None
        choice = {"index": 0, "delta": delta, "finish_reason": None} if chat else {"index": 0, "text": p, "finish_reason": None}
        events.append({**base, "object": kind, "choices": [choice]})
    end = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else {"index": 0, "text": "", "finish_reason": "stop"}
    events.append({**base, "object": kind, "choices": [end]})
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**base, "object": kind, "choices": [], "usage": usage})
    return "text/event-stream", [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


async def app(scope, receive, send):
    raw = await request_body(scope, receive, send)
    if raw is None:
        return
    path = scope["path"]
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {}
    if scope["method"] == "GET" and path == "/api/version":
        content_type, parts = "application/json", [b'{"version":"0.12.0"}']
    elif scope["method"] == "GET" and path == "/api/tags":
        content_type, parts = "application/json", [b'{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"}]}']
    elif path in ("/api/chat", "/api/generate"):
        content_type, parts = ollama(path, body)
    elif path.startswith("/v1/"):
        content_type, parts = openai(path, body)
    else:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"not found\n"})
        return
    await asyncio.sleep(float(body.get("think_seconds", 0)))
    headers = [(b"content-type", content_type.encode())]
    accepts = dict(scope["headers"]).get(b"accept-encoding", b"")
    streamed = len(parts) > 1
    if not streamed and b"gzip" in accepts:
        parts = [gzip.compress(parts[0])]
        headers.append((b"content-encoding", b"gzip"))
    log = os.environ.get("FAKELOCAL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"path": path, "http_version": scope["http_version"], "streamed": streamed,
                                "gzip": (b"content-encoding", b"gzip") in headers}) + "\n")
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    delay = float(body.get("chunk_delay", 0.001))
    for part in parts:
        await send({"type": "http.response.body", "body": part, "more_body": True})
        if streamed:
            await asyncio.sleep(delay)  # really streamed: one write per piece
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", action="append", default=[])
    parser.add_argument("--port", type=int, action="append", default=[])
    parser.add_argument("--log", help="one JSON line per reply: its HTTP version, gzip, streamed")
    args = parser.parse_args()
    if args.log:
        os.environ["FAKELOCAL_LOG"] = args.log
    config = Config()
    config.bind = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h in (args.host or ["127.0.0.1"])
                   for p in (args.port or [11434])]
    config.keep_alive_timeout = 60
    config.accesslog = None
    asyncio.run(serve(app, config))


if __name__ == "__main__":
    main()
