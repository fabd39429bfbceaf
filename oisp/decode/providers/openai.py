"""OpenAI wire formats: Chat Completions, legacy Completions, Embeddings and the Responses API.

Chat Completions is also what Mistral, Groq, Together, Fireworks, DeepSeek,
Perplexity, xAI, OpenRouter, Hugging Face, Ollama's /v1, LM Studio and vLLM speak.
"""

from __future__ import annotations

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

_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_tokens",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "stop": "stop",
}


def _tool_choice(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    return "specific" if isinstance(v, Mapping) else None


def parse_chat_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = AIRequestInfo(model=body.get("model"), streaming=bool(body.get("stream")))
    for m in body.get("messages") or []:
        if not isinstance(m, Mapping):
            continue
        text, images = flatten_content(m.get("content"))
        info.messages.append(Message(role(m.get("role")), text, images, m.get("tool_call_id"), m.get("name")))
    info.tools = tool_definitions(body.get("tools") or body.get("functions"))
    info.tool_choice = _tool_choice(body.get("tool_choice"))
    info.parameters = pick_parameters(body, _PARAMS)
    if "max_completion_tokens" in body and "max_tokens" not in info.parameters:
        info.parameters.update(pick_parameters(body, {"max_tokens": "max_completion_tokens"}))
    return info


def parse_completions_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = AIRequestInfo(model=body.get("model"), streaming=bool(body.get("stream")))
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    info.messages = [Message("user", p) for p in prompts if isinstance(p, str)]
    info.parameters = pick_parameters(body, _PARAMS)
    return info


def parse_embeddings_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = AIRequestInfo(model=body.get("model"))
    inputs = body.get("input")
    info.messages = [Message("user", p) for p in (inputs if isinstance(inputs, list) else [inputs]) if isinstance(p, str)]
    return info


def _openai_usage(usage: dict[str, int], u: Any) -> None:
    if not isinstance(u, Mapping):
        return
    set_usage(usage, prompt_tokens=u.get("prompt_tokens"), completion_tokens=u.get("completion_tokens"),
              total_tokens=u.get("total_tokens"))
    ptd, ctd = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    if isinstance(ptd, Mapping):
        set_usage(usage, cached_tokens=ptd.get("cached_tokens"))
    if "cached_tokens" not in usage:  # DeepSeek's name for them (also inside prompt_tokens)
        set_usage(usage, cached_tokens=u.get("prompt_cache_hit_tokens"))
    if isinstance(ctd, Mapping):
        set_usage(usage, reasoning_tokens=ctd.get("reasoning_tokens"))


class ChatAssembler(ResponseAssembler):
    """Chat Completions chunks (and legacy Completions, whose choices carry ``text``)."""

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[tuple[int, int], ToolCall] = {}

    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        if not isinstance(obj, Mapping):
            return []
        info = self.info
        info.chunk_count += 1
        if obj.get("error") is not None:
            self._error(obj["error"])
        info.response_id = info.response_id or obj.get("id")
        info.model = info.model or obj.get("model")
        _openai_usage(info.usage, obj.get("usage"))
        deltas: list[dict[str, Any]] = []
        for ch in obj.get("choices") or []:
            if not isinstance(ch, Mapping):
                continue
            idx = ch.get("index") if isinstance(ch.get("index"), int) else 0
            choice = info.choice(idx)
            d = ch.get("delta")
            if not isinstance(d, Mapping):
                d = {"content": ch["text"]} if isinstance(ch.get("text"), str) else {}
            delta: dict[str, Any] = {}
            if isinstance(d.get("role"), str):
                delta["role"] = d["role"]
            if isinstance(d.get("content"), str) and d["content"]:
                choice.add_text(d["content"])
                delta["content"] = d["content"]
                self._token(ts)
            thinking = d.get("reasoning_content") or d.get("reasoning")
            if isinstance(thinking, str) and thinking:
                info.add_thinking(thinking)
                self._token(ts)
            calls = []
            for tc in d.get("tool_calls") or []:
                if isinstance(tc, Mapping):
                    calls.append(self._tool_delta(idx, tc, ts))
            if calls:
                delta["tool_calls"] = calls
            if ch.get("finish_reason"):
                choice.finish_reason = ch["finish_reason"]
                if idx == 0 or info.finish_reason is None:
                    info.finish_reason = ch["finish_reason"]
            if delta or ch.get("finish_reason"):
                deltas.append({"delta": delta, "finish_reason": ch.get("finish_reason"), "index": idx})
        return deltas

    def _tool_delta(self, choice_idx: int, tc: Mapping[str, Any], ts: float) -> dict[str, Any]:
        key = (choice_idx, tc["index"] if isinstance(tc.get("index"), int) else len(self._calls))
        call = self._calls.get(key)
        fn = tc.get("function") if isinstance(tc.get("function"), Mapping) else {}
        if call is None:
            call = self._calls[key] = ToolCall(tc.get("id"), fn.get("name"), "", tc.get("type") or "function")
            self.info.tool_calls.append(call)
        if isinstance(fn.get("arguments"), str):
            call.add_arguments(fn["arguments"])
        self._token(ts)
        return {k: v for k, v in (("id", tc.get("id")), ("name", fn.get("name")), ("arguments", fn.get("arguments")))
                if v is not None}

    def on_body(self, obj: Any, ts: float) -> None:
        if not isinstance(obj, Mapping):
            return
        info = self.info
        if obj.get("error") is not None:
            self._error(obj["error"])
        info.response_id, info.model = obj.get("id"), obj.get("model")
        _openai_usage(info.usage, obj.get("usage"))
        for ch in obj.get("choices") or []:
            if not isinstance(ch, Mapping):
                continue
            idx = ch.get("index") if isinstance(ch.get("index"), int) else 0
            choice = info.choice(idx)
            msg = ch.get("message") if isinstance(ch.get("message"), Mapping) else {}
            text = msg.get("content") if msg else ch.get("text")
            choice.text = text if isinstance(text, str) else ""
            thinking = msg.get("reasoning_content") or msg.get("reasoning")
            if isinstance(thinking, str):
                info.add_thinking(thinking)
            for tc in msg.get("tool_calls") or []:
                if isinstance(tc, Mapping):
                    fn = tc.get("function") if isinstance(tc.get("function"), Mapping) else {}
                    info.tool_calls.append(ToolCall(tc.get("id"), fn.get("name"), str(fn.get("arguments") or ""),
                                                    tc.get("type") or "function"))
            choice.finish_reason = ch.get("finish_reason")
            if idx == 0 or info.finish_reason is None:
                info.finish_reason = ch.get("finish_reason")


class EmbeddingsAssembler(ResponseAssembler):
    def on_body(self, obj: Any, ts: float) -> None:
        if isinstance(obj, Mapping):
            self.info.model = obj.get("model")
            _openai_usage(self.info.usage, obj.get("usage"))
            if obj.get("error") is not None:
                self._error(obj["error"])


# --- Responses API -------------------------------------------------------------------------

def parse_responses_request(body: Mapping[str, Any]) -> AIRequestInfo:
    info = AIRequestInfo(model=body.get("model"), streaming=bool(body.get("stream")))
    if isinstance(body.get("instructions"), str):
        info.messages.append(Message("system", body["instructions"]))
    items = body.get("input")
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, str):
            info.messages.append(Message("user", item))
        elif isinstance(item, Mapping):
            kind = item.get("type", "message")
            if kind == "message" or "role" in item:
                text, images = flatten_content(item.get("content"))
                info.messages.append(Message(role(item.get("role")), text, images))
            elif kind == "function_call_output":
                info.messages.append(Message("tool", str(item.get("output", "")), 0, item.get("call_id")))
    info.tools = tool_definitions(body.get("tools"))
    info.tool_choice = _tool_choice(body.get("tool_choice"))
    info.parameters = pick_parameters(body, {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_output_tokens"})
    return info


_INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


class ResponsesAssembler(ResponseAssembler):
    """Streams of ``response.*`` events; the final ``response`` object is authoritative."""

    def __init__(self) -> None:
        super().__init__()
        self._streamed_text: list[str] = []
        self._calls: dict[str, ToolCall] = {}

    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        if not isinstance(obj, Mapping):
            return []
        self.info.chunk_count += 1
        kind = obj.get("type") or event
        if kind in ("response.created", "response.in_progress"):
            self._take_header(obj.get("response"))
        elif kind == "response.output_text.delta" and isinstance(obj.get("delta"), str):
            self._token(ts)
            self._streamed_text.append(obj["delta"])
            self.info.choice(0).add_text(obj["delta"])
            return [{"delta": {"content": obj["delta"]}, "finish_reason": None, "index": 0}]
        elif (kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta")
              and isinstance(obj.get("delta"), str)):
            self._token(ts)
            self.info.add_thinking(obj["delta"])
        elif kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, Mapping) and item.get("type") == "function_call":
                call = ToolCall(item.get("call_id"), item.get("name"), str(item.get("arguments") or ""))
                self._calls[str(item.get("id"))] = call
                self.info.tool_calls.append(call)
        elif kind == "response.function_call_arguments.delta" and isinstance(obj.get("delta"), str):
            self._token(ts)
            known = self._calls.get(str(obj.get("item_id")))
            if known is not None:
                known.add_arguments(obj["delta"])
                piece = {"id": known.id, "arguments": obj["delta"]}
                return [{"delta": {"tool_calls": [piece]}, "finish_reason": None, "index": 0}]
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            if isinstance(obj.get("response"), Mapping):
                self.on_body(obj["response"], ts)
        elif kind == "error":
            # SSE puts code and message on the event; the WebSocket modes nest them under "error".
            self._error(obj["error"] if isinstance(obj.get("error"), Mapping) else obj)
            self.info.finish_reason = "error"
        return []

    def _take_header(self, resp: Any) -> None:
        if isinstance(resp, Mapping):
            self.info.response_id = self.info.response_id or resp.get("id")
            self.info.model = self.info.model or resp.get("model")

    def on_body(self, resp: Any, ts: float) -> None:
        if not isinstance(resp, Mapping):
            return
        info = self.info
        self._take_header(resp)
        if resp.get("error"):
            self._error(resp["error"])
        text, thinking, calls = [], [], []
        for item in resp.get("output") or []:
            if not isinstance(item, Mapping):
                continue
            if item.get("type") == "message":
                for part in item.get("content") or []:
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        text.append(part["text"])
            elif item.get("type") == "function_call":
                calls.append(ToolCall(item.get("call_id"), item.get("name"), str(item.get("arguments") or "")))
            elif item.get("type") == "reasoning":
                for part in item.get("summary") or []:
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        thinking.append(part["text"])
        if text or not self._streamed_text:
            info.choice(0).text = "".join(text)
        if calls:
            info.tool_calls = calls
        if thinking:
            info.thinking = "".join(thinking)
        u = resp.get("usage")
        if isinstance(u, Mapping):
            set_usage(info.usage, prompt_tokens=u.get("input_tokens"), completion_tokens=u.get("output_tokens"),
                      total_tokens=u.get("total_tokens"))
            if isinstance(u.get("input_tokens_details"), Mapping):
                set_usage(info.usage, cached_tokens=u["input_tokens_details"].get("cached_tokens"))
            if isinstance(u.get("output_tokens_details"), Mapping):
                set_usage(info.usage, reasoning_tokens=u["output_tokens_details"].get("reasoning_tokens"))
        status = resp.get("status")
        if status == "completed":
            info.finish_reason = "tool_calls" if info.tool_calls else "stop"
        elif status == "incomplete":
            details = resp.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, Mapping) else None
            info.finish_reason = _INCOMPLETE_REASONS.get(str(reason), "other")
        elif status == "failed":
            info.finish_reason = "error"
        info.choice(0).finish_reason = info.finish_reason

