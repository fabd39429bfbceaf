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
        self._raw_usage: dict[str, int] = {}  # Anthropic's usage fields as last reported

    def _usage(self, u: Any) -> None:
        """message_start's usage, then message_delta's, whose counts are cumulative: the last
        value of each field wins. input_tokens excludes cache reads and writes; OISP's
        prompt_tokens includes them (as OpenAI's does), so the sum is taken here."""
        if not isinstance(u, Mapping):
            return
        raw = self._raw_usage
        set_usage(raw, input=u.get("input_tokens"), output=u.get("output_tokens"),
                  read=u.get("cache_read_input_tokens"), write=u.get("cache_creation_input_tokens"))
        split = u.get("cache_creation")
        if isinstance(split, Mapping):
            set_usage(raw, write_5m=split.get("ephemeral_5m_input_tokens"), write_1h=split.get("ephemeral_1h_input_tokens"))
        usage = self.info.usage
        if "input" in raw or "output" in raw:
            prompt = raw.get("input", 0) + raw.get("read", 0) + raw.get("write", 0)
            usage.update(prompt_tokens=prompt, completion_tokens=raw.get("output", 0), total_tokens=prompt + raw.get("output", 0))
        for ours, theirs in (("cached_tokens", "read"), ("cache_write_tokens", "write"),
                             ("cache_write_5m_tokens", "write_5m"), ("cache_write_1h_tokens", "write_1h")):
            if theirs in raw:
                usage[ours] = raw[theirs]

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
                piece = {"id": target.id, "arguments": d["partial_json"]}
                return [{"delta": {"tool_calls": [piece]}, "finish_reason": None, "index": 0}]
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
