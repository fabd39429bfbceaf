"""Redaction: secrets never leave oisp, and content can be hashed away entirely.

Modes:
- ``safe`` (default): credentials in headers and query strings are reduced to
  a key prefix + hash by the event builder; every string of every event is also
  scanned for secrets, which are replaced by a marker: keys with a prefix the
  spec lists for some provider (so a provider added to the spec is covered),
  a few other well-known token formats, and any value in a position that holds
  a credential (after ``Bearer``, in an ``x-api-key:``-like header, in a
  ``name=value`` or ``--name value`` pair named like key/token/secret/password,
  after "API key provided:"), prefixed or not.
- ``full``: as safe, and all conversation content (messages, completions,
  tool arguments and descriptions, reasoning, stream deltas, the provider's
  error, and the arguments of the client's command line, which hold the prompt
  of CLI tools) is replaced by a hash marker.
- ``minimal``: only the credential handling of the builder and of process
  attribution; content is not scanned. For trusted local use only.

Hashes are HMAC-SHA256 with a random per-install key (``hash.key`` in the data
directory, 0600), truncated to 16 hex digits: equal secrets give equal hashes
across runs of one install, and nobody without the key can test a guess
against a hash. The ``sha256:`` tag is kept for the event schema.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import os
import re
import secrets
import shlex
import sys
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

KEY_HASH_CHARS = 16
HASH_KEY_FILE = "hash.key"
HASH_KEY_BYTES = 32


class RedactionMode(str, enum.Enum):
    SAFE = "safe"
    FULL = "full"
    MINIMAL = "minimal"


# -- the keyed hash ------------------------------------------------------------------------------

_keys: dict[str, bytes] = {}


def secret_hash(secret: str) -> str:
    key = _hash_key()
    digest = hmac.new(key, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return "sha256:" + digest[:KEY_HASH_CHARS]


def _hash_key() -> bytes:
    from oisp.paths import data_dir

    where = str(data_dir())
    key = _keys.get(where)
    if key is None:
        key = _keys[where] = _load_or_create_key(Path(where) / HASH_KEY_FILE)
    return key


def _load_or_create_key(path: Path) -> bytes:
    """The install's key, made once (0600, the user's under sudo). If it cannot be had, a key
    for this process alone: hashes still hide the secret but match only within this run."""
    from oisp.safefile import open_private, read_nofollow

    try:
        fd = open_private(path, exclusive=True)
    except FileExistsError:
        deadline = time.monotonic() + 2.0
        while True:  # a concurrent first run may not have written it yet
            try:
                key = read_nofollow(path)
            except OSError as exc:
                return _process_key(path, exc)
            if len(key) == HASH_KEY_BYTES:
                return key
            if time.monotonic() > deadline:
                return _process_key(path, ValueError(f"{len(key)} bytes, not {HASH_KEY_BYTES}"))
            time.sleep(0.02)
    except OSError as exc:
        return _process_key(path, exc)
    key = secrets.token_bytes(HASH_KEY_BYTES)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key


def _process_key(path: Path, problem: Exception) -> bytes:
    print(f"oisp: warning: cannot use the hash key {path} ({problem}); credential hashes of this run "
          "will not match other runs", file=sys.stderr)
    return secrets.token_bytes(HASH_KEY_BYTES)


# -- what a secret looks like ---------------------------------------------------------------------

# A pattern: kind, regex, how many leading characters are a public prefix, a check of the secret
# (the whole match, or the named group "s" where the regex also matches its context), and the
# anchors: lower-case literals one of which every match contains. A string that holds none of a
# pattern's anchors is not searched with it: a few substring tests cost far less than a regex.
Pattern = tuple[str, "re.Pattern[str]", int, Callable[[str, "re.Match[str]"], bool], tuple[str, ...]]

_BODY = r"[A-Za-z0-9_\-]{16,}(?:[.+/][A-Za-z0-9_\-]+)*={0,2}"  # base62/64url, maybe dotted or base64
_NOT_A_MARKER = r"(?!\[REDACTED:)"
_VALUE = r"[^\s\"'&,;<>()\[\]{}]"
# The names of pairs that hold a credential; "max_tokens", "monkey" and "keyboard" are not.
_SECRET_NAME = (r"(?:[A-Za-z0-9]+[_.-])*(?:api[_-]?key|apikey|access[_-]?key|secret[_-]?key|private[_-]?key|key|"
                r"token|secret|client[_-]?secret|password|passwd|pwd|credentials?|auth)")
_PASSWORD_NAME = re.compile(r"(?ai)(?:password|passwd|pwd)$")
_HEADER_NAMES = (r"x-api-key|x-goog-api-key|api[ _-]?key(?:\s+provided)?|authorization|proxy-authorization|"
                 r"x-auth-token|x-amz-security-token")


def _mixed(body: str) -> bool:
    """Random-looking: at least two of lower case, upper case, digits."""
    return sum((any(c.islower() for c in body), any(c.isupper() for c in body), any(c.isdigit() for c in body))) >= 2


def _always(secret: str, m: re.Match[str]) -> bool:
    return True


def _prefixed(prefix: str) -> Callable[[str, re.Match[str]], bool]:
    # A short prefix ("sk-", "fw_", "hf_") also starts words: "fw_update_firmware_version" is not a key.
    return _always if len(prefix) >= 4 else (lambda secret, m: _mixed(secret[len(prefix):]))


def _pair_value(secret: str, m: re.Match[str]) -> bool:
    """A named pair's value: a flag's or a password's always; "key: understanding" in prose is no key."""
    name = m.group("n")
    if name.startswith("-") or _PASSWORD_NAME.search(name):
        return len(secret) >= 3
    return len(secret) >= 8 and _mixed(secret)


