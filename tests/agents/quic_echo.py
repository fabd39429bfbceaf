"""A QUIC (aioquic) echo server or client for the QUIC refusal tests.

    python quic_echo.py serve --host HOST --port PORT --cert CERT --key KEY
    python quic_echo.py connect --host HOST --port PORT --ca CA [--timeout SECONDS]

The client opens a connection (ALPN h3), sends "ping" on a stream and waits for the
echo; it prints one JSON object: {"ok": bool, "seconds": time to the echo or to the
failure, "error": ...}. A refused attempt fails at once on a Version Negotiation
packet; otherwise only at the timeout (the handshake's idle timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    parser = argparse.ArgumentParser(description="A QUIC echo server or client (aioquic).")
    modes = parser.add_subparsers(dest="mode", required=True)
    server, client = modes.add_parser("serve"), modes.add_parser("connect")
    for mode in (server, client):
        mode.add_argument("--host", required=True)
        mode.add_argument("--port", type=int, required=True)
    server.add_argument("--cert", required=True)
    server.add_argument("--key", required=True)
    client.add_argument("--ca", required=True, help="the CA that signed the server's certificate")
    client.add_argument("--timeout", type=float, default=5.0, help="the handshake's idle timeout, in seconds")
    options = parser.parse_args()
    if options.mode == "serve":
        asyncio.run(run_server(options.host, options.port, options.cert, options.key))
    else:
        print(json.dumps(asyncio.run(run_client(options.host, options.port, options.ca, options.timeout))))


if __name__ == "__main__":
    main()
