"""A fake OpenAI Responses API WebSocket server (``/v1/responses``), on the `websockets` library.

It speaks the documented protocol: each client ``response.create`` message is
answered with the events of the Responses SSE stream, one JSON text message
each, permessage-deflate negotiated as websockets' server does by default.
Answers are deterministic so a test can compare what oisp recorded with what
the client assembled:

- ``"generate": false`` (a warm-up): ``response.created`` + ``response.completed``, no output;
- a request with tools: one ``get_weather`` function call, arguments streamed in pieces;
- ``"model": "bad-model"``: an ``error`` event;
- otherwise: a reasoning summary, then the text "echo: <last user text>" followed by
  ``"stream_chunks"`` (metadata, default 3) filler words, one delta each.

``/v1/realtime`` speaks the Realtime API (class Realtime), ``…BidiGenerateContent``
Gemini's Live API (gemini_live). Any other path is an echo socket (text and
binary messages sent back).

    python tests/fakews.py --host 10.0.0.2 --port 443 --cert leaf.pem --key leaf.key   # wss://
"""

from __future__ import annotations

import argparse
import json
import ssl
import threading

from websockets.sync.server import ServerConnection, serve


def _last_user_text(body: dict) -> str:
    items = body.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items or []):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
    return ""


def usage(inp: int, out: int) -> dict:
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": inp // 2},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": inp + out}


def responses_events(body: dict, n: int) -> list[dict]:
    """The server events answering response.create number ``n`` on a socket."""
    rid, model = f"resp_{n}", body.get("model", "gpt-test")
    if model == "bad-model":
        return [{"type": "error", "status": 400, "error": {"type": "invalid_request_error", "code": "model_not_found",
                                                             "message": "The model 'bad-model' does not exist",
                                                           "param": "model"}}]
    head = {"id": rid, "object": "response", "created_at": 1, "model": model, "status": "in_progress", "output": []}
    events: list[dict] = [{"type": "response.created", "response": head}, {"type": "response.in_progress", "response": head}]
    output: list[dict] = []
    if body.get("generate") is False:
        pass
    elif body.get("tools"):
        args = ['{"city"', ': "Par', 'is"}']
        item = {"id": f"fc_{n}", "type": "function_call", "call_id": f"call_{n}", "name": "get_weather", "arguments": "",
                "status": "in_progress"}
        events.append({"type": "response.output_item.added", "output_index": 0, "item": item})
        for a in args:
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": 0, "delta": a})
        done = {**item, "arguments": "".join(args), "status": "completed"}
        events.append({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": 0,
                       "arguments": done["arguments"]})
        events.append({"type": "response.output_item.done", "output_index": 0, "item": done})
        output.append(done)
    else:
        summary = "thinking about it"
        rs = {"id": f"rs_{n}", "type": "reasoning", "summary": []}
        events.append({"type": "response.output_item.added", "output_index": 0, "item": rs})
        events.append({"type": "response.reasoning_summary_text.delta", "item_id": rs["id"], "output_index": 0,
                       "summary_index": 0, "delta": summary})
        rs_done = {**rs, "summary": [{"type": "summary_text", "text": summary}]}
        events.append({"type": "response.output_item.done", "output_index": 0, "item": rs_done})
        chunks = int((body.get("metadata") or {}).get("stream_chunks", 3))
        pieces = [f"echo: {_last_user_text(body)}"] + [f" w{i}" for i in range(chunks)]
        msg = {"id": f"msg_{n}", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        events.append({"type": "response.output_item.added", "output_index": 1, "item": msg})
        part = {"type": "output_text", "text": "", "annotations": []}
        events.append({"type": "response.content_part.added", "item_id": msg["id"], "output_index": 1, "content_index": 0,
                       "part": part})
        for p in pieces:
            events.append({"type": "response.output_text.delta", "item_id": msg["id"], "output_index": 1,
                           "content_index": 0, "delta": p})
        text = "".join(pieces)
        events.append({"type": "response.output_text.done", "item_id": msg["id"], "output_index": 1, "content_index": 0,
                       "text": text})
        msg_done = {**msg, "status": "completed", "content": [{**part, "text": text}]}
        events.append({"type": "response.output_item.done", "output_index": 1, "item": msg_done})
        output += [rs_done, msg_done]
    final = {**head, "status": "completed", "output": output, "usage": usage(10 + n, len(output) * 5)}
    events.append({"type": "response.completed", "response": final})
    for i, ev in enumerate(events):
        ev["sequence_number"] = i
    return events


AUDIO_CHUNK = "AAAA" * 300  # base64 of 900 zero bytes of "audio"


def realtime_usage(n: int) -> dict:
    return {"total_tokens": 30 + n, "input_tokens": 20, "output_tokens": 10 + n,
            "input_token_details": {"text_tokens": 12, "audio_tokens": 8, "cached_tokens": 4},
            "output_token_details": {"text_tokens": 6 + n, "audio_tokens": 4}}


class Realtime:
    """The Realtime API's GA events for one session (text, audio transcript, or a function call)."""

    def __init__(self, model: str) -> None:
        self.session = {"type": "realtime", "id": "sess_1", "model": model, "output_modalities": ["text"], "tools": []}
        self.items: list[dict] = []
        self.n = 0

    def on(self, ev: dict) -> list[dict]:
        kind = ev.get("type")
        if kind == "session.update":
            self.session.update(ev.get("session") or {})
            return [{"type": "session.updated", "session": self.session}]
        if kind == "conversation.item.create":
            item = {"id": f"item_{len(self.items)}", "status": "completed", **ev["item"]}
            self.items.append(item)
            return [{"type": "conversation.item.added", "item": item}, {"type": "conversation.item.done", "item": item}]
        if kind == "input_audio_buffer.commit":
            item = {"id": f"item_{len(self.items)}", "type": "message", "role": "user",
                    "content": [{"type": "input_audio", "transcript": "spoken words"}]}
            self.items.append(item)
            return [{"type": "input_audio_buffer.committed", "item_id": item["id"]},
                    {"type": "conversation.item.added", "item": item}]
        if kind != "response.create":
            return []
        self.n += 1
        rid = f"resp_rt_{self.n}"
        opts = {**self.session, **(ev.get("response") or {})}
        out: list[dict] = [{"type": "response.created",
                            "response": {"id": rid, "object": "realtime.response", "status": "in_progress", "output": []}}]
        item_id = f"out_{self.n}"
        if opts.get("tools"):
            item = {"id": item_id, "type": "function_call", "call_id": f"call_rt_{self.n}", "name": opts["tools"][0]["name"],
                    "arguments": ""}
            out.append({"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": item})
            args = ['{"q": ', '"x"}']
            for a in args:
                out.append({"type": "response.function_call_arguments.delta", "response_id": rid, "item_id": item_id,
                            "output_index": 0, "call_id": item["call_id"], "delta": a})
            done = {**item, "arguments": "".join(args), "status": "completed"}
        else:
            last = next((c.get("text") or c.get("transcript") or "" for i in reversed(self.items) if i.get("role") == "user"
                         for c in i.get("content", [])), "")
            pieces = [f"echo: {last}", " and", " more"]
            audio = "audio" in (opts.get("output_modalities") or [])
            item = {"id": item_id, "type": "message", "role": "assistant", "content": []}
            out.append({"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": item})
            for p in pieces:
                if audio:
                    out.append({"type": "response.output_audio.delta", "response_id": rid, "item_id": item_id,
                                "delta": AUDIO_CHUNK})
                    out.append({"type": "response.output_audio_transcript.delta", "response_id": rid,
                                "item_id": item_id, "delta": p})
                else:
                    out.append({"type": "response.output_text.delta", "response_id": rid, "item_id": item_id, "delta": p})
            text = "".join(pieces)
            part = {"type": "output_audio", "transcript": text} if audio else {"type": "output_text", "text": text}
            done = {**item, "content": [part], "status": "completed"}
        out.append({"type": "response.output_item.done", "response_id": rid, "output_index": 0, "item": done})
        out.append({"type": "response.done", "response": {"id": rid, "object": "realtime.response", "status": "completed",
                                                          "output": [done], "usage": realtime_usage(self.n)}})
        self.items.append(done)
        return out


def realtime(ws: ServerConnection, model: str) -> None:
    rt = Realtime(model)
    ws.send(json.dumps({"type": "session.created", "event_id": "event_0", "session": rt.session}))
    for message in ws:
        for i, ev in enumerate(rt.on(json.loads(message))):
            ws.send(json.dumps({"event_id": f"event_{rt.n}_{i}", **ev}))


def live_usage(n: int) -> dict:
    return {"promptTokenCount": 7 + n, "responseTokenCount": 3, "totalTokenCount": 10 + n,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 7 + n}],
            "responseTokensDetails": [{"modality": "TEXT", "tokenCount": 3}]}


