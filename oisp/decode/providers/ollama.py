"""Ollama's native API: /api/chat and /api/generate, streamed as NDJSON by default."""

from __future__ import annotations

import json
from typing import Any, Mapping

from oisp.decode.providers.base import (
    AIRequestInfo,
    Message,
    ResponseAssembler,
    ToolCall,
    flatten_content,
    pick_parameters,
    role,
    set_usage,
    tool_definitions,
)

_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "num_predict", "stop": "stop"}


def _common(body: Mapping[str, Any]) -> AIRequestInfo:
    # Ollama streams unless told otherwise.
    info = AIRequestInfo(model=body.get("model"), streaming=body.get("stream", True) is not False)
    if isinstance(body.get("options"), Mapping):
        info.parameters = pick_parameters(body["options"], _OPTIONS)
    return info


def parse_chat_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = _common(body)
    for m in body.get("messages") or []:
        if isinstance(m, Mapping):
            text, _ = flatten_content(m.get("content"))
            images = m.get("images")
            info.messages.append(Message(role(m.get("role")), text, len(images) if isinstance(images, list) else 0))
    info.tools = tool_definitions(body.get("tools"))
    return info


def parse_generate_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = _common(body)
    if isinstance(body.get("system"), str):
        info.messages.append(Message("system", body["system"]))
    if isinstance(body.get("prompt"), str):
        images = body.get("images")
        info.messages.append(Message("user", body["prompt"], len(images) if isinstance(images, list) else 0))
    return info


class NDJSONAssembler(ResponseAssembler):
    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        if not isinstance(obj, Mapping):
            return []
        info = self.info
        info.chunk_count += 1
        if obj.get("error") is not None:
            self._error(obj["error"])
        info.model = info.model or obj.get("model")
        choice = info.choice(0)
        delta: dict[str, Any] = {}
        msg = obj.get("message") if isinstance(obj.get("message"), Mapping) else {}
        text = msg.get("content") if msg else obj.get("response")
        thinking = msg.get("thinking") if msg else obj.get("thinking")
        if isinstance(text, str) and text:
            self._token(ts)
            choice.add_text(text)
            delta["content"] = text
        if isinstance(thinking, str) and thinking:
            self._token(ts)
            info.add_thinking(thinking)
        for tc in msg.get("tool_calls") or []:
            fn = tc.get("function") if isinstance(tc, Mapping) and isinstance(tc.get("function"), Mapping) else None
            if fn is not None:
                self._token(ts)
                info.tool_calls.append(ToolCall(tc.get("id"), fn.get("name"), json.dumps(fn.get("arguments", {}))))
                delta.setdefault("tool_calls", []).append({"name": fn.get("name")})
        finish = None
        if obj.get("done"):
            finish = obj.get("done_reason") or "stop"
            info.finish_reason = choice.finish_reason = finish
            set_usage(info.usage, prompt_tokens=obj.get("prompt_eval_count"), completion_tokens=obj.get("eval_count"))
            if info.usage:
                info.usage["total_tokens"] = info.usage.get("prompt_tokens", 0) + info.usage.get("completion_tokens", 0)
        return [{"delta": delta, "finish_reason": finish, "index": 0}] if delta or finish else []