def _high_entropy(secret: str, m: re.Match[str]) -> bool:
    if not (any(c.isdigit() for c in secret) and any(c.isalpha() for c in secret)):
        return False
    n = len(secret)
    return -sum(k / n * math.log2(k / n) for k in Counter(secret).values()) >= 3.0


_OTHER_TOKENS: list[Pattern] = [
    ("github", re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), 4, _always,
     ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    ("slack", re.compile(r"xox[abposr]-[A-Za-z0-9\-]{10,}"), 5, _always, ("xox",)),
    ("jwt", re.compile(r"eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}"), 3, _always, ("eyj",)),
]
_NAME_ANCHORS = ("key", "token", "secret", "passw", "pwd", "credential", "auth")  # every _SECRET_NAME has one
# Credentials recognised by where they stand; group "s" is the secret.
_IN_AUTH_POSITION: list[Pattern] = [
    ("bearer", re.compile(r"(?ai)\bbearer[ \t]+" + _NOT_A_MARKER + r"(?P<s>[A-Za-z0-9._~+/\-]{8,}=*)"), 0, _always,
     ("bearer",)),
    ("header", re.compile(r"(?ai)(?<![A-Za-z0-9-])(?:" + _HEADER_NAMES + r")[\"']?[ \t]*[:=][ \t]*[\"']?"
                               r"(?:(?:bearer|basic|token)[ \t]+)?" + _NOT_A_MARKER + r"(?P<s>" + _VALUE + r"{8,})"),
     0, _always, ("key", "auth", "token")),
    ("value", re.compile(r"(?ai)(?<![A-Za-z0-9])(?P<n>-{0,2}" + _SECRET_NAME + r")(?![A-Za-z0-9])[\"']?"
                                r"[ \t]*[=:][ \t]*[\"']?" + _NOT_A_MARKER + r"(?P<s>" + _VALUE + r"{3,})"), 0, _pair_value,
     _NAME_ANCHORS),
    ("value", re.compile(r"(?ai)(?<!\S)(?P<n>--?" + _SECRET_NAME + r")[ \t]+[\"']?" + _NOT_A_MARKER +
                                r"(?P<s>" + _VALUE + r"{3,})"), 0, _pair_value, _NAME_ANCHORS),
]
# Only where no word of content stands (the user agent, a command line): any long random token.
_HIGH_ENTROPY: Pattern = ("random", re.compile(r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]{20,}(?![A-Za-z0-9_\-])"), 0,
                          _high_entropy, ())
