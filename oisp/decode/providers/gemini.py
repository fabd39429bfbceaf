"""Google generateContent / streamGenerateContent (Gemini API and Vertex AI)."""

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

_PARAMS = {"temperature": "temperature", "top_p": "topP", "max_tokens": "maxOutputTokens", "stop": "stopSequences"}


def parse_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = AIRequestInfo(model=body.get("model"))
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, Mapping):
        info.messages.append(Message("system", flatten_content(system.get("parts"))[0]))
    for c in body.get("contents") or []:
        if isinstance(c, Mapping):
            text, images = flatten_content(c.get("parts"))
            info.messages.append(Message(role(c.get("role")), text, images))
    for t in body.get("tools") or []:
        if isinstance(t, Mapping):
            for fd in t.get("functionDeclarations") or t.get("function_declarations") or []:
                if isinstance(fd, Mapping):
                    entry = {"type": "function", "name": fd.get("name"), "description": fd.get("description")}
                    info.tools.append({k: v for k, v in entry.items() if isinstance(v, str)})
    config = body.get("generationConfig") or body.get("generation_config")
    if isinstance(config, Mapping):
        info.parameters = pick_parameters(config, _PARAMS)
    return info


class GenerateAssembler(ResponseAssembler):
    """Each streamed element is a full GenerateContentResponse holding the next piece."""

    def __init__(self) -> None:
        super().__init__()
        self._candidates: dict[str, int] = {}  # candidatesTokenCount as last reported

    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        if isinstance(obj, list):  # the non-SSE form, if handed over whole
            return [d for o in obj for d in self.on_json(o, ts)]
        if not isinstance(obj, Mapping):
            return []
        info = self.info
        info.chunk_count += 1
        if obj.get("error") is not None:
            self._error(obj["error"])
        info.response_id = info.response_id or obj.get("responseId")
        info.model = info.model or obj.get("modelVersion")
        u = obj.get("usageMetadata")
        if isinstance(u, Mapping):
            # Each chunk's usageMetadata is the running total. promptTokenCount includes
            # cachedContentTokenCount; thoughtsTokenCount is NOT in candidatesTokenCount but
            # is output, so OISP's completion_tokens (all output, reasoning included) is the sum.
            set_usage(
                info.usage,
                prompt_tokens=u.get("promptTokenCount"),
                total_tokens=u.get("totalTokenCount"),
                cached_tokens=u.get("cachedContentTokenCount"),
                reasoning_tokens=u.get("thoughtsTokenCount"),
            )
            set_usage(self._candidates, n=u.get("candidatesTokenCount"))
            if "n" in self._candidates or "reasoning_tokens" in info.usage:
                info.usage["completion_tokens"] = self._candidates.get("n", 0) + info.usage.get("reasoning_tokens", 0)
        deltas = []
        for cand in obj.get("candidates") or []:
            if not isinstance(cand, Mapping):
                continue
            idx = cand.get("index") if isinstance(cand.get("index"), int) else 0
            choice = info.choice(idx)
            content = cand.get("content") if isinstance(cand.get("content"), Mapping) else {}
            delta: dict[str, Any] = {}
            for part in content.get("parts") or []:
                if not isinstance(part, Mapping):
                    continue
                if isinstance(part.get("text"), str):
                    self._token(ts)
                    if part.get("thought"):
                        info.add_thinking(part["text"])
                    else:
                        choice.add_text(part["text"])
                        delta["content"] = delta.get("content", "") + part["text"]
                fc = part.get("functionCall")
                if isinstance(fc, Mapping):
                    self._token(ts)
                    call = ToolCall(fc.get("id"), fc.get("name"), json.dumps(fc.get("args", {})))
                    info.tool_calls.append(call)
                    delta.setdefault("tool_calls", []).append({"name": call.name, "arguments": call.arguments})
            if cand.get("finishReason"):
                choice.finish_reason = cand["finishReason"]
                if idx == 0:
                    info.finish_reason = cand["finishReason"]
            if delta or cand.get("finishReason"):
                deltas.append({"delta": delta, "finish_reason": cand.get("finishReason"), "index": idx})
        return deltas

    def finish(self):
        # Gemini ends a function-calling turn with STOP; clients treat it as a tool-call turn.
        if self.info.tool_calls and self.info.finish_reason == "STOP":
            self.info.finish_reason = "tool_calls"
        return self.info
