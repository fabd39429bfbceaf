"""The calls `oisp demo` makes, each as an unmodified program would: the openai and
anthropic SDKs when they are installed, the standard library's urllib otherwise.

    python -m oisp.demo.clients openai|openai_stream|anthropic|anthropic_stream

Prints one JSON object: the client, what it assembled (text, usage), and its pid.
The key is a made-up one, so the events show what redaction does to a real key.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

OPENAI_KEY = "sk-proj-demo0123456789abcdefghijklmnopqrstuvwxyzDEMO"
ANTHROPIC_KEY = "sk-ant-api03-demo0123456789abcdefghijklmnopqrstuvwxyz"
PROMPTS = {"openai": "Say hello from the demo.", "openai_stream": "Stream a few words, please.",
           "anthropic": "What is oisp?", "anthropic_stream": "Stream an answer, please."}
CALLS = list(PROMPTS)


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _post(url: str, headers: dict, body: dict) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.read()


def _sse_data(raw: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in raw.decode().splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def openai_call(stream: bool) -> dict:
    messages = [{"role": "user", "content": PROMPTS["openai_stream" if stream else "openai"]}]
    extra = {"stream_chunks": 8} if stream else {}
    if _installed("openai"):
        import openai

        client = openai.OpenAI(api_key=OPENAI_KEY, base_url="https://api.openai.com/v1", max_retries=0, timeout=20)
        if stream:
            chunks = client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                                    stream_options={"include_usage": True}, extra_body=extra)
            text, usage = "", None
            for chunk in chunks:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage.total_tokens
            return {"client": "openai SDK", "text": text, "total_tokens": usage}
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        return {"client": "openai SDK", "text": reply.choices[0].message.content,
                "total_tokens": reply.usage.total_tokens}
    raw = _post("https://api.openai.com/v1/chat/completions", {"authorization": f"Bearer {OPENAI_KEY}"},
                {"model": "gpt-4o-mini", "messages": messages, "stream": stream, **extra})
    if stream:
        events = _sse_data(raw)
        text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e.get("choices"))
        usage = next((e["usage"]["total_tokens"] for e in events if e.get("usage")), None)
        return {"client": "urllib", "text": text, "total_tokens": usage}
    reply = json.loads(raw)
    return {"client": "urllib", "text": reply["choices"][0]["message"]["content"],
            "total_tokens": reply["usage"]["total_tokens"]}


def anthropic_call(stream: bool) -> dict:
    messages = [{"role": "user", "content": PROMPTS["anthropic_stream" if stream else "anthropic"]}]
    extra = {"stream_chunks": 8} if stream else {}
    if _installed("anthropic"):
        import anthropic

        client = anthropic.Anthropic(api_key=ANTHROPIC_KEY, base_url="https://api.anthropic.com", max_retries=0,
                                     timeout=20)
        if stream:
            with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=messages,
                                        extra_body=extra) as events:
                text = "".join(events.text_stream)
                final = events.get_final_message()
            return {"client": "anthropic SDK", "text": text, "output_tokens": final.usage.output_tokens}
        reply = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=messages)
        return {"client": "anthropic SDK", "text": reply.content[0].text, "output_tokens": reply.usage.output_tokens}
    raw = _post("https://api.anthropic.com/v1/messages", {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"},
                {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": messages, "stream": stream, **extra})
    if stream:
        events = _sse_data(raw)
        text = "".join(e["delta"].get("text", "") for e in events if e.get("type") == "content_block_delta")
        usage = next((e["usage"]["output_tokens"] for e in events if e.get("type") == "message_delta"), None)
        return {"client": "urllib", "text": text, "output_tokens": usage}
    reply = json.loads(raw)
    return {"client": "urllib", "text": reply["content"][0]["text"], "output_tokens": reply["usage"]["output_tokens"]}


def run(name: str) -> dict:
    calls = {"openai": lambda: openai_call(False), "openai_stream": lambda: openai_call(True),
             "anthropic": lambda: anthropic_call(False), "anthropic_stream": lambda: anthropic_call(True)}
    if name not in calls:
        raise SystemExit(f"unknown call {name!r}; one of: {', '.join(calls)}")
    return {"call": name, "pid": os.getpid(), **calls[name]()}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])), flush=True)