_SHORTEST_QUERY_SECRET = len("?sig=x")
_QUERY_SECRET = re.compile(r"([?&](?:key|api[_-]?key|access_token|token|sig|signature|x-amz-signature|x-amz-credential)=)"
                           r"([^&#\s\"']+)", re.IGNORECASE)


def _provider_keys(prefixes: Iterable[tuple[str, str]]) -> list[Pattern]:
    """One pattern per key prefix of the spec, longest first (sk-proj- before sk-)."""
    seen: dict[str, str] = {}
    for provider_id, prefix in prefixes:
        seen.setdefault(prefix, provider_id)
    # The literal prefix leads the regex, so the regex engine itself skips to it.
    return [(kind, re.compile(re.escape(prefix) + _BODY), min(len(prefix), 8), _prefixed(prefix), (prefix.lower(),))
            for prefix, kind in sorted(seen.items(), key=lambda item: -len(item[0]))]


class Scrubber:
    """Finds and replaces secrets in strings, with patterns built from a spec's key prefixes."""

    def __init__(self, key_prefixes: Iterable[tuple[str, str]]) -> None:
        self.patterns: list[Pattern] = [*_provider_keys(key_prefixes), *_OTHER_TOKENS, *_IN_AUTH_POSITION]
        self._anchors = tuple(sorted({a for *_, anchors in self.patterns for a in anchors}))
        # Strings of an event repeat from one event to the next (process, host, model, header
        # values): the short ones found clean are remembered, so each is searched once.
        self._clean: dict[str, None] = {}

    def scrub(self, text: str, *, anywhere: bool = False) -> tuple[str, int]:
        """Replace every secret in ``text``; returns (text, number replaced). ``anywhere``: also any
        long random token, for strings that hold no prose (a user agent, a command line)."""
        if len(text) < _SHORTEST_QUERY_SECRET or (not anywhere and text in self._clean):
            return text, 0
        # Most strings of an event hold no secret: their lower case holds none of the anchors.
        low = text.lower()
        candidates = [p for p in self.patterns if any(a in low for a in p[4])] if any(
            a in low for a in self._anchors) else []
        if not candidates and not anywhere and not _may_have_query_secret(text):
            self._remember_clean(text)
            return text, 0
        scrubbed, found = self.scrub_each(text, candidates, anywhere)
        if not found and not anywhere:
            self._remember_clean(text)
        return scrubbed, found

    def _remember_clean(self, text: str) -> None:
        if len(text) <= _CLEAN_MAX_LENGTH:
            if len(self._clean) >= _CLEAN_MAX_ENTRIES:
                self._clean.clear()  # crude but bounded; refilled by the next events
            self._clean[text] = None

    def scrub_each(self, text: str, patterns: list[Pattern] | None = None, anywhere: bool = False) -> tuple[str, int]:
        """Every pattern in turn, no prefilter (what ``scrub`` must equal)."""
        count = 0
        for pattern in [*(self.patterns if patterns is None else patterns), *([_HIGH_ENTROPY] if anywhere else [])]:
            text, n = _apply(pattern, text)
            count += n

        def query_repl(m: re.Match[str]) -> str:
            nonlocal count
            if m.group(2).startswith("[REDACTED:"):
                return m.group()
            count += 1
            return m.group(1) + _marker("query", m.group(2), 0)

        text = _QUERY_SECRET.sub(query_repl, text)
        return text, count

    def scrub_argv(self, args: list[str]) -> list[str]:
        """A command line's arguments with every secret replaced, "--api-key K" (two arguments) included."""
        out: list[str] = []
        secret_next = False
        for arg in args:
            if secret_next and not arg.startswith("-"):
                out.append(_marker("value", arg, 0))
            else:
                out.append(self.scrub(arg, anywhere=True)[0])
            secret_next = _FLAG_ALONE.fullmatch(arg) is not None
        return out