def gemini_live(ws: ServerConnection) -> None:
    """BidiGenerateContent: setupComplete, then per turn serverContent pieces and turnComplete, or a toolCall;
    every answer as a binary frame holding JSON, as Google's server sends them."""
    def send(obj: dict) -> None:
        ws.send(json.dumps(obj).encode())

    setup = json.loads(ws.recv())["setup"]
    send({"setupComplete": {}})
    n = 0
    for message in ws:
        ev = json.loads(message)
        # protobuf JSON: either spelling (google-genai sends client_content, with turnComplete inside)
        content, tool = ev.get("clientContent") or ev.get("client_content"), ev.get("toolResponse") or ev.get("tool_response")
        if content and (content.get("turnComplete") or content.get("turn_complete")):
            text = "".join(p.get("text", "") for t in content.get("turns", []) for p in t.get("parts", []))
        elif tool:
            text = "tool said " + json.dumps((tool.get("functionResponses") or tool.get("function_responses"))[0]["response"])
        else:
            continue
        n += 1
        if setup.get("tools") and "weather" in text:
            send({"toolCall": {"functionCalls": [{"id": f"fc_{n}", "name": "get_weather", "args": {"city": "Paris"}}]},
                  "usageMetadata": live_usage(n)})
            continue
        for piece in [f"echo: {text}", " and", " more"]:
            send({"serverContent": {"modelTurn": {"role": "model", "parts": [{"text": piece}]}}})
        send({"serverContent": {"generationComplete": True}})
        send({"serverContent": {"turnComplete": True}, "usageMetadata": live_usage(n)})


def handler(ws: ServerConnection) -> None:
    path, _, query = (ws.request.path if ws.request else "").partition("?")
    if "BidiGenerateContent" in path:
        return gemini_live(ws)
    if path.endswith("/realtime"):
        return realtime(ws, dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("model", "gpt-realtime"))
    if not path.endswith("/responses"):
        for message in ws:
            ws.send(message)
        return
    n = 0
    for message in ws:
        body = json.loads(message)
        if body.get("type") != "response.create":
            continue
        n += 1
        for ev in responses_events(body, n):
            ws.send(json.dumps(ev))


def start(host: str = "127.0.0.1", port: int = 0, **options):
    """A server in a daemon thread: returns (server, port); ``server.shutdown()`` stops it."""
    server = serve(handler, host, port, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.socket.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    context = None
    if a.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(a.cert, a.key)
    with serve(handler, a.host, a.port, ssl=context) as server:
        print("serving", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
