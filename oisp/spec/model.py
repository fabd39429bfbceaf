"""Spec objects and the matcher (host → provider, path → endpoint, body → heuristics)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
# A body is an AI request when it names a model and carries one of these (OpenAI, Anthropic,
# Ollama, Gemini and the Responses API put the conversation under different keys).
_CONVERSATION_KEYS = ("messages", "prompt", "input", "contents")


@dataclass(frozen=True)
class Endpoint:
    path: str
    request_type: str
    api: str
    streaming: bool = False
    regex: re.Pattern[str] = field(compare=False, repr=False, default=re.compile(""))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Endpoint":
        return cls(d["path"], d["request_type"], d["api"], bool(d.get("streaming", False)), _compile_path(d["path"]))


@dataclass(frozen=True)
class Provider:
    id: str
    oisp_name: str
    hosts: tuple[str, ...]
    host_patterns: tuple[str, ...]
    ports: tuple[int, ...]
    key_prefixes: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Provider":
        return cls(
            id=d["id"],
            oisp_name=d.get("oisp_name", "other"),
            hosts=tuple(h.lower() for h in d.get("hosts", ())),
            host_patterns=tuple(p.lower() for p in d.get("host_patterns", ())),
            ports=tuple(int(p) for p in d.get("ports", ())),
            key_prefixes=tuple(d.get("key_prefixes", ())),
            endpoints=tuple(Endpoint.from_dict(e) for e in d.get("endpoints", ())),
        )


@dataclass(frozen=True)
class EndpointMatch:
    """What one HTTP request is: its provider (None when only the body gave it away)."""

    provider: Provider | None
    request_type: str
    api: str
    streaming_path: bool
    params: Mapping[str, str]
    detection: str  # OISP confidence.ai_detection_method: known_endpoint | payload_inspection

    @property
    def provider_id(self) -> str:
        return self.provider.id if self.provider else "unknown"

    @property
    def oisp_name(self) -> str:
        return self.provider.oisp_name if self.provider else "other"


def _compile_path(template: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>[^/]+?)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "/?$")


def _compile_host_pattern(pattern: str) -> re.Pattern[str]:
    # "*" stands for exactly one DNS label, or the part of one before a literal suffix.
    return re.compile("^" + re.escape(pattern).replace(r"\*", "[a-z0-9-]+") + "$")


def split_host_port(authority: str) -> tuple[str, int | None]:
    """'Host: [::1]:11434' → ('::1', 11434); 'api.openai.com.' → ('api.openai.com', None)."""
    a = authority.strip().lower()
    port: int | None = None
    if a.startswith("["):
        end = a.find("]")
        host, rest = a[1:end], a[end + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif a.count(":") == 1:
        host, _, p = a.partition(":")
        port = int(p) if p.isdigit() else None
    else:
        host = a
    return host.rstrip("."), port


class Spec:
    def __init__(self, providers: list[Provider], heuristic_paths: list[dict[str, str]], version: str = "1"):
        self.version = version
        self.providers = tuple(providers)
        self._by_host = {h: p for p in providers for h in p.hosts}
        self._patterns = [(_compile_host_pattern(pat), p) for p in providers for pat in p.host_patterns]
        self._by_port = {port: p for p in providers for port in p.ports}
        self._heuristics = tuple(heuristic_paths)
        self._key_prefixes = sorted({k for p in providers for k in p.key_prefixes}, key=len, reverse=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Spec":
        return cls(
            [Provider.from_dict(p) for p in d["providers"]],
            list(d.get("heuristic_paths", ())),
            str(d.get("spec_version", "1")),
        )

    # -- for the redirector ----------------------------------------------------------------
    def hosts(self) -> list[str]:
        """Every exact hostname in the spec, sorted: what a redirector resolves up front."""
        return sorted(self._by_host)

    def local_ports(self) -> list[int]:
        """The ports of local model servers (Ollama, LM Studio, vLLM, llama.cpp, …), which
        speak plain HTTP: what a redirector watches on loopback and the LAN."""
        return sorted(self._by_port)

    def provider(self, provider_id: str) -> Provider | None:
        return next((p for p in self.providers if p.id == provider_id), None)

    def with_port_providers(self, ports: Mapping[int, str]) -> "Spec":
        """This spec with requests on these ports named by these provider ids (`--plain
        9000=vllm`); a Host that names a provider still wins. KeyError for an unknown id."""
        chosen = {}
        for port, provider_id in ports.items():
            provider = self.provider(provider_id)
            if provider is None:
                raise KeyError(provider_id)
            chosen[int(port)] = provider
        spec = Spec(list(self.providers), list(self._heuristics), self.version)
        spec._by_port.update(chosen)
        return spec

    def host_patterns(self) -> list[str]:
        return sorted({pat for p in self.providers for pat in p.host_patterns})

    def matches_host(self, name: str) -> bool:
        """Is this SNI / Host an AI provider's (exact name or pattern; ports are not considered)?"""
        host, _ = split_host_port(name)
        return self._provider_by_name(host) is not None

    # -- for the decoder -------------------------------------------------------------------
    def provider_for(self, host: str | None, port: int | None = None) -> Provider | None:
        name, host_port = split_host_port(host) if host else ("", None)
        found = self._provider_by_name(name) if name else None
        return found or self._by_port.get(host_port or port or -1)

    def match(
        self, host: str | None, path: str, port: int | None = None, body: Mapping[str, Any] | None = None
    ) -> EndpointMatch | None:
        """Classify one request; None when it is not an AI request we know of."""
        path = path.split("?", 1)[0] or "/"
        provider = self.provider_for(host, port)
        if provider is not None:
            for ep in provider.endpoints:
                m = ep.regex.match(path)
                if m:
                    return EndpointMatch(provider, ep.request_type, ep.api, ep.streaming, m.groupdict(), "known_endpoint")
        if body is None or not isinstance(body.get("model"), str):
            return None
        if not any(k in body for k in _CONVERSATION_KEYS):
            return None
        for h in self._heuristics:
            if path.endswith(h["suffix"]):
                return EndpointMatch(provider, h["request_type"], h["api"], False, {}, "payload_inspection")
        return EndpointMatch(provider, "other", "generic", False, {}, "payload_inspection")

    def key_prefix(self, secret: str) -> str:
        """The public, non-secret start of an API key (at most 8 characters, OISP's limit)."""
        for prefix in self._key_prefixes:
            if secret.startswith(prefix):
                return prefix[:8]
        return secret[:3] if len(secret) >= 16 else ""

    def _provider_by_name(self, host: str) -> Provider | None:
        found = self._by_host.get(host)
        if found is None:
            for regex, provider in self._patterns:
                if regex.match(host):
                    return provider
        return found
