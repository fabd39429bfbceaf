"""Anthropic Messages: content blocks, tool_use input_json deltas, thinking, usage."""

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

_PARAMS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_tokens", "stop": "stop_sequences"}


def parse_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = AIRequestInfo(model=body.get("model"), streaming=bool(body.get("stream")))
    if body.get("system"):
        info.messages.append(Message("system", flatten_content(body["system"])[0]))
    for m in body.get("messages") or []:
        if isinstance(m, Mapping):
            text, images = flatten_content(m.get("content"))
            info.messages.append(Message(role(m.get("role")), text, images))
    info.tools = tool_definitions(body.get("tools"))
    tc = body.get("tool_choice")
    info.tool_choice = tc.get("type") if isinstance(tc, Mapping) else None
    info.parameters = pick_parameters(body, _PARAMS)
    return info


class MessagesAssembler(ResponseAssembler):
    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, Any] = {}  # block index → ToolCall (tool_use) or block type

    def _usage(self, u: Any) -> None:
        if not isinstance(u, Mapping):
            return
        usage = self.info.usage
        set_usage(
            usage,
            prompt_tokens=u.get("input_tokens"),
            completion_tokens=u.get("output_tokens"),
            cached_tokens=u.get("cache_read_input_tokens"),
        )
        if "prompt_tokens" in usage or "completion_tokens" in usage:
            usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)

    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        if not isinstance(obj, Mapping):
            return []
        info = self.info
        info.chunk_count += 1
        kind = obj.get("type") or event
        if kind == "message_start" and isinstance(obj.get("message"), Mapping):
            msg = obj["message"]
            info.response_id, info.model = msg.get("id"), msg.get("model")
            self._usage(msg.get("usage"))
            info.choice(0)
            return [{"delta": {"role": msg.get("role", "assistant")}, "finish_reason": None, "index": 0}]
        if kind == "content_block_start" and isinstance(obj.get("content_block"), Mapping):
            block, idx = obj["content_block"], obj.get("index")
            if block.get("type") in ("tool_use", "server_tool_use"):
                call = ToolCall(block.get("id"), block.get("name"), "", "function")
                info.tool_calls.append(call)
                self._blocks[idx] = call
                self._token(ts)
                return [{"delta": {"tool_calls": [{"id": call.id, "name": call.name}]}, "finish_reason": None, "index": 0}]
            self._blocks[idx] = block.get("type")
            if isinstance(block.get("text"), str) and block["text"]:
                info.choice(0).add_text(block["text"])
                self._token(ts)
            return []
        if kind == "content_block_delta" and isinstance(obj.get("delta"), Mapping):
            d, target = obj["delta"], self._blocks.get(obj.get("index"))
            dt = d.get("type")
            if dt == "text_delta" and isinstance(d.get("text"), str):
                info.choice(0).add_text(d["text"])
                self._token(ts)
                return [{"delta": {"content": d["text"]}, "finish_reason": None, "index": 0}]
            if dt == "thinking_delta" and isinstance(d.get("thinking"), str):
                info.add_thinking(d["thinking"])
                self._token(ts)
            elif dt == "input_json_delta" and isinstance(target, ToolCall) and isinstance(d.get("partial_json"), str):
                target.add_arguments(d["partial_json"])
                self._token(ts)
                return [{"delta": {"tool_calls": [{"id": target.id, "arguments": d["partial_json"]}]}, "finish_reason": None, "index": 0}]
            return []
        if kind == "message_delta":
            d = obj.get("delta") if isinstance(obj.get("delta"), Mapping) else {}
            if d.get("stop_reason"):
                info.finish_reason = info.choice(0).finish_reason = d["stop_reason"]
            self._usage(obj.get("usage"))
            return [{"delta": {}, "finish_reason": d.get("stop_reason"), "index": 0}] if d.get("stop_reason") else []
        if kind == "error":
            self._error(obj.get("error"))
            info.finish_reason = "error"
        return []

    def on_body(self, obj: Any, ts: float) -> None:
        if not isinstance(obj, Mapping):
            return
        info = self.info
        if obj.get("type") == "error":
            self._error(obj.get("error"))
            return
        info.response_id, info.model = obj.get("id"), obj.get("model")
        text = []
        for block in obj.get("content") or []:
            if not isinstance(block, Mapping):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif block.get("type") == "thinking" and isinstance(block.get("thinking"), str):
                info.add_thinking(block["thinking"])
            elif block.get("type") in ("tool_use", "server_tool_use"):
                info.tool_calls.append(ToolCall(block.get("id"), block.get("name"), json.dumps(block.get("input", {}))))
        info.choice(0).text = "".join(text)
        info.finish_reason = info.choice(0).finish_reason = obj.get("stop_reason")
        self._usage(obj.get("usage"))
