"""Google's Gemini Live API: ``BidiGenerateContent`` over a WebSocket.

The client's ``setup`` names the model, system instruction, tools and
generation config (read by the generateContent request parser); each turn it
completes — ``clientContent`` with ``turnComplete``, ``realtimeInput`` text or
audio, a ``toolResponse`` — is answered by ``serverContent`` messages up to
``turnComplete`` (or a ``toolCall``), with ``usageMetadata`` alongside: one
exchange. A turn the server starts on realtime input (voice activity) opens its
exchange at the first answer. Audio, in ``realtimeInput`` and in the model's
``inlineData`` parts, is counted and never kept. Messages may come as text or
binary WebSocket frames; both hold JSON. Field names are protobuf JSON, which
accepts either spelling: google-genai sends ``client_content`` with
``turnComplete`` inside, so every field is read as camelCase or snake_case.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

from oisp.decode.providers.base import AIRequestInfo, Message, ResponseAssembler, ToolCall, flatten_content, role, set_usage
from oisp.decode.providers.gemini import parse_request
from oisp.decode.providers.openai_ws import _b64_len
from oisp.decode.records import DecodeRecord, Exchange, RequestComplete, ResponseComplete, StreamDelta


_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def _f(obj: Mapping[str, Any], name: str) -> Any:
    """Field ``name`` (camelCase) of a protobuf JSON object, in either spelling."""
    v = obj.get(name)
    return obj.get(_SNAKE.sub("_", name).lower()) if v is None else v


def _m(obj: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    v = _f(obj, name)
    return v if isinstance(v, Mapping) else None


def _modality_tokens(usage: dict[str, int], details: Any, side: str) -> None:
    for d in details if isinstance(details, list) else []:
        if isinstance(d, Mapping) and str(d.get("modality")).upper() in ("TEXT", "AUDIO"):
            set_usage(usage, **{f"{side}_{str(d['modality']).lower()}_tokens": _f(d, "tokenCount")})


class LiveAssembler(ResponseAssembler):
    """One turn of the model's: serverContent parts, transcriptions, tool calls, usage."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_bytes = 0
        self.transcript = ""

    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        info = self.info
        info.chunk_count += 1
        deltas: list[dict[str, Any]] = []
        content = _m(obj, "serverContent")
        if content is not None:
            turn = _m(content, "modelTurn") or {}
            for part in turn.get("parts") or []:
                if not isinstance(part, Mapping):
                    continue
                if isinstance(part.get("text"), str):
                    self._token(ts)
                    if part.get("thought"):
                        info.thinking += part["text"]
                    else:
                        info.choice(0).text += part["text"]
                        deltas.append({"delta": {"content": part["text"]}, "finish_reason": None, "index": 0})
                blob = _f(part, "inlineData")
                if isinstance(blob, Mapping):
                    self._token(ts)
                    self.audio_bytes += _b64_len(blob.get("data"))
            out_tr = _f(content, "outputTranscription")
            if isinstance(out_tr, Mapping) and isinstance(out_tr.get("text"), str):
                self._token(ts)
                self.transcript += out_tr["text"]
                deltas.append({"delta": {"content": out_tr["text"]}, "finish_reason": None, "index": 0})
            if _f(content, "interrupted"):
                info.finish_reason = "interrupted"
            if _f(content, "turnComplete") and info.finish_reason is None:
                info.finish_reason = "stop"
        call = _f(obj, "toolCall")
        if isinstance(call, Mapping):
            for fc in _f(call, "functionCalls") or []:
                if isinstance(fc, Mapping):
                    self._token(ts)
                    tc = ToolCall(fc.get("id"), fc.get("name"), json.dumps(fc.get("args", {})))
                    info.tool_calls.append(tc)
                    deltas.append({"delta": {"tool_calls": [{"id": tc.id, "name": tc.name, "arguments": tc.arguments}]},
                                   "finish_reason": None, "index": 0})
            info.finish_reason = "tool_calls"
        u = _f(obj, "usageMetadata")
        if isinstance(u, Mapping):
            set_usage(info.usage, prompt_tokens=_f(u, "promptTokenCount"), completion_tokens=_f(u, "responseTokenCount"),
                      total_tokens=_f(u, "totalTokenCount"), cached_tokens=_f(u, "cachedContentTokenCount"),
                      reasoning_tokens=_f(u, "thoughtsTokenCount"))
            _modality_tokens(info.usage, _f(u, "promptTokensDetails"), "input")
            _modality_tokens(info.usage, _f(u, "responseTokensDetails"), "output")
        return deltas

    def finish(self):
        if not self.info.text and self.transcript:  # an audio answer: its transcript is the text
            self.info.choice(0).text = self.transcript
        self.info.choice(0).finish_reason = self.info.finish_reason
        return self.info


