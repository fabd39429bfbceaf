"""AWS Bedrock Converse (non-streaming JSON; the model id travels in the path)."""

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
)

_PARAMS = {"temperature": "temperature", "top_p": "topP", "max_tokens": "maxTokens", "stop": "stopSequences"}


def parse_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = AIRequestInfo()
    for s in body.get("system") or []:
        if isinstance(s, Mapping) and isinstance(s.get("text"), str):
            info.messages.append(Message("system", s["text"]))
    for m in body.get("messages") or []:
        if isinstance(m, Mapping):
            text, images = flatten_content(m.get("content"))
            info.messages.append(Message(role(m.get("role")), text, images))
    tool_config = body.get("toolConfig")
    if isinstance(tool_config, Mapping):
        for t in tool_config.get("tools") or []:
            spec = t.get("toolSpec") if isinstance(t, Mapping) else None
            if isinstance(spec, Mapping):
                fields = (("type", "function"), ("name", spec.get("name")), ("description", spec.get("description")))
                info.tools.append({k: v for k, v in fields if isinstance(v, str)})
    if isinstance(body.get("inferenceConfig"), Mapping):
        info.parameters = pick_parameters(body["inferenceConfig"], _PARAMS)
    return info


class ConverseAssembler(ResponseAssembler):
    def on_body(self, obj: Any, ts: float) -> None:
        if not isinstance(obj, Mapping):
            return
        info = self.info
        output = obj.get("output") if isinstance(obj.get("output"), Mapping) else {}
        msg = output.get("message") if isinstance(output.get("message"), Mapping) else {}
        text = []
        for block in msg.get("content") or []:
            if not isinstance(block, Mapping):
                continue
            if isinstance(block.get("text"), str):
                text.append(block["text"])
            tu = block.get("toolUse")
            if isinstance(tu, Mapping):
                info.tool_calls.append(ToolCall(tu.get("toolUseId"), tu.get("name"), json.dumps(tu.get("input", {}))))
        info.choice(0).text = "".join(text)
        info.finish_reason = info.choice(0).finish_reason = obj.get("stopReason")
        u = obj.get("usage")
        if isinstance(u, Mapping):
            set_usage(info.usage, prompt_tokens=u.get("inputTokens"), completion_tokens=u.get("outputTokens"),
                      total_tokens=u.get("totalTokens"), cached_tokens=u.get("cacheReadInputTokens"))
        if "message" in obj and not msg:
            self._error({"message": str(obj["message"])})
