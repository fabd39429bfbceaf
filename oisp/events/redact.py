"""Redaction: secrets never leave oisp, and content can be hashed away entirely.

Modes:
- ``safe`` (default): credentials in headers and query strings are reduced to
  a key prefix + hash by the event builder; every string of every event is also
  scanned for key/token patterns, which are replaced by a marker.
- ``full``: as safe, and all conversation content (messages, completions,
  tool arguments, reasoning, stream deltas) is replaced by a hash marker.
- ``minimal``: only the credential handling of the builder; content is not
  scanned. For trusted local use only.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Any, Callable

KEY_HASH_CHARS = 16


class RedactionMode(str, enum.Enum):
    SAFE = "safe"
    FULL = "full"
    MINIMAL = "minimal"


def secret_hash(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_HASH_CHARS]


# (kind, pattern, how many leading characters are a public prefix). Longer prefixes first.
_PATTERNS: list[tuple[str, re.Pattern[str], int]] = [
    ("anthropic_key", re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"), 7),
    ("openai_project_key", re.compile(r"sk-proj-[A-Za-z0-9_\-]{8,}"), 8),
    ("openrouter_key", re.compile(r"sk-or-[A-Za-z0-9_\-]{8,}"), 6),
    ("api_key", re.compile(r"sk-[A-Za-z0-9_\-]{16,}"), 3),
    ("aws_access_key", re.compile(r"(?:AKIA|ASIA)[0-9A-Z]{16}"), 4),
    ("github_token", re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), 4),
    ("slack_token", re.compile(r"xox[abposr]-[A-Za-z0-9\-]{10,}"), 5),
    ("jwt", re.compile(r"eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}"), 3),
    ("google_api_key", re.compile(r"AIza[0-9A-Za-z_\-]{30,}"), 4),
    ("huggingface_token", re.compile(r"hf_[A-Za-z0-9]{20,}"), 3),
    ("groq_key", re.compile(r"gsk_[A-Za-z0-9]{20,}"), 4),
    ("xai_key", re.compile(r"xai-[A-Za-z0-9]{20,}"), 4),
    ("perplexity_key", re.compile(r"pplx-[A-Za-z0-9]{20,}"), 5),
    ("bearer_token", re.compile(r"(?<=Bearer )[A-Za-z0-9._~+/\-]{16,}=*", re.IGNORECASE), 0),
]
# One pass over a string tells whether any pattern could match: most strings of an event
# hold no secret, and one search is ~14x cheaper than trying each pattern.
_ANY_SECRET = re.compile("|".join(
    f"(?i:{p.pattern})" if p.flags & re.IGNORECASE else f"(?:{p.pattern})" for _, p, _ in _PATTERNS))
_SHORTEST_QUERY_SECRET = len("?sig=x")
_QUERY_SECRET = re.compile(r"([?&](?:key|api[_-]?key|access_token|token|sig|signature|x-amz-signature|x-amz-credential)=)([^&#\s\"']+)", re.IGNORECASE)


def _marker(kind: str, secret: str, prefix_len: int) -> str:
    return f"[REDACTED:{kind}:{secret[:prefix_len]}:{secret_hash(secret)}]"


def _may_have_query_secret(text: str) -> bool:
    return "=" in text and ("?" in text or "&" in text)


# Strings of an event repeat from one event to the next (process, host, model, header
# values): the short ones found clean are remembered, so each is searched once.
_CLEAN: dict[str, None] = {}
_CLEAN_MAX_ENTRIES = 4096
_CLEAN_MAX_LENGTH = 256


def scrub_secrets(text: str) -> tuple[str, int]:
    """Replace every secret-looking token in ``text``; returns (text, number replaced)."""
    if len(text) < _SHORTEST_QUERY_SECRET or text in _CLEAN:
        return text, 0
    may_have_key = _ANY_SECRET.search(text) is not None
    if not may_have_key and not _may_have_query_secret(text):
        if len(text) <= _CLEAN_MAX_LENGTH:
            if len(_CLEAN) >= _CLEAN_MAX_ENTRIES:
                _CLEAN.clear()  # crude but bounded; refilled by the next events
            _CLEAN[text] = None
        return text, 0
    count = 0

    def sub(kind: str, prefix_len: int) -> Callable[[re.Match[str]], str]:
        def repl(m: re.Match[str]) -> str:
            nonlocal count
            count += 1
            return _marker(kind, m.group(), prefix_len)

        return repl

    for kind, pattern, prefix_len in _PATTERNS if may_have_key else ():
        if pattern.search(text):
            text = pattern.sub(sub(kind, prefix_len), text)

    def query_repl(m: re.Match[str]) -> str:
        nonlocal count
        if m.group(2).startswith("[REDACTED:"):
            return m.group()
        count += 1
        return m.group(1) + _marker("query_secret", m.group(2), 0)

    text = _QUERY_SECRET.sub(query_repl, text)
    return text, count


def hashed_content(text: str, mode: str = "full") -> dict[str, Any]:
    return {"$redacted": {"reason": "policy", "original_length": len(text), "hash": secret_hash(text), "redaction_profile": mode}}


# Where conversation content lives in ai.* event data: paths of keys, "*" = every list element.
_CONTENT_PATHS: list[tuple[str, ...]] = [
    ("messages", "*", "content"),
    ("choices", "*", "message", "content"),
    ("tool_calls", "*", "arguments"),
    ("thinking",),
    ("delta", "content"),
    ("delta", "tool_calls", "*", "arguments"),
    ("error", "message"),
]


def _hash_at(node: Any, path: tuple[str, ...], mode: str) -> None:
    if not path or node is None:
        return
    key, rest = path[0], path[1:]
    children = (
        [(node, i) for i in range(len(node))] if key == "*" and isinstance(node, list) else [(node, key)] if isinstance(node, dict) and key in node else []
    )
    for parent, k in children:
        if rest:
            _hash_at(parent[k], rest, mode)
        elif isinstance(parent[k], str):
            parent[k] = hashed_content(parent[k], mode)


class Redactor:
    def __init__(self, mode: RedactionMode | str = RedactionMode.SAFE) -> None:
        self.mode = RedactionMode(mode)
        self.secrets_replaced = 0

    def apply(self, event: dict[str, Any]) -> dict[str, Any]:
        """Redact one event in place and return it; marks ``confidence`` when anything changed."""
        if self.mode is RedactionMode.FULL and event.get("event_type", "").startswith("ai."):
            for path in _CONTENT_PATHS:
                _hash_at(event.get("data"), path, self.mode.value)
            event["confidence"]["completeness"] = "redacted"
        found = 0
        if self.mode is not RedactionMode.MINIMAL:
            event, found = self._scrub(event)
            self.secrets_replaced += found
        conf = event.get("confidence")
        if isinstance(conf, dict):
            conf["redaction_profile"] = self.mode.value
            conf["redaction_applied"] = bool(found) or self.mode is RedactionMode.FULL or bool(conf.get("redaction_applied"))
        return event

    def _scrub(self, node: Any) -> tuple[Any, int]:
        if isinstance(node, str):
            return scrub_secrets(node)
        return node, _scrub_in_place(node) if isinstance(node, (dict, list)) else 0


def _scrub_in_place(node: dict | list) -> int:
    """Scrub every string inside a dict or list, in place; returns how many secrets went.
    (Called for every event: a string is only written back if it changed.)"""
    total = 0
    for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
        if isinstance(value, str):
            scrubbed, found = scrub_secrets(value)
            if found:
                node[key] = scrubbed
                total += found
        elif isinstance(value, (dict, list)):
            total += _scrub_in_place(value)
    return total
