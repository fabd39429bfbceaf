"""A fake upstream AI provider for interception tests: HTTPS (HTTP/1.1 and h2,
via hypercorn) with its own test CA, answering like the OpenAI and Anthropic
APIs, streamed (SSE) or not.

    python tests/fakeprovider.py --port 9443 --cert leaf.pem --key leaf.key

Answers are deterministic so a test can check the client got exactly them:
the reply text is "echo: <last user message>", and a streamed reply is sent
as one SSE event per word of FILLER (with `"stream_chunks": N` in the body
choosing how many; `"think_seconds": S` waits S seconds before answering).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTS = ["api.openai.com", "api.anthropic.com", "api.mistral.ai", "example.test"]


def make_test_pki(directory) -> tuple[str, str, str]:
    """A throwaway CA and one leaf for HOSTS, written to `directory`: (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake provider test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [f"{directory}/upstream-ca.pem", f"{directory}/upstream-leaf.pem", f"{directory}/upstream-leaf.key"]
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths[0], paths[1], paths[2]


def last_user_text(messages: list) -> str:
    content = messages[-1]["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def words(count: int) -> list[str]:
    return [f"w{i} " for i in range(count)]


def openai_chat(body: dict):
    text = "echo: " + last_user_text(body["messages"])
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    base = {"id": "chatcmpl-fake1", "created": 1763769600, "model": body["model"]}
    if not body.get("stream"):
        return "application/json", [json.dumps({
            **base, "object": "chat.completion", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }).encode()]
    pieces = [text] + words(body.get("stream_chunks", 0))
    chunks = [{**base, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    chunks.append({**base, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage})
    return "text/event-stream", [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def anthropic_messages(body: dict):
    text = "echo: " + last_user_text(body["messages"])
    message = {"id": "msg_fake1", "type": "message", "role": "assistant", "model": body["model"],
               "stop_reason": None, "stop_sequence": None, "content": [],
               "usage": {"input_tokens": 13, "output_tokens": 1}}
    if not body.get("stream"):
        return "application/json", [json.dumps({
            **message, "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 13, "output_tokens": 5}}).encode()]
    events = [("message_start", {"type": "message_start", "message": message}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    for piece in [text] + words(body.get("stream_chunks", 0)):
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": piece}}))
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": 5}}),
               ("message_stop", {"type": "message_stop"})]
    return "text/event-stream", [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path.endswith("/chat/completions"):
        request = json.loads(body)
        await asyncio.sleep(request.get("think_seconds", 0))  # a model slow to answer: nothing flows meanwhile
        content_type, parts = openai_chat(request)
    elif path.endswith("/messages"):
        content_type, parts = anthropic_messages(json.loads(body))
    else:
        content_type, parts = "text/plain", [b"plain upstream reply\n"]
    await send({"type": "http.response.start", "status": 200,
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
