"""The WebSocket benchmark client: the Responses API's WebSocket mode, on the `websockets` library.

    python lean_ws_client.py ws|ws-deflate --ca FILE [--base wss://api.openai.com] [--n N] [--seconds S]

Opens one WebSocket to BASE/v1/responses with the websockets sync client (the
library the openai SDK's `responses.connect()` runs on), offering
permessage-deflate (`ws-deflate`, websockets' default offer) or not (`ws`), then
sends N `response.create` in sequence, each read to its `response.completed`.
Every server message is checked as text against what lean_ws.py sends, and the
negotiated extension against the workload; a failed response is counted, the
socket dropped and a new one opened, and the client exits 1 after printing its
result, so a broken path fails loudly. --seconds is accepted for the benchmark
runner's sake and unused: the workload is N responses.

Prints one JSON line like lean_client.py's `ttfc` workload: requests (good
responses), ttfc (seconds from sending response.create to the first server message),
totals (to response.completed), messages (client + server messages of the good
responses), extensions (as the server's 101 accepted them), warmup 0, failures.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time

from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lean_ws import MODEL, PATH, STREAM_PIECES, answer  # the replies to expect

KEY = "sk-proj-BENCHKEY0123456789abcdefghijklmnopqrstuv"


class Failure(Exception):
    pass


def create(n: int) -> str:
    return json.dumps({"type": "response.create", "model": MODEL, "stream": True,
                       "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}],
                       "metadata": {"stream_chunks": str(n)}})


def open_socket(url: str, ctx: ssl.SSLContext, deflate: bool) -> tuple[ClientConnection, str]:
    ws = connect(url, ssl=ctx, compression="deflate" if deflate else None, proxy=None, open_timeout=30,
                 max_size=16 * 1024 * 1024, additional_headers={"Authorization": f"Bearer {KEY}"},
                 user_agent_header="lean-ws-client")
    extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
    if ("permessage-deflate" in extensions) != deflate:
        ws.close()
        raise Failure(f"negotiated extensions {extensions!r} with deflate {'offered' if deflate else 'not offered'}")
    return ws, extensions


def one_response(ws: ClientConnection, request: str, expected: list[str]) -> tuple[float, float]:
    """(seconds to the first server message, as lean_client.py times an SSE stream's first
    `data:`; seconds to response.completed), every message checked."""
    t0 = time.perf_counter()
    ws.send(request)
    first = None
    for i, want in enumerate(expected):
        got = ws.recv(timeout=30)
        if got != want:
            raise Failure(f"message {i} not as sent: {str(got)[:120]!r}")
        if first is None:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["ws", "ws-deflate"])
    parser.add_argument("--base", default="wss://api.openai.com")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args()
    deflate = args.workload == "ws-deflate"
    ctx = ssl.create_default_context(cafile=args.ca)
    url = args.base.rstrip("/") + PATH
    request = create(STREAM_PIECES)
    firsts, totals, failures, first_failure, extensions = [], [], 0, "", ""
    cpu0, start = time.process_time(), time.perf_counter()
    ws = None
    for _ in range(args.n):
        try:
            if ws is None:
                ws, extensions = open_socket(url, ctx, deflate)
                answered = 0
            answered += 1
            first, total = one_response(ws, request, answer(answered, STREAM_PIECES))
        except (OSError, Failure, WebSocketException, TimeoutError) as e:
            failures += 1
            first_failure = first_failure or f"{type(e).__name__}: {e}"
            if ws is not None:
                ws.close()
                ws = None
            continue
        firsts.append(first)
        totals.append(total)
    if ws is not None:
        ws.close()
    out = {"requests": len(firsts), "ttfc": firsts, "totals": totals, "messages": len(firsts) * (STREAM_PIECES + 3),
           "extensions": extensions, "elapsed": time.perf_counter() - start, "client_cpu": time.process_time() - cpu0,
           "warmup": 0, "failures": failures, "first_failure": first_failure}
    json.dump(out, sys.stdout)
    print()
    if failures:
        sys.exit(f"{failures} failed responses; first: {first_failure}")


if __name__ == "__main__":
    main()
