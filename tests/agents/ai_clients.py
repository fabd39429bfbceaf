"""Real AI clients for interception tests; each prints one JSON result.

usage: ai_clients.py CLIENT BASE_URL [N]
They trust whatever SSL_CERT_FILE names, as in real use (DESIGN.md's table).
"""

import asyncio
import json
import sys

KEY = "sk-proj-TESTKEY0123456789abcdefghijklmnopqrstuv"
PROMPT = "hello there"


def openai_client(base, asynchronous=False):
    import openai

    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(api_key=KEY, base_url=base + "/v1", max_retries=0, timeout=20)


def run(name, base, n):
    messages = [{"role": "user", "content": PROMPT}]
    if name == "openai_sync":
        reply = openai_client(base).chat.completions.create(model="gpt-4o-mini", messages=messages)
        return {"text": reply.choices[0].message.content, "usage": reply.usage.total_tokens}
    if name == "openai_stream":
        stream = openai_client(base).chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                                             extra_body={"stream_chunks": n})
        return {"text": "".join(c.choices[0].delta.content or "" for c in stream if c.choices)}
    if name == "openai_async_stream":
        async def go():
            client = openai_client(base, asynchronous=True)
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                                          extra_body={"stream_chunks": n})
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return {"text": asyncio.run(go())}
    if name in ("anthropic", "anthropic_stream"):
        import anthropic

        client = anthropic.Anthropic(api_key="sk-ant-api03-TESTKEY0123456789abcdef", base_url=base, max_retries=0)
        if name == "anthropic":
            reply = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=messages)
            return {"text": reply.content[0].text, "usage": reply.usage.output_tokens}
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=messages,
                                    extra_body={"stream_chunks": n}) as stream:
            return {"text": "".join(stream.text_stream)}
    if name == "httpx_h2":
        import httpx

        with httpx.Client(http2=True, timeout=20) as client:
            r = client.post(base + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                            json={"model": "gpt-4o-mini", "messages": messages})
            return {"text": r.json()["choices"][0]["message"]["content"], "http_version": r.http_version}
    if name == "concurrent":
        import httpx

        async def one(client, i):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"n{i}"}], "stream": True,
                    "stream_chunks": 50}
            raw = b""
            async with client.stream("POST", base + "/v1/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {KEY}"}) as r:
                async for chunk in r.aiter_bytes():
                    raw += chunk
            return raw

        async def go():
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(*(one(client, i) for i in range(n)))
        bodies = asyncio.run(go())
        return {"bodies": [b.decode() for b in bodies]}
    raise SystemExit(f"unknown client {name}")


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)))
