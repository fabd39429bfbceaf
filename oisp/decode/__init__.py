"""Sans-IO decoding of AI traffic: bytes in, records out. No sockets, no threads, no clock.

The interface every driver uses — the TLS proxy, ``oisp decode file.pcapng``
and the tests — is one object per TCP connection::

    ctx = FlowContext(client=("10.0.0.2", 51234), server=("1.2.3.4", 443), start_ts=t0,
                      pid=4242, process_name="python", sni="api.openai.com", alpn="h2",
                      tls_version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256")
    dec = FlowDecoder(ctx)                       # spec=None → the configured AI endpoint spec
    records = dec.feed(Direction.REQUEST, data, ts)   # client → server plaintext
    records = dec.feed(Direction.RESPONSE, data, ts)  # server → client plaintext
    records = dec.close(ts)                           # the connection ended
    dec.stats.decode_errors                           # malformed input: counted, never raised

Each call returns the records it completed: :class:`RequestComplete`,
:class:`StreamDelta` (one per client-visible stream piece), and
:class:`ResponseComplete`, each carrying the :class:`Exchange` with the parsed
``ai_request`` / ``ai_response``. Feeding the same bytes cut at any positions
(with the same timestamps) yields the same records.

OISP events are one floor up: ``oisp.events.FlowRecorder`` has the same
``feed``/``close`` shape and returns redacted, attributed OISP events; that is
what the proxy calls.
"""

from oisp.decode.context import Direction, FlowContext
from oisp.decode.flow import DecodeStats, FlowDecoder
from oisp.decode.records import DecodeRecord, Exchange, RequestComplete, ResponseComplete, StreamDelta

__all__ = [
    "DecodeRecord",
    "DecodeStats",
    "Direction",
    "Exchange",
    "FlowContext",
    "FlowDecoder",
    "RequestComplete",
    "ResponseComplete",
    "StreamDelta",
]
