"""The interception benchmark's lean provider speaks the Responses API's WebSocket mode correctly.

benchmarks/ws_interception.py measures oisp's CPU per WebSocket message against this
provider; a provider that answered the handshake wrongly, negotiated permessage-deflate
unasked, or sent other events than the documented ones would measure something else.
Checked with the `websockets` client (it verifies Sec-WebSocket-Accept and refuses an
extension it did not offer) and by hand: the accept token from RFC 6455 §4.2.2, the
events as JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.fakeprovider import make_test_pki

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "interception"
sys.path.insert(0, str(BENCH))
from lean_client import build_request, parse_response  # noqa: E402
from lean_provider import CHAT_BODY  # noqa: E402
from lean_ws import USAGE, answer  # noqa: E402

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leanws")
    ca, cert, key = make_test_pki(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(BENCH / "lean_provider.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--cert", cert, "--key", key, "--stream-gap", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield port, ssl.create_default_context(cafile=ca)
    finally:
        proc.terminate()
        proc.wait(10)


def open_ws(provider, deflate: bool, path: str = "/v1/responses"):
    port, ctx = provider
    return connect(f"wss://api.openai.com{path}", sock=socket.create_connection(("127.0.0.1", port), 10), ssl=ctx,
                   compression="deflate" if deflate else None, proxy=None, open_timeout=10)


def create(chunks: int) -> str:
    return json.dumps({"type": "response.create", "model": "gpt-4.1-mini", "input": "hi",
                       "metadata": {"stream_chunks": str(chunks)}})


@pytest.mark.parametrize("deflate", [True, False])
def test_handshake_and_responses(provider, deflate):
    with open_ws(provider, deflate) as ws:
        key = ws.request.headers["Sec-WebSocket-Key"]
        want = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        assert ws.response.status_code == 101
        assert ws.response.headers["Sec-WebSocket-Accept"] == want
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert (extensions or "").startswith("permessage-deflate") if deflate else extensions is None
        for number in (1, 2):  # in sequence on one socket, each answered in full
            ws.send(create(7))
            got = [ws.recv(timeout=10) for _ in range(9)]
            assert got == answer(number, 7)
            events = [json.loads(m) for m in got]
            assert [e["type"] for e in events] == ["response.created"] + ["response.output_text.delta"] * 7 + [
                "response.completed"]
            assert [e["sequence_number"] for e in events] == list(range(9))
            done = events[-1]["response"]
            assert done["id"] == f"resp_lean{number:04d}"
            assert done["status"] == "completed"
            assert done["output"][0]["content"][0]["text"] == "".join(e["delta"] for e in events[1:-1]) == \
                "".join(f"w{i} " for i in range(7))
            assert done["usage"] == USAGE


def test_other_path_is_refused(provider):
    with pytest.raises(InvalidStatus) as e:
        open_ws(provider, True, "/v1/realtime")
    assert e.value.response.status_code == 404


def test_http_requests_still_served_beside_websockets(provider):
    port, ctx = provider
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 10), server_hostname="api.openai.com") as s:
        s.sendall(build_request("api.openai.com", {"model": "gpt-4o-mini", "messages": []}))
        buf = bytearray()
        while (reply := parse_response(buf)) is None:
            buf += s.recv(65536)
    assert reply[1] == 200
    assert reply[3] == CHAT_BODY
