"""Provider wire formats, keyed by the spec's ``api`` names.

``FORMATS[api]`` gives the request parser (JSON body → AIRequestInfo) and the
response assembler class for that format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from oisp.decode.providers import anthropic, bedrock, cohere, gemini, generic, ollama, openai
from oisp.decode.providers.base import AIRequestInfo, AIResponseInfo, Choice, Message, ResponseAssembler, ToolCall


@dataclass(frozen=True)
class WireFormat:
    parse_request: Callable[[Mapping[str, Any]], AIRequestInfo]
    assembler: type[ResponseAssembler]


FORMATS: dict[str, WireFormat] = {
    "openai.chat": WireFormat(openai.parse_chat_request, openai.ChatAssembler),
    "openai.completions": WireFormat(openai.parse_completions_request, openai.ChatAssembler),
    "openai.embeddings": WireFormat(openai.parse_embeddings_request, openai.EmbeddingsAssembler),
    "openai.responses": WireFormat(openai.parse_responses_request, openai.ResponsesAssembler),
    "anthropic.messages": WireFormat(anthropic.parse_request, anthropic.MessagesAssembler),
    "gemini.generate": WireFormat(gemini.parse_request, gemini.GenerateAssembler),
    "ollama.chat": WireFormat(ollama.parse_chat_request, ollama.NDJSONAssembler),
    "ollama.generate": WireFormat(ollama.parse_generate_request, ollama.NDJSONAssembler),
    "cohere.chat": WireFormat(cohere.parse_request, cohere.ChatAssembler),
    "bedrock.converse": WireFormat(bedrock.parse_request, bedrock.ConverseAssembler),
    "generic": WireFormat(generic.parse_request, generic.GenericAssembler),
}

__all__ = ["FORMATS", "WireFormat", "AIRequestInfo", "AIResponseInfo", "Choice", "Message", "ResponseAssembler", "ToolCall"]
