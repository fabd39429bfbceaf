"""mitmdump addon for the benchmark: stream Server-Sent Events through as they arrive.

mitmproxy buffers whole response bodies by default (`stream_large_bodies` only acts on
bodies with a known length, and an SSE stream is chunked), which would make its time
to first chunk the time to the last one. Real SSE use of mitmproxy needs this.
"""


def responseheaders(flow):
    if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
        flow.response.stream = True
