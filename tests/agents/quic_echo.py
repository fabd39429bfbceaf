"""A QUIC (aioquic) echo server or client for the QUIC refusal tests.

    python quic_echo.py serve HOST PORT CERT KEY
    python quic_echo.py connect HOST PORT CA [TIMEOUT]

The client opens a connection (ALPN h3), sends "ping" on a stream and waits for the
echo; it prints one JSON object: {"ok": bool, "seconds": time to the echo or to the
failure, "error": ...}. A refused attempt fails at once on a Version Negotiation
packet; otherwise only at TIMEOUT (the handshake's idle timeout).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived


class Echo(QuicConnectionProtocol):
    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data, end_stream=event.end_stream)
            self.transmit()


async def run_server(host: str, port: int, cert: str, key: str) -> None:
    configuration = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    configuration.load_cert_chain(cert, key)
    await serve(host, port, configuration=configuration, create_protocol=Echo)
    await asyncio.Future()


async def run_client(host: str, port: int, ca: str, timeout: float) -> dict:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["h3"], idle_timeout=timeout,
                                      server_name="api.openai.com")
    configuration.load_verify_locations(ca)
    started = time.monotonic()
    try:
        async with connect(host, port, configuration=configuration, wait_connected=True) as client:
            reader, writer = await client.create_stream()
            writer.write(b"ping")
            writer.write_eof()
            echo = await asyncio.wait_for(reader.read(), timeout)
            return {"ok": echo == b"ping", "seconds": time.monotonic() - started, "error": None}
    except Exception as e:  # refused, timed out: how long it took is the measurement
        return {"ok": False, "seconds": time.monotonic() - started, "error": f"{type(e).__name__}: {e}"}


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        asyncio.run(run_server(host, port, sys.argv[4], sys.argv[5]))
    else:
        timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 5.0
        print(json.dumps(asyncio.run(run_client(host, port, sys.argv[4], timeout))))


if __name__ == "__main__":
    main()
