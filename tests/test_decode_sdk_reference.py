"""The official openai / anthropic SDKs parse the same response bytes; what they assemble
must equal what the sans-IO decoder assembled (text, tool calls, finish reason, usage)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import Case, load_cases, pair, run_case

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")

CASES = [c for c in load_cases() if c.sdk]


def transport(case: Case):
    def handler(request):
        assert json.loads(request.content) is not None
        return httpx2.Response(case.status, headers={"content-type": case.content_type}, content=case.body)

    return httpx2.MockTransport(handler)


def sdk_result(case: Case) -> dict:
    req = dict(case.request)
    req.pop("stream", None)
    if case.sdk.startswith("openai"):
        client = openai.OpenAI(api_key="sk-test", base_url=f"https://{case.host}/v1",
                               http_client=openai.DefaultHttpxClient(transport=transport(case)))
        if case.sdk == "openai.responses":
            with client.responses.stream(**req) as s:
                for _ in s:
                    pass
                r = s.get_final_response()
            calls = [{"id": o.call_id, "name": o.name, "arguments": o.arguments} for o in r.output if o.type == "function_call"]
            u = r.usage
            usage = {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total_tokens,
                     "cached_tokens": u.input_tokens_details.cached_tokens,
                     "reasoning_tokens": u.output_tokens_details.reasoning_tokens}
            return {"text": r.output_text, "tool_calls": calls, "usage": usage}
        req.pop("stream_options", None)
        if case.sdk == "openai.chat.json":
            c = client.chat.completions.create(**req)
        else:
            with client.chat.completions.stream(**req, stream_options={"include_usage": True}) as s:
                for _ in s:
                    pass
                c = s.get_final_completion()
        msg = c.choices[0].message
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in msg.tool_calls or []]
        usage = {} if c.usage is None else {"prompt_tokens": c.usage.prompt_tokens,
                                            "completion_tokens": c.usage.completion_tokens, "total_tokens": c.usage.total_tokens}
        if c.usage is not None and c.usage.prompt_tokens_details is not None:
            usage["cached_tokens"] = c.usage.prompt_tokens_details.cached_tokens
        if c.usage is not None and c.usage.completion_tokens_details is not None:
            usage["reasoning_tokens"] = c.usage.completion_tokens_details.reasoning_tokens
        return {"text": msg.content or "", "tool_calls": calls, "usage": usage, "finish": c.choices[0].finish_reason}
    client = anthropic.Anthropic(api_key="sk-ant-test", base_url=f"https://{case.host}",
                                 http_client=anthropic.DefaultHttpxClient(transport=transport(case)))
    if case.sdk == "anthropic.json":
        m = client.messages.create(**req)
    else:
        with client.messages.stream(**req) as s:
            for _ in s:
                pass
            m = s.get_final_message()
    text = "".join(b.text for b in m.content if b.type == "text")
    thinking = "".join(b.thinking for b in m.content if b.type == "thinking")
    calls = [{"id": b.id, "name": b.name, "input": b.input} for b in m.content if b.type == "tool_use"]
    u = m.usage
    # Anthropic's input_tokens excludes cache reads and writes; OISP's prompt_tokens includes them.
    usage = {"prompt_tokens": u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0),
             "completion_tokens": u.output_tokens}
    if u.cache_read_input_tokens is not None:
        usage["cached_tokens"] = u.cache_read_input_tokens
    if u.cache_creation_input_tokens is not None:
        usage["cache_write_tokens"] = u.cache_creation_input_tokens
    if u.cache_creation is not None:
        usage["cache_write_5m_tokens"] = u.cache_creation.ephemeral_5m_input_tokens
        usage["cache_write_1h_tokens"] = u.cache_creation.ephemeral_1h_input_tokens
    return {"text": text, "thinking": thinking, "tool_calls": calls, "usage": usage, "finish": m.stop_reason}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decoder_matches_sdk(case: Case) -> None:
    ref = sdk_result(case)
    _, resp = pair(run_case(case)[0])
    ours_text = resp["choices"][0]["message"]["content"] if resp.get("choices") else ""
    assert ours_text == ref["text"]
    usage = resp.get("usage", {})
    for k, v in ref["usage"].items():
        assert usage.get(k) == v, k
    ours_calls = resp.get("tool_calls", [])
    if case.sdk.startswith("anthropic"):
        assert [{"id": c["id"], "name": c["name"], "input": json.loads(c["arguments"])} for c in ours_calls] == ref["tool_calls"]
        assert resp.get("thinking", "") == ref["thinking"]
    else:
        assert [{k: c[k] for k in ("id", "name", "arguments")} for c in ours_calls] == ref["tool_calls"]
    if "finish" in ref:
        from oisp.events.builder import finish_reason

        assert resp.get("finish_reason") == finish_reason(ref["finish"])
