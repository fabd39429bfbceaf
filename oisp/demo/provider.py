"""A stand-in AI provider for `oisp demo` (and the tests' fake provider): the OpenAI
chat-completions and Anthropic messages wire formats, streamed (SSE) or not, over
HTTPS with a throwaway CA of its own.

    python -m oisp.demo.provider --host 10.203.1.2 --port 443 --cert leaf.pem --key leaf.key

Answers are deterministic so a caller can check the client got exactly them: the
reply text is "echo: <last user message>", and a streamed reply is sent as one
SSE event per word (with `"stream_chunks": N` in the body adding N filler words).

The server is the standard library's (HTTP/1.1 with keep-alive, one thread per
connection): the demo needs nothing that `pip install oisp` does not bring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import ssl
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTS = ["api.openai.com", "api.anthropic.com", "api.mistral.ai", "example.test", "generativelanguage.googleapis.com"]
MAX_BODY = 1 << 20  # a request body larger than this is refused (413)


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
    paths = [Path(directory) / name for name in ("upstream-ca.pem", "upstream-leaf.pem", "upstream-leaf.key")]
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(paths[0]), str(paths[1]), str(paths[2])


def last_user_text(messages: list) -> str:
    content = messages[-1]["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def words(count: int) -> list[str]:
    return [f"w{i} " for i in range(count)]


def openai_chat(body: dict) -> tuple[str, list[bytes]]:
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


def anthropic_messages(body: dict) -> tuple[str, list[bytes]]:
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


def answer(path: str, body: bytes) -> tuple[int, str, list[bytes]]:
    """(status, content type, body parts) for one request: the decision, apart from the I/O."""
    try:
        if path.endswith("/chat/completions"):
            return (200, *openai_chat(json.loads(body)))
        if path.endswith("/messages"):
            return (200, *anthropic_messages(json.loads(body)))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        return 400, "application/json", [json.dumps({"error": {"message": f"bad request: {type(e).__name__}"}}).encode()]
    return 200, "text/plain", [b"plain upstream reply\n"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' pools expect
    timeout = 30  # an idle or stalled connection is closed, not kept forever

    def do_POST(self) -> None:  # http.server's naming
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            self.send_error(413)
            return
        status, content_type, parts = answer(self.path, self.rfile.read(length))
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("x-request-id", "req_fake")
        if content_type == "text/event-stream":
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for part in parts:  # really streamed: one write per event
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                time.sleep(0.001)
            self.wfile.write(b"0\r\n\r\n")
        else:
            payload = b"".join(parts)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        pass  # the demo prints oisp's events, not an access log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.context = context
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address) -> None:
        # The TLS handshake runs in the connection's own thread, so a client that never
        # finishes one cannot stop the accept loop.
        request.settimeout(_Handler.timeout)
        try:
            request = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().finish_request(request, client_address)


def serve(host: str, port: int, cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    server = _Server((host.strip("[]"), port), context)
    print("ready", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="stand-in AI provider for oisp demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    try:
        serve(args.host, args.port, args.cert, args.key)
    except KeyboardInterrupt:
        pass  # the demo ends it with SIGINT


if __name__ == "__main__":
    main()
