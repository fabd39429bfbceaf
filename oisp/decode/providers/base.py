"""What a provider parser produces, and the helpers every wire format shares.

A request parser turns one JSON request body into an :class:`AIRequestInfo`. A
:class:`ResponseAssembler` is fed a response piece by piece — SSE events,
NDJSON lines, JSON array elements, or one whole body — and ends with one
:class:`AIResponseInfo`: what a client library would have assembled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from oisp.decode.sse import SSEEvent

ROLE_MAP = {"model": "assistant", "chatbot": "assistant", "developer": "system", "ipython": "tool"}
OISP_ROLES = {"system", "user", "assistant", "tool", "function"}


class Appended:
    """A str field that streams extend piece by piece: ``add`` is O(len(piece)).

    ``obj.text += piece`` on an attribute copies the whole string every time
    (O(n²) over a long stream); here the pieces wait in a list and are joined
    once, when the field is read. Reading and assigning behave as for a str.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._key = f"_{name}_parts"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return ""  # the dataclass default
        parts = obj.__dict__.get(self._key)
        if not parts:
            return ""
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0]

    def __set__(self, obj: Any, value: str) -> None:
        obj.__dict__[self._key] = [value] if value else []

    def add(self, obj: Any, piece: str) -> None:
        obj.__dict__.setdefault(self._key, []).append(piece)


@dataclass
class Message:
    role: str
    content: str
    image_count: int = 0
    tool_call_id: str | None = None
    name: str | None = None


@dataclass
class ToolCall:
    id: str | None
    name: str | None
    arguments: str = Appended()  # type: ignore[assignment]
    type: str = "function"

    def add_arguments(self, piece: str) -> None:
        ToolCall.__dict__["arguments"].add(self, piece)


@dataclass
class AIRequestInfo:
    model: str | None = None
    messages: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    streaming: bool = False


@dataclass
class Choice:
    index: int
    text: str = Appended()  # type: ignore[assignment]
    finish_reason: str | None = None

    def add_text(self, piece: str) -> None:
        Choice.__dict__["text"].add(self, piece)


@dataclass
class AIResponseInfo:
    response_id: str | None = None
    model: str | None = None
    choices: dict[int, Choice] = field(default_factory=dict)
    thinking: str = Appended()  # type: ignore[assignment]
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # as the provider spelled it
    usage: dict[str, int] = field(default_factory=dict)
    error: dict[str, str] | None = None
    first_token_ts: float | None = None
    chunk_count: int = 0

    def add_thinking(self, piece: str) -> None:
        AIResponseInfo.__dict__["thinking"].add(self, piece)

    @property
    def text(self) -> str:
        first = self.choices.get(0) or next(iter(self.choices.values()), None)
        return first.text if first else ""

    def choice(self, index: int) -> Choice:
        c = self.choices.get(index)
        if c is None:
            c = self.choices[index] = Choice(index)
        return c


class ResponseAssembler:
    """Base reassembler: subclasses override ``on_json`` (one streamed object) and ``on_body``.

    ``on_sse`` defaults to decoding each event's data as JSON. Every ``on_*`` returns
    the client-visible deltas of that piece (dicts shaped like an OISP
    ai.streaming_chunk ``delta``) so a recorder can emit chunk events if asked.
    """

    def __init__(self) -> None:
        self.info = AIResponseInfo()

    def on_sse(self, event: SSEEvent, ts: float) -> list[dict[str, Any]]:
        data = event.data.strip()
        if not data or data == "[DONE]":
            return []
        return self.on_json(json.loads(data), ts, event.event)

    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        return []

    def on_body(self, obj: Any, ts: float) -> None:
        self.on_json(obj, ts)

    def finish(self) -> AIResponseInfo:
        return self.info

    def _token(self, ts: float) -> None:
        if self.info.first_token_ts is None:
            self.info.first_token_ts = ts

    def _error(self, err: Any) -> None:
        if isinstance(err, Mapping):
            self.info.error = {
                k: str(err[src]) for k, src in (("type", "type"), ("message", "message"), ("code", "code"))
                if err.get(src) is not None
            }
        elif err is not None:
            self.info.error = {"message": str(err)}


def role(value: Any) -> str:
    r = str(value or "user").lower()
    r = ROLE_MAP.get(r, r)
    return r if r in OISP_ROLES else "user"


def flatten_content(content: Any) -> tuple[str, int]:
    """Text of a message's content in any provider's shape, and how many images it carried."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, Mapping):
        content = [content]
    if not isinstance(content, list):
        return str(content), 0
    texts: list[str] = []
    images = 0
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            continue
        kind = str(part.get("type", ""))
        if "image" in kind or "inlineData" in part or "inline_data" in part or "image" in part:
            images += 1
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "tool_result" or "content" in part:
            t, n = flatten_content(part.get("content"))
            texts.append(t)
            images += n
        elif isinstance(part.get("toolResult"), Mapping):
            t, n = flatten_content(part["toolResult"].get("content"))
            texts.append(t)
            images += n
    return "".join(texts), images


def tool_definitions(tools: Any) -> list[dict[str, Any]]:
    """Name/type/description of each declared tool (OpenAI, Anthropic, Responses shapes)."""
    out: list[dict[str, Any]] = []
    for t in tools if isinstance(tools, list) else []:
        if not isinstance(t, Mapping):
            continue
        fn = t.get("function") if isinstance(t.get("function"), Mapping) else t
        kind = t.get("type", "function")
        entry: dict[str, Any] = {"type": kind if kind in ("function", "code_interpreter", "file_search", "computer_use")
                                 else "other"}
        if isinstance(fn.get("name"), str):
            entry["name"] = fn["name"]
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def pick_parameters(body: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """Copy the named sampling parameters, renamed to OISP's names (``names``: ours → theirs)."""
    params: dict[str, Any] = {}
    for ours, theirs in names.items():
        v = body.get(theirs)
        if v is None:
            continue
        if ours == "stop":
            v = [v] if isinstance(v, str) else [s for s in v if isinstance(s, str)] if isinstance(v, list) else None
            if v is None:
                continue
        elif ours == "max_tokens":
            if not isinstance(v, int) or isinstance(v, bool):
                continue
        elif not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        params[ours] = v
    return params


def as_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def set_usage(usage: dict[str, int], **values: Any) -> None:
    for k, v in values.items():
        iv = as_int(v)
        if iv is not None:
            usage[k] = iv
