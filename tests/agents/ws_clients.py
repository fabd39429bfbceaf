"""Real WebSocket clients for interception tests; each prints one JSON result: what it assembled.

usage: ws_clients.py CLIENT WSS_BASE   (CLIENT: openai_responses | plain)
They trust whatever SSL_CERT_FILE names, as in real use.
"""

import json
import sys

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


def plain(base):
    from websockets.sync.client import connect

    with connect(base + "/echo", proxy=None) as ws:
        ws.send("ping me")
        return {"echo": ws.recv()}


if __name__ == "__main__":
    name, base = sys.argv[1], sys.argv[2]
    print(json.dumps({"openai_responses": openai_responses, "plain": plain}[name](base)))
