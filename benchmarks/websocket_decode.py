"""WebSocket decode throughput: a Responses-mode stream of 500 deltas, a Realtime session
with audio deltas, and 10,000 plain messages, each with and without permessage-deflate;
beside them, the SSE stream of 500 chunks from decode_throughput.py, for the cost of a
WebSocket message against an SSE chunk in the same run. The frames are made by wsproto
peers (its own framing, masking and compression); they are fed in 1,460-byte pieces,
like TCP reads. Prints messages/s and MB/s of wire bytes.

    PYTHONPATH=. python benchmarks/websocket_decode.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import sys
import time

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from benchmarks.decode_throughput import CTX, sse_stream
from oisp.decode import Direction, FlowContext, FlowDecoder
from oisp.events import FlowRecorder
from oisp.spec import default_spec

Trace = list[tuple[Direction, bytes]]


def session(target: str, client_msgs: list, server_msgs: list[list], deflate: bool) -> tuple[Trace, int]:
    """(direction, wire bytes) in order, and how many messages went over the socket."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    trace: Trace = []
    count = 0

    def send(src, dst, direction, event) -> None:
        data = src.send(event)
        dst.receive_data(data)
        list(dst.events())
        trace.append((direction, data))

    ext = [PerMessageDeflate()] if deflate else []
    send(client, server, Direction.REQUEST, Request(host="api.openai.com", target=target, extensions=ext,
                                                    extra_headers=[(b"authorization",
                                                                    b"Bearer sk-proj-BENCHKEY0000000000000000")]))
    send(server, client, Direction.RESPONSE, AcceptConnection(extensions=[PerMessageDeflate()] if deflate else []))
    for msg, answers in zip(client_msgs, server_msgs):
        send(client, server, Direction.REQUEST, msg)
        for a in answers:
            send(server, client, Direction.RESPONSE, a)
        count += 1 + len(answers)
    send(client, server, Direction.REQUEST, CloseConnection(code=1000))
    return trace, count


def text(obj: dict) -> TextMessage:
    return TextMessage(data=json.dumps(obj))


def responses_stream(deltas: int = 500) -> tuple[str, list, list]:
    head = {"id": "resp_1", "object": "response", "model": "gpt-5", "status": "in_progress", "output": []}
    events = [{"type": "response.created", "response": head}]
    events += [{"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                "delta": f"word{i} ", "sequence_number": i + 1} for i in range(deltas)]
    final = {**head, "status": "completed", "output": [{"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": "".join(f"word{i} " for i in range(deltas))}]}],
        "usage": {"input_tokens": 12, "output_tokens": deltas, "total_tokens": 12 + deltas}}
    events.append({"type": "response.completed", "response": final})
    create = {"type": "response.create", "model": "gpt-5", "input": [{"role": "user", "content": "Tell me a story."}]}
    return "/v1/responses", [text(create)], [[text(e) for e in events]]


def realtime_audio(deltas: int = 200) -> tuple[str, list, list]:
    audio = base64.b64encode(bytes(range(256)) * 19).decode()  # ~4.8 kB of base64 per delta, 100 ms of 24 kHz PCM16
    events = [{"type": "response.created",
               "response": {"id": "r1", "object": "realtime.response", "status": "in_progress", "output": []}}]
    for i in range(deltas):
        events.append({"type": "response.output_audio.delta", "response_id": "r1", "item_id": "i1", "delta": audio})
        events.append({"type": "response.output_audio_transcript.delta", "response_id": "r1", "item_id": "i1", "delta": f"w{i} "})
    events.append({"type": "response.done",
                   "response": {"id": "r1", "status": "completed", "output": [], "usage": {"total_tokens": 9}}})
    msgs = [text({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"]}}),
            text({"type": "response.create"})]
    return "/v1/realtime?model=gpt-realtime", msgs, [[], [text(e) for e in events]]


def plain(messages: int = 10_000) -> tuple[str, list, list]:
    return ("/echo", [BytesMessage(data=b"x" * 64) for _ in range(messages)],
            [[BytesMessage(data=b"y" * 64)] for _ in range(messages)])


def run_once(kind: str, trace: Trace, segment: int) -> float:
    spec = default_spec()
    ctx = FlowContext(CTX.client, CTX.server, 0.0, sni="api.openai.com", tls_version="TLSv1.3", alpn="http/1.1")
    target = FlowDecoder(ctx, spec) if kind == "decoder" else FlowRecorder(ctx, spec=spec)
    t0 = time.perf_counter()
    for direction, data in trace:
        for i in range(0, len(data), segment):
            target.feed(direction, data[i : i + segment], 1.0)
    target.close(2.0)
    elapsed = time.perf_counter() - t0
    assert target.stats.decode_errors == 0, target.stats.errors
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--segment", type=int, default=1460)
    args = ap.parse_args()
    print(f"Python {platform.python_version()} on {platform.machine()}, best of {args.repeat}, {args.segment}-byte feeds")
    print(f"{'workload':<44} {'output':<14} {'msgs':>6} {'ms':>8} {'msgs/s':>10} {'µs/msg':>7} {'MB/s':>7}")
    for name, make in (("Responses mode, 500 deltas", responses_stream),
                       ("Realtime, 200 audio + 200 transcript deltas", realtime_audio),
                       ("plain, 10,000 + 10,000 messages", plain)):
        for deflate in (False, True):
            trace, count = session(*make(), deflate)
            mb = sum(len(d) for _, d in trace) / 1e6
            for kind in ("decoder", "recorder"):
                best = min(run_once(kind, trace, args.segment) for _ in range(args.repeat))
                label = f"{name}{', deflate' if deflate else ''}"
                print(f"{label:<44} {kind:<14} {count:>6} {best * 1000:>8.1f} {count / best:>10,.0f} {best / count * 1e6:>7.1f} "
                      f"{mb / best:>7.2f}")
    request, response = sse_stream(500)
    trace = [(Direction.REQUEST, request), (Direction.RESPONSE, response)]
    for kind in ("decoder", "recorder"):
        best = min(run_once(kind, trace, args.segment) for _ in range(args.repeat))
        mb = (len(request) + len(response)) / 1e6
        print(f"{'SSE stream, 500 chunks (for comparison)':<44} {kind:<14} {502:>6} {best * 1000:>8.1f} {502 / best:>10,.0f} "
              f"{best / 502 * 1e6:>7.1f} {mb / best:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
