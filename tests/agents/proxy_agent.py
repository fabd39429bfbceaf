"""Run the transparent proxy in a test namespace, without the redirector: every
accepted connection is treated as going to UPSTREAM (the fake provider).

usage: proxy_agent.py --data-dir DIR --port PORT --upstream-host HOST --upstream-port PORT
                      --upstream-ca PEM --events-path JSONL
Prints "ready PORT" once listening; SIGTERM stops it and prints its stats as JSON.
"""

import argparse
import asyncio
import json
import os
import signal

from oisp.proxy.ca import CertificateAuthority
from oisp.proxy.certs import LeafIssuer
from oisp.proxy.server import Destination, TransparentProxy
from tests.fixed_flows import FixedFlows


async def main(data_dir, port, upstream_host, upstream_port, upstream_ca, events_path):
    os.environ["XDG_DATA_HOME"] = data_dir
    issuer = LeafIssuer(CertificateAuthority.load_or_create())
    out = open(events_path, "a")

    def write(events):
        for event in events:
            out.write(json.dumps(event) + "\n")
        out.flush()

    proxy = TransparentProxy(
        flows=FixedFlows(lambda addr, port_: Destination(client=(addr, port_), server=(upstream_host, upstream_port),
                                                         pid=os.getpid(), process_name="test-client")),
        issuer=issuer, upstream_cafile=upstream_ca, on_events=write)
    bound = await proxy.start(port)
    print("ready", bound, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await proxy.stop()
    print(json.dumps(proxy.stats), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The transparent proxy before the fake provider, no redirector.")
    parser.add_argument("--data-dir", required=True, help="XDG_DATA_HOME: where the CA is made")
    parser.add_argument("--port", type=int, required=True, help="the proxy's port")
    parser.add_argument("--upstream-host", required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--upstream-ca", required=True, help="the CA that signed the upstream's certificate")
    parser.add_argument("--events-path", required=True, help="the JSONL file events are appended to")
    asyncio.run(main(**vars(parser.parse_args())))
