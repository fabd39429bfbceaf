"""Real clients of a local model server, run in a test's namespace; prints one JSON
object: this process's pid and what each call assembled (the reference the events
are compared with).

    python local_clients.py ollama|openai|h2c|stream|burst --host HOST --port PORT [--count N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os

KEY = "sk-local-0123456789abcdefghijklmnop"


def base(host: str, port: str) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def ollama_calls(url: str, n: int) -> list[dict]:
    import ollama

    client = ollama.Client(host=url, timeout=20)  # one client: one kept-alive connection
    out = []
    for i in range(max(1, n)):
        parts = list(client.chat(model="llama3.2", messages=[{"role": "user", "content": f"chat {i}"}], stream=True))
        out.append({"kind": "chat_stream", "model": "llama3.2", "text": "".join(p.message.content for p in parts),
                    "prompt_tokens": parts[-1].prompt_eval_count, "completion_tokens": parts[-1].eval_count})
        r = client.chat(model="llama3.2", messages=[{"role": "user", "content": f"whole {i}"}], stream=False)
        out.append({"kind": "chat", "model": "llama3.2", "text": r.message.content,
                    "prompt_tokens": r.prompt_eval_count, "completion_tokens": r.eval_count})
        parts = list(client.generate(model="qwen3:0.6b", prompt=f"generate {i}", stream=True))
        out.append({"kind": "generate_stream", "model": "qwen3:0.6b", "text": "".join(p.response for p in parts),
                    "prompt_tokens": parts[-1].prompt_eval_count, "completion_tokens": parts[-1].eval_count})
        r = client.generate(model="qwen3:0.6b", prompt=f"generate whole {i}", stream=False)
        out.append({"kind": "generate", "model": "qwen3:0.6b", "text": r.response,
                    "prompt_tokens": r.prompt_eval_count, "completion_tokens": r.eval_count})
    return out


def openai_calls(url: str, n: int) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=20)
    out = []
    for i in range(max(1, n)):
        stream = client.chat.completions.create(model="local-model", messages=[{"role": "user", "content": f"s {i}"}],
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        out.append({"kind": "chat_stream", "model": "local-model",
                    "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                    "prompt_tokens": chunks[-1].usage.prompt_tokens, "completion_tokens": chunks[-1].usage.completion_tokens})
        r = client.chat.completions.create(model="local-model", messages=[{"role": "user", "content": f"w {i}"}])
        out.append({"kind": "chat", "model": "local-model", "text": r.choices[0].message.content,
                    "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens})
        r = client.completions.create(model="local-model", prompt=f"c {i}")
        out.append({"kind": "completion", "model": "local-model", "text": r.choices[0].text,
                    "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens})
        r = client.embeddings.create(model="embed-model", input=[f"e {i}", "two"])
        out.append({"kind": "embedding", "model": "embed-model", "text": None, "count": len(r.data),
                    "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": None})
    return out


def h2c_calls(url: str, n: int) -> list[dict]:
    import httpx

    out = []
    with httpx.Client(http1=False, http2=True, timeout=20) as client:  # h2c by prior knowledge
        for i in range(max(1, n)):
            r = client.post(url + "/v1/chat/completions", json={
                "model": "local-model", "messages": [{"role": "user", "content": f"h2 {i}"}]})
            assert r.http_version == "HTTP/2", r.http_version
            body = r.json()
            out.append({"kind": "chat", "model": "local-model", "text": body["choices"][0]["message"]["content"],
                        "prompt_tokens": body["usage"]["prompt_tokens"],
                        "completion_tokens": body["usage"]["completion_tokens"]})
    return out


def stream_call(url: str, n: int) -> list[dict]:
    """One long stream (n pieces, 10 ms apart): for killing the sensor under it."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=20)
    stream = client.chat.completions.create(model="local-model", messages=[{"role": "user", "content": "long"}],
                                            stream=True, extra_body={"stream_chunks": n, "chunk_delay": 0.01})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    return [{"kind": "chat_stream", "model": "local-model", "text": text}]


def burst_calls(url: str, n: int) -> list[dict]:
    """n clients at once, each streaming one reply on its own connection."""
    import openai

    def one(i: int) -> dict:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        stream = client.chat.completions.create(model="local-model", messages=[{"role": "user", "content": f"b {i}"}],
                                                stream=True, extra_body={"stream_chunks": 20})
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        client.close()
        return {"kind": "chat_stream", "model": "local-model", "text": text}

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


SCENARIOS = {"ollama": ollama_calls, "openai": openai_calls, "h2c": h2c_calls, "stream": stream_call,
             "burst": burst_calls}


def main() -> None:
    parser = argparse.ArgumentParser(description="Real clients of a local model server; prints one JSON object.")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1, help="calls (or, for stream, chunks) to make")
    options = parser.parse_args()
    results = SCENARIOS[options.scenario](base(options.host, options.port), options.count)
    print(json.dumps({"pid": os.getpid(), "results": results}))


if __name__ == "__main__":
    main()