_FLAG_ALONE = re.compile(r"(?ai)--?" + _SECRET_NAME)
_CLEAN_MAX_ENTRIES = 4096
_CLEAN_MAX_LENGTH = 256


def _apply(pattern: Pattern, text: str) -> tuple[str, int]:
    kind, regex, prefix_len, check, _ = pattern
    count = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal count
        group = "s" if "s" in regex.groupindex else 0
        secret = m.group(group)
        if not check(secret, m):
            return m.group()
        count += 1
        start, end = m.span(group)
        whole = m.group()
        return whole[:start - m.start()] + _marker(kind, secret, prefix_len) + whole[end - m.start():]

    if regex.search(text) is None:
        return text, 0
    return regex.sub(repl, text), count


def _marker(kind: str, secret: str, prefix_len: int) -> str:
    # No kind reads as a secret's name ("..._key:"), so a marker is never taken for a pair.
    return f"[REDACTED:{kind}:{secret[:prefix_len]}:{secret_hash(secret)}]"


def _may_have_query_secret(text: str) -> bool:
    return "=" in text and ("?" in text or "&" in text)


@lru_cache(maxsize=8)
def scrubber_for(key_prefixes: tuple[tuple[str, str], ...]) -> Scrubber:
    return Scrubber(key_prefixes)


def spec_key_prefixes(spec=None) -> tuple[tuple[str, str], ...]:
    """(provider id, key prefix) for every provider of the spec (default: the configured spec)."""
    if spec is None:
        from oisp.spec import default_spec

        spec = default_spec()
    return tuple((p.id, prefix) for p in spec.providers for prefix in p.key_prefixes)


def default_scrubber() -> Scrubber:
    return scrubber_for(spec_key_prefixes())


def scrub_secrets(text: str) -> tuple[str, int]:
    """Replace every secret-looking token in ``text``; returns (text, number replaced)."""
    return default_scrubber().scrub(text)


def scrub_cmdline(args: list[str], scrubber: Scrubber | None = None) -> tuple[list[str], str]:
    """A process's arguments and its command line, without the secrets they held."""
    args = (scrubber or default_scrubber()).scrub_argv(args)
    return args, shlex.join(args)


# -- content ---------------------------------------------------------------------------------------

OMIT = "omit"  # a profile that keeps only the length of content, no hash of it (see hash_content)


def hashed_content(text: str, mode: str = "full") -> dict[str, Any]:
    if mode == OMIT:
        return {"$redacted": {"reason": "policy", "original_length": len(text), "redaction_profile": mode}}
    return {"$redacted": {"reason": "policy", "original_length": len(text), "hash": secret_hash(text), "redaction_profile": mode}}


def _hashed_string(text: str, mode: str = "full") -> str:
    """Content where the schema wants a string (a tool's description, a command line)."""
    return f"[REDACTED:content:{len(text)}]" if mode == OMIT else f"[REDACTED:content:{len(text)}:{secret_hash(text)}]"


# Where conversation content lives in ai.* event data: paths of keys, "*" = every list element.
_CONTENT_PATHS: list[tuple[str, ...]] = [
    ("messages", "*", "content"),
    ("choices", "*", "message", "content"),
    ("tool_calls", "*", "arguments"),
    ("thinking",),
    ("delta", "content"),
    ("delta", "tool_calls", "*", "arguments"),
]
_ERROR_LABELS = ("type", "code")  # the provider's error names its kind with these; the rest may echo content


def _hash_at(node: Any, path: tuple[str, ...], mode: str) -> None:
    if not path or node is None:
        return
    key, rest = path[0], path[1:]
    children = (
        [(node, i) for i in range(len(node))] if key == "*" and isinstance(node, list) else [(node, key)]
        if isinstance(node, dict) and key in node else []
    )
    for parent, k in children:
        if rest:
            _hash_at(parent[k], rest, mode)
        elif isinstance(parent[k], str):
            parent[k] = hashed_content(parent[k], mode)


