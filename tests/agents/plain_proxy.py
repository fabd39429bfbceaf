"""Run the transparent proxy in front of one plain TCP upstream, under a low open-file
limit: every accepted connection is treated as going to UPSTREAM and, not being TLS, is
relayed untouched.

usage: plain_proxy.py --upstream-host HOST --upstream-port PORT --nofile N --give-up SECONDS
Prints "ready PORT" once listening (port chosen by the kernel), then, for each line read
on stdin, one JSON line: its stats, `serving`, and what on_failure was told; exits at EOF
on stdin.
"""

import argparse
import asyncio
import json
import resource
import sys

from oisp.proxy.server import Destination, TransparentProxy
from tests.fixed_flows import FixedFlows


async def main(upstream_host, upstream_port, nofile, give_up):
    told = []
    proxy = TransparentProxy(
        flows=FixedFlows(lambda addr, port: Destination(client=(addr, port), server=(upstream_host, upstream_port))),
        issuer=None, accept_give_up=give_up, on_failure=told.append)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    print("ready", await proxy.start(0, "127.0.0.1"), flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(json.dumps({**proxy.stats, "serving": proxy.serving, "told": told}), flush=True)
    await proxy.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The transparent proxy before one plain TCP upstream.")
    parser.add_argument("--upstream-host", required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--nofile", type=int, required=True, help="the open-file limit")
    parser.add_argument("--give-up", type=float, required=True, help="the proxy's accept_give_up, in seconds")
    options = parser.parse_args()
    asyncio.run(main(options.upstream_host, options.upstream_port, options.nofile, options.give_up))