class LiveSocket:
    def __init__(self, open_exchange: Callable[[float], Exchange], model: str | None = None) -> None:
        self._open = open_exchange
        self._setup = AIRequestInfo(model=model)
        self._history: list[Message] = []
        self._pending: list[Exchange] = []  # turns the client completed, not yet answered
        self._live: tuple[Exchange, LiveAssembler, list[int]] | None = None
        self._input_ts: float | None = None  # realtime input seen since the last turn
        self.audio_bytes = {"client": 0, "server": 0}

    def client(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        if isinstance(obj.get("setup"), Mapping):
            setup = obj["setup"]
            self._setup = parse_request(setup)
            self._setup.model = str(setup.get("model") or "").removeprefix("models/") or None
            modalities = _f(_m(setup, "generationConfig") or {}, "responseModalities")
            if isinstance(modalities, list):
                self._setup.parameters["modalities"] = [str(m).lower() for m in modalities]
            return []
        content = _f(obj, "clientContent")
        if isinstance(content, Mapping):
            for turn in content.get("turns") or []:
                if isinstance(turn, Mapping):
                    self._history.append(Message(role(turn.get("role")), flatten_content(turn.get("parts"))[0]))
            return self._turn(ts, size) if _f(content, "turnComplete") else []
        rt = _f(obj, "realtimeInput")
        if isinstance(rt, Mapping):
            for blob in [rt.get("audio"), rt.get("video"), *(_f(rt, "mediaChunks") or [])]:
                if isinstance(blob, Mapping):
                    self.audio_bytes["client"] += _b64_len(blob.get("data"))
            if isinstance(rt.get("text"), str):
                self._history.append(Message("user", rt["text"]))
            self._input_ts = self._input_ts or ts
            return []
        tool = _f(obj, "toolResponse")
        if isinstance(tool, Mapping):
            for fr in _f(tool, "functionResponses") or []:
                if isinstance(fr, Mapping):
                    self._history.append(Message("tool", json.dumps(fr.get("response", {})), 0, fr.get("id"), fr.get("name")))
            return self._turn(ts, size)
        return []

    def server(self, obj: Mapping[str, Any], size: int, ts: float) -> list[DecodeRecord]:
        out: list[DecodeRecord] = []
        answers = any(_f(obj, k) is not None for k in ("serverContent", "toolCall", "usageMetadata"))
        if self._live is None and answers:
            if not self._pending:  # the server took realtime input as a turn
                out += self._turn(self._input_ts or ts, 0)
            self._live = (self._pending.pop(0), LiveAssembler(), [0])
        if self._live is None:
            return out
        ex, asm, chunks = self._live
        ex.response_wire_bytes += size
        for d in asm.on_json(obj, ts):
            out.append(StreamDelta(ex, chunks[0], d, ts))
            chunks[0] += 1
        content = _m(obj, "serverContent") or {}
        if _f(content, "turnComplete") or _f(obj, "toolCall") is not None:
            out.append(self._finish(ts, complete=True))
        return out

    def close(self, ts: float) -> list[DecodeRecord]:
        out: list[DecodeRecord] = []
        if self._live is not None:
            self._live[0].problems.append("response_incomplete")
            out.append(self._finish(ts, complete=False))
        for ex in self._pending:
            ex.problems.append("response_incomplete")
            self._live = (ex, LiveAssembler(), [0])
            out.append(self._finish(ts, complete=False))
        self._pending = []
        return out

    def _turn(self, ts: float, size: int) -> list[DecodeRecord]:
        ex = self._open(ts)
        ex.request_wire_bytes = size
        s = self._setup
        ex.ai_request = AIRequestInfo(model=s.model, messages=[*s.messages, *self._history], tools=list(s.tools),
                                      parameters=dict(s.parameters), streaming=True)
        self._input_ts = None
        self._pending.append(ex)
        return [RequestComplete(ex)]

    def _finish(self, ts: float, complete: bool) -> ResponseComplete:
        assert self._live is not None
        ex, asm, _ = self._live
        self._live = None
        ex.complete, ex.response_end_ts = complete, ts
        ex.ai_response = asm.finish()
        self.audio_bytes["server"] += asm.audio_bytes
        if ex.ai_response.text:
            self._history.append(Message("assistant", ex.ai_response.text))
        return ResponseComplete(ex)