def _hash_descriptions(node: Any, mode: str = "full") -> None:
    """Every "description" in tool definitions (the function's and its parameters'), at any depth."""
    for key, value in (node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()):
        if key == "description" and isinstance(value, str):
            node[key] = _hashed_string(value, mode)
        else:
            _hash_descriptions(value, mode)


def _hash_full(event: dict[str, Any], mode: str) -> None:
    data = event.get("data")
    if isinstance(data, dict):
        for path in _CONTENT_PATHS:
            _hash_at(data, path, mode)
        _hash_descriptions(data.get("tools"), mode)
        error = data.get("error")
        if isinstance(error, dict):
            for key, value in error.items():
                if key not in _ERROR_LABELS and isinstance(value, str):
                    error[key] = hashed_content(value, mode)
    process = event.get("process")
    if isinstance(process, dict):  # the program stays; its arguments are a CLI tool's prompt
        args = process.get("cmdline_args")
        if isinstance(args, list) and args:
            rest = shlex.join(str(a) for a in args[1:])
            process["cmdline_args"] = [str(args[0])] + ([_hashed_string(rest, mode)] if rest else [])
            process["cmdline"] = shlex.join(process["cmdline_args"])
        elif isinstance(process.get("cmdline"), str):
            program, _, rest = process["cmdline"].partition(" ")
            process["cmdline"] = program + (" " + _hashed_string(rest, mode) if rest else "")


def hash_content(event: dict[str, Any], *, keep_hashes: bool = True) -> None:
    """Hash an event's content in place as ``--redaction full`` does, for outputs that must not
    carry content whatever mode recorded the event. ``keep_hashes=False`` keeps only each
    piece's length (profile "omit"): a keyed hash costs ~20 µs a piece, more than such an
    output may spend on a whole event."""
    _hash_full(event, RedactionMode.FULL.value if keep_hashes else OMIT)


class Redactor:
    def __init__(self, mode: RedactionMode | str = RedactionMode.SAFE, spec=None) -> None:
        self.mode = RedactionMode(mode)
        self.scrubber = scrubber_for(spec_key_prefixes(spec))
        self.secrets_replaced = 0

    def apply(self, event: dict[str, Any]) -> dict[str, Any]:
        """Redact one event in place and return it; marks ``confidence`` when anything changed."""
        if self.mode is RedactionMode.FULL and event.get("event_type", "").startswith("ai."):
            _hash_full(event, self.mode.value)
            event["confidence"]["completeness"] = "redacted"
        found = 0
        if self.mode is not RedactionMode.MINIMAL:
            event, found = self._scrub(event)
            found += self._scrub_user_agent(event)
            self.secrets_replaced += found
        conf = event.get("confidence")
        if isinstance(conf, dict):
            conf["redaction_profile"] = self.mode.value
            conf["redaction_applied"] = bool(found) or self.mode is RedactionMode.FULL or bool(conf.get("redaction_applied"))
        return event

    def _scrub(self, node: Any) -> tuple[Any, int]:
        if isinstance(node, str):
            return self.scrubber.scrub(node)
        return node, self._scrub_in_place(node) if isinstance(node, (dict, list)) else 0

    def _scrub_user_agent(self, event: dict[str, Any]) -> int:
        """A user agent holds no prose: any long random token in it goes."""
        http = (event.get("data") or {}).get("http") if isinstance(event.get("data"), dict) else None
        agent = http.get("user_agent") if isinstance(http, dict) else None
        if not isinstance(agent, str):
            return 0
        http["user_agent"], found = self.scrubber.scrub(agent, anywhere=True)
        return found

    def _scrub_in_place(self, node: dict | list) -> int:
        """Scrub every string inside a dict or list, in place; returns how many secrets went.
        (Called for every event: a string is only written back if it changed.)"""
        total = 0
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, str):
                scrubbed, found = self.scrubber.scrub(value)
                if found:
                    node[key] = scrubbed
                    total += found
            elif isinstance(value, (dict, list)):
                total += self._scrub_in_place(value)
        return total
