"""OISP events → what the OTLP sink records: span starts and ends, log records, metric points.

Pure functions of the (already redacted) events, no SDK objects, so they are tested
on their own and the sink only does the I/O. One AI exchange is one span: its
ai.request starts it (the event's time is when the request was sent), its
ai.response ends it (the last byte of the response), matched by ``request_id``.

Content — messages, completions, tool definitions and calls, reasoning, a CLI
tool's arguments — leaves the machine only when the user opts in. Without that,
log bodies carry each piece of content replaced by its length (where ``--redaction
full`` puts its marker), and spans carry none.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec

from oisp.events.redact import hash_content
from oisp.sinks.base import encode_event
from oisp.sinks.otlp import semconv as sc

Attributes = dict[str, Any]
DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}
_PARAMETERS = {  # OISP's parameter names → the conventions' request attributes, with the type they want
    "temperature": (sc.REQUEST_TEMPERATURE, float), "top_p": (sc.REQUEST_TOP_P, float), "top_k": (sc.REQUEST_TOP_K, int),
    "max_tokens": (sc.REQUEST_MAX_TOKENS, int), "frequency_penalty": (sc.REQUEST_FREQUENCY_PENALTY, float),
    "presence_penalty": (sc.REQUEST_PRESENCE_PENALTY, float), "seed": (sc.REQUEST_SEED, int),
}
_USAGE = {  # OISP usage (prompt includes cache reads and writes, completion includes reasoning) → attributes
    "prompt_tokens": sc.USAGE_INPUT_TOKENS, "completion_tokens": sc.USAGE_OUTPUT_TOKENS,
    "cached_tokens": sc.USAGE_CACHE_READ_INPUT_TOKENS, "cache_write_tokens": sc.USAGE_CACHE_CREATION_INPUT_TOKENS,
    "reasoning_tokens": sc.USAGE_REASONING_OUTPUT_TOKENS,
}


def timestamp_ns(ts: str) -> int:
    """An OISP ``ts`` (RFC 3339, UTC, microseconds) as nanoseconds since the epoch, exactly."""
    moment = _dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    delta = moment - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def without_content(event: dict[str, Any]) -> dict[str, Any]:
    """The event with its content replaced by its length. The caller's event is left alone: only the
    containers on the way to content are copied (a deep copy cost more than the export)."""
    shown = dict(event)
    process = shown.pop("process", None)
    data = event.get("data")
    ai = str(event.get("event_type") or "").startswith("ai.")  # only ai.* events carry content in their data
    if isinstance(data, dict) and ai:
        shown["data"] = data = dict(data)
        for key in ("messages", "choices", "tool_calls"):
            if isinstance(data.get(key), list):
                data[key] = [dict(item) if isinstance(item, dict) else item for item in data[key]]
        for choice in data.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                choice["message"] = dict(choice["message"])
        if isinstance(data.get("delta"), dict):
            data["delta"] = delta = dict(data["delta"])
            if isinstance(delta.get("tool_calls"), list):
                delta["tool_calls"] = [dict(tc) if isinstance(tc, dict) else tc for tc in delta["tool_calls"]]
        for key in ("tools", "error"):  # descriptions at any depth; every error field but its labels
            if key in data:
                data[key] = copy.deepcopy(data[key])
    if ai:
        hash_content(shown, keep_hashes=False)
    if process is not None:
        shown["process"] = _process_without_content(process)
    return shown


_PROCESSES: dict[tuple, dict[str, Any]] = {}  # a flow's events all carry its process: hash its arguments once
_PROCESSES_MAX = 512


def _process_without_content(process: Any) -> Any:
    if not isinstance(process, dict):
        return process
    args = process.get("cmdline_args")
    key = (process.get("cmdline"), tuple(args) if isinstance(args, list) else None)
    try:
        hashed = _PROCESSES.get(key)
    except TypeError:  # an unhashable argument: nothing oisp writes, but not worth failing for
        hashed, key = None, None
    if hashed is None:
        mini = {"process": {k: process[k] for k in ("cmdline", "cmdline_args") if k in process}}
        hash_content(mini, keep_hashes=False)
        hashed = mini["process"]
        if key is not None:
            if len(_PROCESSES) >= _PROCESSES_MAX:
                _PROCESSES.clear()
            _PROCESSES[key] = hashed
    return {**process, **{k: (list(v) if isinstance(v, list) else v) for k, v in hashed.items()}}


_ENCODE = msgspec.json.Encoder().encode


def body(event: dict[str, Any], line: bytes | None = None) -> str:
    """A log record's body: the event as JSON text. One string encodes far faster than the
    event as nested OTLP values (which cost more CPU than the rest of the sensor per
    request), and a collector parses it back (e.g. ParseJSON). ``line``: the event's JSONL
    line (encode_event's), when ``event`` is what it says: the body is then that line byte
    for byte. Otherwise msgspec encodes the event (a tenth of the json module's time): the
    same JSON, with numbers such as 5e-05 spelled 0.00005."""
    if line is not None:
        return line.decode()
    try:
        return _ENCODE(event).decode()
    except (UnicodeEncodeError, TypeError):  # a lone surrogate, or a value msgspec does not encode
        return encode_event(event).decode()


def provider_name(data: dict[str, Any]) -> str:
    provider = data.get("provider") or {}
    pid = str(provider.get("id") or provider.get("name") or "unknown")
    return sc.PROVIDERS.get(pid, pid)


def operation_name(data: dict[str, Any]) -> str:
    provider = data.get("provider") or {}
    kind = str(data.get("request_type") or "chat")
    if kind == "chat" and provider.get("id") in sc.GENERATE_CONTENT_PROVIDERS:
        return "generate_content"
    return sc.OPERATIONS.get(kind, kind)


def server(data: dict[str, Any]) -> Attributes:
    """server.address/port from the endpoint the client called (its host, not the proxy's)."""
    try:
        url = urlsplit(str((data.get("provider") or {}).get("endpoint") or ""))
        host, port = url.hostname, url.port or DEFAULT_PORTS.get(url.scheme)
    except ValueError:
        return {}
    return {sc.SERVER_ADDRESS: host, sc.SERVER_PORT: port} if host and port else {}


def process_attributes(event: dict[str, Any]) -> Attributes:
    process = event.get("process") or {}
    attrs: Attributes = {}
    for key, name, kind in (("pid", sc.PROCESS_PID, int), ("ppid", sc.PROCESS_PARENT_PID, int),
                            ("name", sc.PROCESS_EXECUTABLE_NAME, str), ("exe", sc.PROCESS_EXECUTABLE_PATH, str),
                            ("cmdline", sc.PROCESS_COMMAND_LINE, str), ("user", sc.USER_NAME, str)):
        if process.get(key) not in (None, ""):
            attrs[name] = kind(process[key])
    return attrs


@dataclass
class SpanStart:
    request_id: str
    name: str
    start_ns: int
    attributes: Attributes
    metric_attributes: Attributes  # the low-cardinality subset the GenAI metrics carry


@dataclass
class SpanEnd:
    request_id: str
    end_ns: int
    duration_s: float | None
    attributes: Attributes
    error_type: str | None
    time_to_first_chunk_s: float | None
    tokens: dict[str, int] = field(default_factory=dict)  # gen_ai.token.type → count
    cost_usd: float | None = None


def _name(operation: str, model: str | None) -> str:
    return f"{operation} {model}" if model else operation


def _json(value: Any) -> str:
    """Content as a JSON string attribute. A lone surrogate (a client's escape of half a pair)
    is escaped: OTLP strings are UTF-8, and the SDK's encoder drops an attribute it cannot encode."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(value, separators=(",", ":"))
    return text


def _stop_sequences(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def request_span(event: dict[str, Any], *, content: bool) -> SpanStart:
    """The span an ai.request starts; ``event`` is the one shown (content already removed unless opted in)."""
    data = event.get("data") or {}
    model = (data.get("model") or {}).get("id")
    operation = operation_name(data)
    metric_attrs: Attributes = {sc.OPERATION_NAME: operation, sc.PROVIDER_NAME: provider_name(data), **server(data)}
    if model:
        metric_attrs[sc.REQUEST_MODEL] = str(model)
    attrs: Attributes = {**metric_attrs, sc.REQUEST_STREAM: bool(data.get("streaming")), **process_attributes(event),
                         "oisp.request_id": str(data.get("request_id") or "")}
    for key, value in (data.get("parameters") or {}).items():
        if key in _PARAMETERS and isinstance(value, (int, float)) and not isinstance(value, bool):
            name, kind = _PARAMETERS[key]
            attrs[name] = kind(value)
        elif key == "stop" and (stops := _stop_sequences(value)):
            attrs[sc.REQUEST_STOP_SEQUENCES] = stops
    auth = data.get("auth") or {}
    if auth.get("key_prefix"):
        attrs["oisp.auth.key_prefix"] = str(auth["key_prefix"])  # the provider's prefix (sk-proj-, …), never the key
    if content:
        attrs.update(_request_content(data))
    return SpanStart(str(data.get("request_id") or ""), _name(operation, model), timestamp_ns(event["ts"]), attrs,
                     metric_attrs)


def _text_parts(text: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "content": text}] if text not in (None, "") else []


def _request_content(data: dict[str, Any]) -> Attributes:
    separate = (data.get("provider") or {}).get("id") in sc.SEPARATE_SYSTEM_PROVIDERS
    system, messages = [], []
    for msg in data.get("messages") or []:
        role = msg.get("role") or "user"
        if role == "system" and separate:
            system.extend(_text_parts(msg.get("content")))
        elif role == "tool":
            messages.append({"role": "tool", "parts": [{"type": "tool_call_response", "id": msg.get("tool_call_id"),
                                                        "result": msg.get("content")}]})
        else:
            messages.append({"role": role, "parts": _text_parts(msg.get("content"))})
    attrs: Attributes = {}
    if messages:
        attrs[sc.INPUT_MESSAGES] = _json(messages)
    if system:
        attrs[sc.SYSTEM_INSTRUCTIONS] = _json(system)
    if data.get("tools"):
        attrs[sc.TOOL_DEFINITIONS] = _json(data["tools"])
    return attrs


def response_span(event: dict[str, Any], *, content: bool) -> SpanEnd:
    """What an ai.response adds to its span, and the metric points it makes."""
    data = event.get("data") or {}
    end = timestamp_ns(event["ts"])
    attrs: Attributes = {}
    model = (data.get("model") or {}).get("id")
    if model:
        attrs[sc.RESPONSE_MODEL] = str(model)
    if data.get("provider_request_id"):
        attrs[sc.RESPONSE_ID] = str(data["provider_request_id"])
    reasons = [c["finish_reason"] for c in data.get("choices") or [] if c.get("finish_reason")]
    if not reasons and data.get("finish_reason"):
        reasons = [data["finish_reason"]]
    if reasons:
        attrs[sc.RESPONSE_FINISH_REASONS] = [str(r) for r in reasons]
    usage = data.get("usage") or {}
    for key, name in _USAGE.items():
        if isinstance(usage.get(key), int):
            attrs[name] = usage[key]
    tokens = {kind: usage[key] for kind, key in (("input", "prompt_tokens"), ("output", "completion_tokens"))
              if isinstance(usage.get(key), int)}
    ttft = data.get("time_to_first_token_ms")
    ttft_s = ttft / 1000 if isinstance(ttft, (int, float)) else None
    if ttft_s is not None:
        attrs[sc.RESPONSE_TIME_TO_FIRST_CHUNK] = ttft_s
    cost = usage.get("cost") if isinstance(usage.get("cost"), dict) else None
    cost_usd = None
    if cost and isinstance(cost.get("usd"), (int, float)):
        cost_usd = float(cost["usd"])
        attrs["oisp.cost.usd"] = cost_usd
        attrs["oisp.cost.estimate"] = bool(cost.get("estimate", True))
        for key in ("prices_as_of", "source"):
            if cost.get(key):
                attrs[f"oisp.cost.{key}"] = str(cost[key])
    if isinstance(data.get("status_code"), int):
        attrs["http.response.status_code"] = data["status_code"]
    error = None if data.get("success") else error_type(data)
    if error:
        attrs[sc.ERROR_TYPE] = error
    attrs["oisp.completeness"] = str((event.get("confidence") or {}).get("completeness") or "")
    if content:
        attrs.update(_response_content(data))
    latency = data.get("latency_ms")
    return SpanEnd(str(data.get("request_id") or ""), end, latency / 1000 if isinstance(latency, (int, float)) else None,
                   attrs, error, ttft_s, tokens, cost_usd)


def error_type(data: dict[str, Any]) -> str:
    """Low-cardinality, as the conventions ask: the provider's error code, else the HTTP status."""
    err = data.get("error") if isinstance(data.get("error"), dict) else {}
    for kind in (err.get("code"), err.get("type")):  # OpenAI: code rate_limit_exceeded, type "requests"
        if isinstance(kind, str) and kind and kind not in ("http_error", "incomplete"):
            return kind
    status = data.get("status_code")
    if isinstance(status, int) and status >= 400:
        return str(status)
    return err["type"] if isinstance(err.get("type"), str) and err["type"] else "_OTHER"


def _response_content(data: dict[str, Any]) -> Attributes:
    messages = []
    calls = [{"type": "tool_call", "id": tc.get("id"), "name": tc.get("name"), "arguments": tc.get("arguments")}
             for tc in data.get("tool_calls") or []]
    for i, choice in enumerate(data.get("choices") or []):
        parts = _text_parts((choice.get("message") or {}).get("content"))
        if i == 0:
            parts += calls
        messages.append({"role": "assistant", "parts": parts,
                         "finish_reason": choice.get("finish_reason") or data.get("finish_reason") or "other"})
    if not messages and calls:
        messages.append({"role": "assistant", "parts": calls, "finish_reason": data.get("finish_reason") or "tool_calls"})
    return {sc.OUTPUT_MESSAGES: _json(messages)} if messages else {}


def response_without_request(end: SpanEnd, event: dict[str, Any]) -> SpanStart:
    """A response whose request this sink never saw (it started later, or the request was
    given up on): its span starts ``latency_ms`` before the end, named from the response."""
    data = event.get("data") or {}
    start = request_span({**event, "data": {**data, "request_type": data.get("request_type", "chat")}}, content=False)
    start.start_ns = end.end_ns - int(round((end.duration_s or 0.0) * 1e9))
    return start
