"""OpenAI's WebSocket protocols: the Responses API's WebSocket mode and the Realtime API.

Responses API, WebSocket mode (``wss://api.openai.com/v1/responses``):
Each client ``response.create`` message carries the fields of a POST
/v1/responses body and is one exchange; the server answers with the events of
the SSE stream, one JSON message each, so the SSE stream's
:class:`~oisp.decode.providers.openai.ResponsesAssembler` assembles them. The
responses of one socket run one after another: server events belong to the
oldest unanswered ``response.create``, which ends at ``response.completed`` /
``.failed`` / ``.incomplete`` or an ``error`` event.

Realtime API (``wss://api.openai.com/v1/realtime?model=…``, GA event names):
see :class:`RealtimeSocket`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Mapping

from oisp.decode.providers.base import AIRequestInfo, Message, ResponseAssembler, ToolCall, role, set_usage, tool_definitions
from oisp.decode.providers.openai import ResponsesAssembler, parse_responses_request
from oisp.decode.records import DecodeRecord, Exchange, RequestComplete, ResponseComplete, StreamDelta

_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


class ResponsesSocket:
    """One socket's ``response.create`` messages and the events answering them, as exchanges."""

    def __init__(self, open_exchange: Callable[[float], Exchange]) -> None:
        self._open = open_exchange
        self._pending: deque[tuple[Exchange, ResponsesAssembler, list[int]]] = deque()

    def client(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        if obj.get("type") != "response.create":
            return []  # response.steer, response.cancel …: no new exchange
        body = obj["response"] if isinstance(obj.get("response"), Mapping) else obj
        ex = self._open(ts)
        ex.request_wire_bytes = size
        info = parse_responses_request(body)
        info.streaming = True  # the answer always comes as events
        if body.get("generate") is False:
            info.parameters["generate"] = False  # a warm-up: prepares state, generates nothing
        ex.ai_request = info
        self._pending.append((ex, ResponsesAssembler(), [0]))
        return [RequestComplete(ex)]

    def server(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        if not self._pending:
            return []  # e.g. an error about a message that was no response.create
        ex, asm, chunks = self._pending[0]
        ex.response_wire_bytes += size
        out: list[DecodeRecord] = []
        for d in asm.on_json(obj, ts):
            out.append(StreamDelta(ex, chunks[0], d, ts))
            chunks[0] += 1
        if obj.get("type") in _TERMINAL:
            self._pending.popleft()
            ex.complete = True
            ex.response_end_ts = ts
            ex.ai_response = asm.finish()
            out.append(ResponseComplete(ex))
        return out

    def close(self, ts: float) -> list[DecodeRecord]:
        out: list[DecodeRecord] = []
        while self._pending:
            ex, asm, _ = self._pending.popleft()
            ex.problems.append("response_incomplete")
            ex.response_end_ts = ts
            ex.ai_response = asm.finish()
            out.append(ResponseComplete(ex))
        return out


# --- Realtime API (GA event names) -----------------------------------------------------------

def _b64_len(data: Any) -> int:
    """Bytes a base64 string decodes to, without decoding it: audio is counted, never kept."""
    if not isinstance(data, str):
        return 0
    return len(data) * 3 // 4 - data.endswith("=") - data.endswith("==")


def _item_message(item: Mapping[str, Any]) -> Message | None:
    """A conversation item as a message; audio parts count by their transcript, when there is one."""
    kind = item.get("type")
    if kind == "function_call_output":
        return Message("tool", str(item.get("output", "")), 0, item.get("call_id"))
    if kind != "message":
        return None
    texts = []
    for part in item.get("content") or []:
        if isinstance(part, Mapping):
            text = part.get("text") if isinstance(part.get("text"), str) else part.get("transcript")
            if isinstance(text, str):
                texts.append(text)
    return Message(role(item.get("role")), "".join(texts))


class RealtimeAssembler(ResponseAssembler):
    """One Realtime response: its ``response.*`` server events up to ``response.done``."""

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[str, ToolCall] = {}
        self.audio_bytes = 0
        self.output: list[Message] = []  # the response's items, for the conversation that follows

    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        info = self.info
        info.chunk_count += 1
        kind = obj.get("type")
        delta = obj.get("delta")
        if kind == "response.created" and isinstance(obj.get("response"), Mapping):
            info.response_id = obj["response"].get("id")
        elif kind in ("response.output_text.delta", "response.output_audio_transcript.delta") and isinstance(delta, str):
            self._token(ts)
            info.choice(0).text += delta
            return [{"delta": {"content": delta}, "finish_reason": None, "index": 0}]
        elif kind == "response.output_audio.delta":
            self._token(ts)
            self.audio_bytes += _b64_len(delta)
        elif kind == "response.output_item.added" and isinstance(obj.get("item"), Mapping):
            item = obj["item"]
            if item.get("type") == "function_call":
                call = ToolCall(item.get("call_id"), item.get("name"), str(item.get("arguments") or ""))
                self._calls[str(item.get("call_id"))] = call
                info.tool_calls.append(call)
        elif kind == "response.function_call_arguments.delta" and isinstance(delta, str):
            self._token(ts)
            known = self._calls.get(str(obj.get("call_id")))
            if known is not None:
                known.arguments += delta
                return [{"delta": {"tool_calls": [{"id": known.id, "arguments": delta}]}, "finish_reason": None, "index": 0}]
        elif kind == "response.done" and isinstance(obj.get("response"), Mapping):
            self._done(obj["response"])
        elif kind == "error":
            self._error(obj.get("error") if isinstance(obj.get("error"), Mapping) else obj)
            info.finish_reason = "error"
        return []

    def _done(self, resp: Mapping[str, Any]) -> None:
        info = self.info
        info.response_id = resp.get("id") or info.response_id
        texts, calls = [], []
        for item in resp.get("output") or []:
            if not isinstance(item, Mapping):
                continue
            if item.get("type") == "function_call":
                calls.append(ToolCall(item.get("call_id"), item.get("name"), str(item.get("arguments") or "")))
            msg = _item_message(item)
            if msg is not None:
                texts.append(msg.content)
                self.output.append(msg)
        if texts:
            info.choice(0).text = "".join(texts)
        if calls:
            info.tool_calls = calls
        u = resp.get("usage")
        if isinstance(u, Mapping):
            set_usage(info.usage, prompt_tokens=u.get("input_tokens"), completion_tokens=u.get("output_tokens"),
                      total_tokens=u.get("total_tokens"))
            inp, out = u.get("input_token_details"), u.get("output_token_details")
            if isinstance(inp, Mapping):
                set_usage(info.usage, cached_tokens=inp.get("cached_tokens"), input_text_tokens=inp.get("text_tokens"),
                          input_audio_tokens=inp.get("audio_tokens"))
            if isinstance(out, Mapping):
                set_usage(info.usage, output_text_tokens=out.get("text_tokens"), output_audio_tokens=out.get("audio_tokens"))
        status = resp.get("status")
        details = resp.get("status_details") if isinstance(resp.get("status_details"), Mapping) else {}
        if status == "completed":
            info.finish_reason = "tool_calls" if info.tool_calls else "stop"
        elif status == "incomplete":
            reason = details.get("reason")
            info.finish_reason = ("length" if reason == "max_output_tokens" else "content_filter" if reason == "content_filter"
                                  else "other")
        elif status in ("failed", "cancelled"):
            info.finish_reason = "error" if status == "failed" else "other"
            if isinstance(details.get("error"), Mapping):
                self._error(details["error"])
            elif status == "cancelled":
                info.error = {"type": "cancelled", "message": f"response cancelled ({details.get('reason', 'unknown')})"}
        info.choice(0).finish_reason = info.finish_reason


class RealtimeSocket:
    """A Realtime session: the client's session and conversation events make each response's request.

    ``session.update`` sets the model, instructions, tools and modalities;
    ``conversation.item.create`` (and the server's ``conversation.item.added``
    for committed audio) adds to the conversation; ``response.create`` — or a
    ``response.created`` the server started itself (voice activity) — is one
    exchange, answered by the events naming its response id, up to ``response.done``.
    Its request is reported when the server starts the response, as the
    conversation stands then; its timing counts from the ``response.create``.
    Audio is counted (``audio_bytes``), never kept.
    """

    def __init__(self, open_exchange: Callable[[float], Exchange], model: str | None = None) -> None:
        self._open = open_exchange
        self._model = model
        self._instructions: str | None = None
        self._tools: list[dict[str, Any]] = []
        self._tool_choice: str | None = None
        self._modalities: list[str] | None = None
        self._max_tokens: int | None = None
        self._items: list[Message] = []
        self._item_ids: set[str] = set()
        self._echoes: deque[tuple[str, str]] = deque()  # client items without an id, until the server echoes them
        # asked for (exchange, assembler, the client's event_id, response.create's overrides), not yet started
        self._unbound: deque[tuple[Exchange, RealtimeAssembler, Any, Mapping[str, Any]]] = deque()
        self._live: dict[str, tuple[Exchange, RealtimeAssembler, list[int]]] = {}
        self.audio_bytes = {"client": 0, "server": 0}

    def client(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        kind = obj.get("type")
        if kind == "session.update" and isinstance(obj.get("session"), Mapping):
            self._configure(obj["session"])
        elif kind == "conversation.item.create" and isinstance(obj.get("item"), Mapping):
            self._add_item(obj["item"])
        elif kind == "input_audio_buffer.append":
            self.audio_bytes["client"] += _b64_len(obj.get("audio"))
        elif kind == "response.create":
            resp = obj.get("response") if isinstance(obj.get("response"), Mapping) else {}
            ex = self._open(ts)
            ex.request_wire_bytes = size
            self._unbound.append((ex, RealtimeAssembler(), obj.get("event_id"), resp))
        return []

    def server(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        kind = str(obj.get("type"))
        out: list[DecodeRecord] = []
        if kind in ("session.created", "session.updated") and isinstance(obj.get("session"), Mapping):
            self._model = obj["session"].get("model") or self._model
        elif kind in ("conversation.item.added", "conversation.item.done") and isinstance(obj.get("item"), Mapping):
            self._add_item(obj["item"], from_server=True)
        elif kind == "error":
            return self._failed(obj, size, ts)
        if not kind.startswith("response."):
            return out
        rid = obj.get("response_id") or (obj["response"].get("id") if isinstance(obj.get("response"), Mapping) else None)
        if kind == "response.created":
            if self._unbound:
                ex, asm, _, resp = self._unbound.popleft()
            else:  # the server began a response itself (voice activity detected)
                ex, asm, resp = self._open(ts), RealtimeAssembler(), {}
            out.append(self._request(ex, resp))
            self._live[str(rid)] = (ex, asm, [0])
        live = self._live.get(str(rid))
        if live is None:
            return out
        ex, asm, chunks = live
        ex.response_wire_bytes += size
        for d in asm.on_json(obj, ts):
            out.append(StreamDelta(ex, chunks[0], d, ts))
            chunks[0] += 1
        if kind == "response.done":
            del self._live[str(rid)]
            self._items += asm.output
            out.append(self._finish(ex, asm, ts, complete=True))
        return out

    def close(self, ts: float) -> list[DecodeRecord]:
        out: list[DecodeRecord] = []
        for ex, asm, _, resp in self._unbound:
            ex.problems.append("response_incomplete")
            out += [self._request(ex, resp), self._finish(ex, asm, ts, complete=False)]
        for ex, asm, _ in self._live.values():
            ex.problems.append("response_incomplete")
            out.append(self._finish(ex, asm, ts, complete=False))
        self._unbound.clear()
        self._live.clear()
        return out

    # -----------------------------------------------------------------------------------------
    def _configure(self, s: Mapping[str, Any]) -> None:
        self._model = s.get("model") or self._model
        if isinstance(s.get("instructions"), str):
            self._instructions = s["instructions"]
        if "tools" in s:
            self._tools = tool_definitions(s.get("tools"))
        if isinstance(s.get("tool_choice"), str):
            self._tool_choice = s["tool_choice"]
        mods = s.get("output_modalities") or s.get("modalities")
        if isinstance(mods, list):
            self._modalities = [str(m) for m in mods]
        if isinstance(s.get("max_output_tokens"), int):
            self._max_tokens = s["max_output_tokens"]

    def _add_item(self, item: Mapping[str, Any], from_server: bool = False) -> None:
        """One conversation item, once: the server echoes the client's items, and says again what a response output."""
        iid = item.get("id") if isinstance(item.get("id"), str) else None
        if iid is not None:
            if iid in self._item_ids:
                return
            self._item_ids.add(iid)
        msg = _item_message(item)
        if msg is None:
            return
        if not from_server:
            if iid is None:
                self._echoes.append((msg.role, msg.content))  # the server will echo it under an id it assigns
            self._items.append(msg)
        elif msg.role == "assistant":
            return  # a response's output: taken from its response.done
        elif self._echoes and self._echoes[0] == (msg.role, msg.content):
            self._echoes.popleft()
        else:
            self._items.append(msg)  # e.g. committed input audio, by its transcript

    def _request(self, ex: Exchange, resp: Mapping[str, Any]) -> RequestComplete:
        """The request a response answers: the session's state once the server starts the response
        (it has added committed audio by then), with what response.create overrides."""
        instructions = resp.get("instructions") if isinstance(resp.get("instructions"), str) else self._instructions
        info = AIRequestInfo(model=resp.get("model") or self._model, streaming=True)
        if instructions:
            info.messages.append(Message("system", instructions))
        if isinstance(resp.get("input"), list):  # an out-of-band response on its own input
            info.messages += [m for m in (_item_message(i) for i in resp["input"] if isinstance(i, Mapping)) if m]
        if resp.get("conversation") != "none":
            info.messages += list(self._items)
        info.tools = tool_definitions(resp["tools"]) if "tools" in resp else list(self._tools)
        info.tool_choice = resp.get("tool_choice") if isinstance(resp.get("tool_choice"), str) else self._tool_choice
        max_tokens = resp.get("max_output_tokens") if isinstance(resp.get("max_output_tokens"), int) else self._max_tokens
        if max_tokens is not None:
            info.parameters["max_tokens"] = max_tokens
        mods = resp.get("output_modalities") or self._modalities
        if mods:
            info.parameters["modalities"] = list(mods)
        ex.ai_request = info
        return RequestComplete(ex)

    def _failed(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        """An error event ends the response.create it names (or, naming none, the oldest still unanswered)."""
        err = obj.get("error") if isinstance(obj.get("error"), Mapping) else {}
        for i, (ex, asm, event_id, resp) in enumerate(self._unbound):
            if err.get("event_id") in (None, event_id):
                del self._unbound[i]
                ex.response_wire_bytes += size
                asm.on_json(obj, ts)
                return [self._request(ex, resp), self._finish(ex, asm, ts, complete=True)]
        return []

    def _finish(self, ex: Exchange, asm: RealtimeAssembler, ts: float, complete: bool) -> ResponseComplete:
        ex.complete = complete
        ex.response_end_ts = ts
        ex.ai_response = asm.finish()
        self.audio_bytes["server"] += asm.audio_bytes
        return ResponseComplete(ex)
