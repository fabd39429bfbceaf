"""Cohere Chat v2: ``message-start`` / ``content-delta`` / ``tool-call-*`` / ``message-end`` events."""

from __future__ import annotations

from typing import Any, Mapping

from oisp.decode.providers.base import ResponseAssembler, ToolCall, flatten_content, set_usage
from oisp.decode.providers.openai import parse_chat_request

# The v2 request body is OpenAI-shaped (model, messages, tools, stream, temperature, max_tokens).
parse_request = parse_chat_request


def _tool_call(delta: Any) -> Mapping[str, Any]:
    msg = delta.get("message") if isinstance(delta, Mapping) else None
    tc = msg.get("tool_calls") if isinstance(msg, Mapping) else None
    return tc if isinstance(tc, Mapping) else {}


class ChatAssembler(ResponseAssembler):
    def _usage(self, u: Any) -> None:
        if isinstance(u, Mapping):
            tokens = u.get("tokens") if isinstance(u.get("tokens"), Mapping) else u.get("billed_units")
            if isinstance(tokens, Mapping):
                set_usage(self.info.usage, prompt_tokens=tokens.get("input_tokens"),
                          completion_tokens=tokens.get("output_tokens"))
                usage = self.info.usage
                usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)

    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        if not isinstance(obj, Mapping):
            return []
        info = self.info
        info.chunk_count += 1
        kind, delta = obj.get("type") or event, obj.get("delta")
        if kind == "message-start":
            info.response_id = obj.get("id")
            info.choice(0)
        elif kind == "content-delta" and isinstance(delta, Mapping):
            content = delta.get("message", {}).get("content", {}) if isinstance(delta.get("message"), Mapping) else {}
            text = content.get("text") if isinstance(content, Mapping) else None
            if isinstance(text, str):
                self._token(ts)
                info.choice(0).add_text(text)
                return [{"delta": {"content": text}, "finish_reason": None, "index": 0}]
        elif kind == "tool-call-start":
            tc = _tool_call(delta)
            fn = tc.get("function") if isinstance(tc.get("function"), Mapping) else {}
            self._token(ts)
            info.tool_calls.append(ToolCall(tc.get("id"), fn.get("name"), str(fn.get("arguments") or "")))
        elif kind == "tool-call-delta" and info.tool_calls:
            fn = _tool_call(delta).get("function")
            if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
                info.tool_calls[-1].add_arguments(fn["arguments"])
        elif kind == "message-end" and isinstance(delta, Mapping):
            info.finish_reason = info.choice(0).finish_reason = delta.get("finish_reason")
            self._usage(delta.get("usage"))
            if delta.get("error"):
                self._error(delta.get("error"))
            return [{"delta": {}, "finish_reason": info.finish_reason, "index": 0}]
        return []

    def on_body(self, obj: Any, ts: float) -> None:
        if not isinstance(obj, Mapping):
            return
        info = self.info
        info.response_id = obj.get("id")
        msg = obj.get("message") if isinstance(obj.get("message"), Mapping) else {}
        info.choice(0).text = flatten_content(msg.get("content"))[0]
        for tc in msg.get("tool_calls") or []:
            if isinstance(tc, Mapping) and isinstance(tc.get("function"), Mapping):
                info.tool_calls.append(ToolCall(tc.get("id"), tc["function"].get("name"),
                                                str(tc["function"].get("arguments") or "")))
        info.finish_reason = info.choice(0).finish_reason = obj.get("finish_reason")
        self._usage(obj.get("usage"))
