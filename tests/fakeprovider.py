"""A fake upstream AI provider for interception tests: HTTPS (HTTP/1.1 and h2,
via hypercorn) with its own test CA, answering like the OpenAI and Anthropic
APIs (oisp.demo.provider's answers), streamed (SSE) or not.

    python tests/fakeprovider.py --port 9443 --cert leaf.pem --key leaf.key

Answers are deterministic so a test can check the client got exactly them:
the reply text is "echo: <last user message>", and a streamed reply is sent
as one SSE event per word of FILLER (with `"stream_chunks": N` in the body
choosing how many; `"think_seconds": S` waits S seconds before answering).
"""

from __future__ import annotations

import argparse
import asyncio
import json

# The wire formats and the test PKI have one home, the demo's provider; this file adds
# the HTTP/2-capable server (hypercorn) the interception tests need.
from oisp.demo.provider import HOSTS, answer, make_test_pki  # noqa: F401 - re-exported


async def request_body(scope, receive, send) -> bytes | None:
    """An ASGI call's whole request body; None for the server's lifespan call, answered here.
    (The fakes' own: test clients send small bodies, so no bound.)"""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return None
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def app(scope, receive, send):
    body = await request_body(scope, receive, send)
    if body is None:
        return
    if scope["path"].endswith("/chat/completions") and b'"think_seconds"' in body:
        await asyncio.sleep(json.loads(body)["think_seconds"])  # a model slow to answer: nothing flows meanwhile
    status, content_type, parts = answer(scope["path"], body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"x-request-id", b"req_fake")]})
    for part in parts:
        await send({"type": "http.response.body", "body": part, "more_body": True})
        if content_type == "text/event-stream":
            await asyncio.sleep(0.001)  # really streamed: one write per event
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"]
    config.certfile, config.keyfile = args.cert, args.key
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = None
    config.errorlog = None
    print("ready", flush=True)
    asyncio.run(serve(app, config))


if __name__ == "__main__":
    main()
