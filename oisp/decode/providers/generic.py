"""Any other AI endpoint: keep the model and whatever usage an OpenAI-like body reports."""

from __future__ import annotations

from typing import Any, Mapping

from oisp.decode.providers.base import AIRequestInfo, ResponseAssembler, set_usage


def parse_request(body: Mapping[str, Any]) -> AIRequestInfo:
    return AIRequestInfo(model=body.get("model") if isinstance(body.get("model"), str) else None,
                         streaming=body.get("stream") is True)


class GenericAssembler(ResponseAssembler):
    def on_json(self, obj: Any, ts: float, event: str | None = None) -> list[dict[str, Any]]:
        self.info.chunk_count += 1
        self._token(ts)
        self.on_body(obj, ts)
        return []

    def on_body(self, obj: Any, ts: float) -> None:
        if isinstance(obj, Mapping):
            u = obj.get("usage")
            if isinstance(u, Mapping):
                set_usage(self.info.usage, prompt_tokens=u.get("prompt_tokens", u.get("input_tokens")),
                          completion_tokens=u.get("completion_tokens", u.get("output_tokens")),
                          total_tokens=u.get("total_tokens"))
            if obj.get("error") is not None:
                self._error(obj["error"])
