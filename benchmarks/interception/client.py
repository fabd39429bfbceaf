"""The benchmark client: plain httpx (HTTP/1.1), the same for every path.

    python client.py WORKLOAD --base https://api.openai.com --ca FILE [--proxy URL] [--seconds S] [--n N]

Workloads (one JSON line on stdout):
  seq       sequential small JSON POSTs on one kept-alive connection for S seconds
  newconn   sequential small JSON POSTs, a new connection (TCP + TLS) for each
  conc      16 concurrent tasks (AsyncClient, one pooled connection each) for S seconds
  ttfc      N streamed requests (SSE, 500 chunks): time from sending the request to
            the first `data:` event; each stream is read to its end on a kept-alive
            connection so the next request does not pay for a new handshake

Every reply is checked (status 200, the echoed text), so a broken path fails loudly.
Latencies are per request, from before `post()` to the body fully read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time

import httpx

KEY = "sk-proj-BENCHKEY0123456789abcdefghijklmnopqrstuv"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
EXPECT = "echo: hello there"
WARMUP = 20
HEADERS = {"authorization": f"Bearer {KEY}"}


def context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    return ctx


def check(response: httpx.Response) -> None:
    if response.status_code != 200 or response.json()["choices"][0]["message"]["content"] != EXPECT:
        raise SystemExit(f"bad reply {response.status_code}: {response.text[:200]}")


def sequential(args, keepalive: bool) -> dict:
    limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
    url = args.base + "/v1/chat/completions"
    with httpx.Client(verify=context(args.ca), proxy=args.proxy, limits=limits, timeout=20) as client:
        for _ in range(WARMUP):
            check(client.post(url, json=BODY, headers=HEADERS))
        latencies = []
        cpu0 = time.process_time()
        start = time.perf_counter()
        deadline = start + args.seconds
        while time.perf_counter() < deadline and len(latencies) < args.max:
            t0 = time.perf_counter()
            response = client.post(url, json=BODY, headers=HEADERS)
            latencies.append(time.perf_counter() - t0)
            check(response)
        elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "elapsed": elapsed, "latencies": latencies,
            "client_cpu": time.process_time() - cpu0, "warmup": WARMUP}


def concurrent(args) -> dict:
    url = args.base + "/v1/chat/completions"

    async def go():
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(verify=context(args.ca), proxy=args.proxy, limits=limits, timeout=30) as client:
            await asyncio.gather(*(client.post(url, json=BODY, headers=HEADERS) for _ in range(args.concurrency * 2)))
            latencies: list[float] = []
            cpu0 = time.process_time()
            start = time.perf_counter()
            deadline = start + args.seconds

            async def worker():
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    response = await client.post(url, json=BODY, headers=HEADERS)
                    latencies.append(time.perf_counter() - t0)
                    check(response)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            return {"requests": len(latencies), "elapsed": time.perf_counter() - start, "latencies": latencies,
                    "client_cpu": time.process_time() - cpu0, "warmup": args.concurrency * 2}

    return asyncio.run(go())


def ttfc(args) -> dict:
    url = args.base + "/v1/chat/completions"
    body = {**BODY, "stream": True, "stream_chunks": 500}
    firsts, totals = [], []
    with httpx.Client(verify=context(args.ca), proxy=args.proxy, timeout=30) as client:
        check(client.post(url, json=BODY, headers=HEADERS))  # connection up, as for the others
        for _ in range(args.n):
            t0 = time.perf_counter()
            first = None
            received = b""
            with client.stream("POST", url, json=body, headers=HEADERS) as response:
                if response.status_code != 200:
                    raise SystemExit(f"bad stream reply {response.status_code}")
                for chunk in response.iter_raw():
                    if first is None:
                        received += chunk
                        if b"data:" in received:
                            first = time.perf_counter() - t0
                            received = b""
                    else:
                        received = received[-16:] + chunk
            if not received.rstrip().endswith(b"data: [DONE]"):
                raise SystemExit("stream did not end with [DONE]")
            firsts.append(first)
            totals.append(time.perf_counter() - t0)
    return {"requests": len(firsts), "ttfc": firsts, "totals": totals, "warmup": 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["seq", "newconn", "conc", "ttfc"])
    parser.add_argument("--base", default="https://api.openai.com")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--proxy")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max", type=int, default=100000)
    parser.add_argument("--n", type=int, default=17)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if args.workload == "seq":
        result = sequential(args, keepalive=True)
    elif args.workload == "newconn":
        result = sequential(args, keepalive=False)
    elif args.workload == "conc":
        result = concurrent(args)
    else:
        result = ttfc(args)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
