"""Real WebSocket clients for interception tests; each prints one JSON result: what it assembled.

usage: ws_clients.py CLIENT --base WSS_BASE   (CLIENT: openai_responses | openai_realtime | gemini_live | plain)
They trust whatever SSL_CERT_FILE names, as in real use.
"""

import argparse
import json

KEY = "sk-proj-TESTKEYws0123456789abcdefghijklmnopqrstuv"
REQUESTS = [
    {"model": "gpt-test", "input": [], "generate": False},
    {"model": "gpt-test", "input": [{"role": "user", "content": "hello over a socket"}], "metadata": {"stream_chunks": "6"}},
    {"model": "gpt-test", "input": [{"role": "user", "content": "weather in Paris?"}],
     "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]},
]


def openai_responses(base):
    import openai

    client = openai.OpenAI(api_key=KEY, base_url=base.replace("wss://", "https://") + "/v1", max_retries=0)
    out = []
    # compression on, as agents that speak this mode offer it (the SDK leaves it off by default)
    with client.responses.connect(websocket_connection_options={"compression": "deflate", "proxy": None}) as conn:
        for req in REQUESTS:
            conn.send({"type": "response.create", **req})
            got = {"text": "", "calls": []}
            for event in conn:
                if event.type == "response.output_text.delta":
                    got["text"] += event.delta
                elif event.type == "response.completed":
                    r = event.response
                    got["id"] = r.id
                    got["calls"] = [[o.call_id, o.name, o.arguments] for o in r.output if o.type == "function_call"]
                    got["usage"] = [r.usage.input_tokens, r.usage.output_tokens]
                    break
            out.append(got)
    return out


def openai_realtime(base):
    import openai

    client = openai.OpenAI(api_key=KEY, base_url=base.replace("wss://", "https://") + "/v1", max_retries=0)
    out = []
    with client.realtime.connect(model="gpt-realtime",
                                 websocket_connection_options={"compression": "deflate", "proxy": None}) as conn:
        conn.session.update(session={"type": "realtime", "instructions": "answer briefly", "output_modalities": ["text"]})
        for text in ("first question", "second question"):
            conn.conversation.item.create(item={"type": "message", "role": "user",
                                                "content": [{"type": "input_text", "text": text}]})
            conn.response.create()
            got = {"text": ""}
            for event in conn:
                if event.type == "response.output_text.delta":
                    got["text"] += event.delta
                elif event.type == "response.done":
                    usage = event.response.usage
                    got["id"], got["usage"] = event.response.id, [usage.input_tokens, usage.output_tokens]
                    break
            out.append(got)
    return out


def gemini_live(base):
    import asyncio

    from google import genai
    from google.genai import types

    client = genai.Client(api_key="AIzaTESTKEYlive0123456789abcdefghijklmn",
                          http_options=types.HttpOptions(base_url=base.replace("wss://", "https://")))
    weather = types.FunctionDeclaration(name="get_weather", description="the weather",
                                        parameters={"type": "OBJECT", "properties": {"city": {"type": "STRING"}}})
    config = {"response_modalities": ["TEXT"], "system_instruction": "be brief",
              "tools": [types.Tool(function_declarations=[weather])]}

    async def turn(session):
        got = {"text": "", "calls": [], "usage": None}
        async for msg in session.receive():
            if msg.text:
                got["text"] += msg.text
            if msg.tool_call:
                got["calls"] += [[fc.id, fc.name, fc.args] for fc in msg.tool_call.function_calls]
            if msg.usage_metadata:
                got["usage"] = [msg.usage_metadata.prompt_token_count, msg.usage_metadata.response_token_count]
            if msg.tool_call:
                break
        return got

    async def go():
        out = []
        async with client.aio.live.connect(model="gemini-live-test", config=config) as session:
            await session.send_client_content(turns={"role": "user", "parts": [{"text": "hello live"}]}, turn_complete=True)
            out.append(await turn(session))
            await session.send_client_content(turns={"role": "user", "parts": [{"text": "weather in Paris?"}]},
                                              turn_complete=True)
            out.append(await turn(session))
            answer = types.FunctionResponse(id="fc_2", name="get_weather", response={"sky": "clear"})
            await session.send_tool_response(function_responses=[answer])
            out.append(await turn(session))
        return out

    return asyncio.run(go())


def plain(base):
    from websockets.sync.client import connect

    with connect(base + "/echo", proxy=None) as ws:
        ws.send("ping me")
        return {"echo": ws.recv()}


if __name__ == "__main__":
    CLIENTS = {"openai_responses": openai_responses, "openai_realtime": openai_realtime, "gemini_live": gemini_live,
               "plain": plain}
    parser = argparse.ArgumentParser(description="A real WebSocket client; prints what it assembled as JSON.")
    parser.add_argument("client", choices=CLIENTS)
    parser.add_argument("--base", required=True, help="the wss:// base URL")
    options = parser.parse_args()
    print(json.dumps(CLIENTS[options.client](options.base)))
