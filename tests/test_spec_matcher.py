"""The AI endpoint spec: coverage, host/pattern/port matching, paths, body heuristics, overrides."""

from __future__ import annotations

import json

import pytest

from oisp.spec import load_spec

SPEC = load_spec()

REQUIRED = {
    "openai", "azure_openai", "anthropic", "google_gemini", "google_vertex", "aws_bedrock", "mistral", "cohere", "groq",
    "together", "fireworks", "deepseek", "perplexity", "xai", "openrouter", "huggingface", "ollama", "lmstudio", "vllm",
}


def test_covers_required_providers() -> None:
    assert REQUIRED <= {p.id for p in SPEC.providers}


@pytest.mark.parametrize(
    "host,path,provider,api,request_type",
    [
        ("api.openai.com", "/v1/chat/completions", "openai", "openai.chat", "chat"),
        ("api.openai.com", "/v1/responses", "openai", "openai.responses", "chat"),
        ("api.openai.com", "/v1/embeddings", "openai", "openai.embeddings", "embedding"),
        ("contoso.openai.azure.com", "/openai/deployments/gpt4/chat/completions?api-version=2024-10-21", "azure_openai",
         "openai.chat", "chat"),
        ("api.anthropic.com", "/v1/messages", "anthropic", "anthropic.messages", "chat"),
        ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", "google_gemini",
         "gemini.generate", "chat"),
        ("us-central1-aiplatform.googleapis.com",
         "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-1.5-pro:generateContent", "google_vertex",
         "gemini.generate", "chat"),
        ("us-east5-aiplatform.googleapis.com",
         "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-3-5-sonnet:streamRawPredict", "google_vertex",
         "anthropic.messages", "chat"),
        ("bedrock-runtime.eu-west-1.amazonaws.com", "/model/anthropic.claude-3-haiku-20240307-v1:0/converse", "aws_bedrock",
         "bedrock.converse", "chat"),
        ("api.mistral.ai", "/v1/chat/completions", "mistral", "openai.chat", "chat"),
        ("api.cohere.com", "/v2/chat", "cohere", "cohere.chat", "chat"),
        ("api.groq.com", "/openai/v1/chat/completions", "groq", "openai.chat", "chat"),
        ("api.together.xyz", "/v1/chat/completions", "together", "openai.chat", "chat"),
        ("api.fireworks.ai", "/inference/v1/chat/completions", "fireworks", "openai.chat", "chat"),
        ("api.deepseek.com", "/chat/completions", "deepseek", "openai.chat", "chat"),
        ("api.perplexity.ai", "/chat/completions", "perplexity", "openai.chat", "chat"),
        ("api.x.ai", "/v1/chat/completions", "xai", "openai.chat", "chat"),
        ("openrouter.ai", "/api/v1/chat/completions", "openrouter", "openai.chat", "chat"),
        ("router.huggingface.co", "/v1/chat/completions", "huggingface", "openai.chat", "chat"),
        ("localhost:11434", "/api/chat", "ollama", "ollama.chat", "chat"),
        ("[::1]:11434", "/api/generate", "ollama", "ollama.generate", "completion"),
        ("127.0.0.1:1234", "/v1/chat/completions", "lmstudio", "openai.chat", "chat"),
        ("localhost:8000", "/v1/completions", "vllm", "openai.completions", "completion"),
    ],
)
def test_known_endpoints(host: str, path: str, provider: str, api: str, request_type: str) -> None:
    m = SPEC.match(host, path)
    assert m is not None
    assert (m.provider_id, m.api, m.request_type, m.detection) == (provider, api, request_type, "known_endpoint")


def test_path_params_give_model() -> None:
    m = SPEC.match("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:generateContent")
    assert m.params["model"] == "gemini-2.0-flash"
    assert not m.streaming_path


def test_port_from_flow_when_host_has_none() -> None:
    assert SPEC.match("10.1.2.3", "/api/chat", port=11434).provider_id == "ollama"


def test_non_ai_paths_and_hosts() -> None:
    assert SPEC.match("api.openai.com", "/v1/models") is None
    assert SPEC.match("example.com", "/index.html") is None
    assert SPEC.match("example.com", "/v1/chat/completions", body={"foo": 1}) is None


def test_body_heuristics_on_unknown_host() -> None:
    m = SPEC.match("llm.internal", "/proxy/v1/chat/completions", body={"model": "x", "messages": []})
    assert m.provider is None
    assert m.api == "openai.chat"
    assert m.detection == "payload_inspection"
    m = SPEC.match("llm.internal", "/run", body={"model": "x", "prompt": "hi"})
    assert m.api == "generic"


def test_redirector_api() -> None:
    hosts = SPEC.hosts()
    assert "api.openai.com" in hosts
    assert "api.anthropic.com" in hosts
    assert hosts == sorted(hosts)
    assert SPEC.matches_host("API.OpenAI.com.")
    assert SPEC.matches_host("res.openai.azure.com")
    assert SPEC.matches_host("bedrock-runtime.us-west-2.amazonaws.com")
    assert not SPEC.matches_host("openai.com.evil.example")
    assert not SPEC.matches_host("localhost")
    assert "*.openai.azure.com" in SPEC.host_patterns()


def test_key_prefixes_are_short_and_public() -> None:
    assert SPEC.key_prefix("sk-proj-" + "x" * 40) == "sk-proj-"
    assert SPEC.key_prefix("sk-ant-api03-" + "x" * 40) == "sk-ant-"
    assert SPEC.key_prefix("sk-svcacct-" + "x" * 40) == "sk-svcac"
    assert len(SPEC.key_prefix("zzzzzzzzzzzzzzzzzzzz")) <= 3


def test_override_by_env_and_by_path(tmp_path, monkeypatch) -> None:
    spec_file = tmp_path / "spec.json"
    endpoint = {"path": "/chat", "request_type": "chat", "api": "openai.chat"}
    spec_file.write_text(json.dumps({"providers": [{"id": "corp", "hosts": ["llm.corp"], "endpoints": [endpoint]}]}))
    assert load_spec(spec_file).match("llm.corp", "/chat").provider_id == "corp"
    monkeypatch.setenv("OISP_SPEC", str(spec_file))
    spec = load_spec()
    assert spec.hosts() == ["llm.corp"]
    assert spec.match("api.openai.com", "/v1/chat/completions") is None
