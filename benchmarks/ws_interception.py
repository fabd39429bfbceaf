"""oisp's CPU per WebSocket message against its CPU per SSE chunk, in the interception lab.

    sudo python benchmarks/ws_interception.py [--rounds 5] [--n 10] [--profile] [--json FILE]

The lab is benchmarks/interception.py's, in lean mode (two namespaces over a veth,
lean_provider.py on :443 as api.openai.com, `oisp record` unmodified in the client's
namespace). Three workloads, each N answers of the same 500 pieces on one connection,
paced by the provider 1 ms apart, one event per TLS record:

  sse         lean_client.py `ttfc`: N POST /v1/chat/completions with "stream": true
              (503 SSE events each: role, 500 content chunks, usage, [DONE]) after one
              plain warm-up request on the connection
  ws          lean_ws_client.py: one WebSocket to wss://api.openai.com/v1/responses
              (websockets' sync client, no extension), N response.create in sequence,
              each answered by response.created, 500 response.output_text.delta and
              response.completed (503 messages with the client's)
  ws-deflate  the same with permessage-deflate (websockets' default offer, accepted)

Each round starts `oisp record`, sends it one untimed request (so no timed run pays for
the leaf certificate), measures its idle CPU for IDLE_S, runs the three
workloads (their order rotated from round to round) and stops it. The proxy's CPU
comes from /proc/PID/stat (all threads) around each client run; per message it is
that CPU over the messages the run carried, and "net" takes off the idle rate over
the run's wall time. Reported per workload: the median and spread over rounds, and
the WebSocket figures as ratios to the SSE ones of the same round.

So that a broken decode cannot look cheap, the events oisp wrote are checked after
the rounds: one ai.request and one ai.response per response.create (and per SSE
request), each response with the answer's whole text and exact usage, and one
network.flow per socket whose message counts are what the client sent and got, with
no decode errors. --profile adds an untimed turn per workload under py-spy
(benchmarks/interception.py's attribution: the share in oisp/decode and oisp/events).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "interception"))

from interception import (RATE, Lab, attribute, check_pyspy, cpu_seconds, log, machine, start_pyspy,  # noqa: E402
                          stop_pyspy, thread_cpu)
from lean_client import STREAM_CHUNKS  # noqa: E402
from lean_provider import CHAT_BODY, stream_events  # noqa: E402
from lean_provider import USAGE as SSE_USAGE  # noqa: E402
from lean_ws import STREAM_PIECES, pieces  # noqa: E402
from lean_ws import USAGE as WS_USAGE  # noqa: E402

WS_CLIENT = HERE / "interception" / "lean_ws_client.py"
WORKLOADS = ("sse", "ws", "ws-deflate")
WS_WORKLOADS = ("ws", "ws-deflate")
SSE_EVENTS = len(stream_events(STREAM_CHUNKS))  # per stream: role + content chunks + usage + [DONE]
WS_MESSAGES = STREAM_PIECES + 3  # per response: response.create + created + deltas + completed
WS_ENDPOINT = "wss://api.openai.com/v1/responses"
SSE_ENDPOINT = "https://api.openai.com/v1/chat/completions"
IDLE_S = 2.0
TEXT = "".join(pieces(STREAM_PIECES))
SSE_TEXT = "".join(f"w{i} " for i in range(STREAM_CHUNKS))
CHAT_TEXT = json.loads(CHAT_BODY)["choices"][0]["message"]["content"]


def default_pyspy() -> str | None:
    for candidate in (shutil.which("py-spy"), "/tmp/wsbench-venv/bin/py-spy", "/tmp/mitm-venv/bin/py-spy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def run_workload(lab: Lab, workload: str, n: int, idle_rate: float) -> dict:
    """One client run through oisp; its proxy CPU in all, per message and per answer."""
    t0 = time.monotonic()
    if workload == "sse":
        r = lab.client("oisp", "ttfc", 0, n)
        units = r["requests"] * SSE_EVENTS
    else:
        r = lab.client("oisp", workload, 0, n, script=WS_CLIENT)
        units = r["messages"]
    wall = time.monotonic() - t0
    cpu_ms = r["proxy_cpu_ms_per_req"] * (r["requests"] + r.get("warmup", 0))
    net_ms = cpu_ms - idle_rate * wall * 1000
    return {"workload": workload, "answers": r["requests"], "units": units, "wall_s": wall, "cpu_ms": cpu_ms,
            "net_ms": net_ms, "us_per_unit": cpu_ms * 1000 / units, "net_us_per_unit": net_ms * 1000 / units,
            "ms_per_answer": cpu_ms / r["requests"], "ttfc": r["ttfc"], "totals": r["totals"],
            "provider_cpu_ms": r["provider_cpu_ms_per_req"] * (r["requests"] + r.get("warmup", 0)),
            "client_cpu_s": r.get("client_cpu"), "extensions": r.get("extensions"), "warmup": r.get("warmup", 0)}


def idle(pid: int) -> float:
    """oisp's CPU while nothing goes through it, in CPU seconds per second."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(IDLE_S)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def profile(lab: Lab, pyspy: str, tmp: Path, n: int) -> dict:
    """An untimed oisp turn per workload under py-spy (--nonblocking)."""
    out = {}
    for workload in WORKLOADS:
        pid = lab.start_oisp()
        raw = tmp / f"pyspy-{workload}.txt"
        spy = start_pyspy(lab, pyspy, pid, raw)
        try:
            time.sleep(1.0)  # py-spy attached before the traffic starts
            threads0 = thread_cpu(pid)
            r = run_workload(lab, workload, n, 0.0)
            threads1 = thread_cpu(pid)
        finally:
            stop_pyspy(spy)
            lab.stop_oisp()
        check_pyspy(spy, raw)
        # py-spy --nonblocking cannot tell a thread waiting in native code from a busy one: the
        # threads' own CPU says where the time really went.
        threads = sorted(((threads1[t] - threads0.get(t, 0.0), "main (event loop)" if t == pid else f"tid {t}")
                          for t in threads1), reverse=True)
        out[workload] = {**attribute(raw), "cpu_ms": r["cpu_ms"], "messages": r["units"],
                         "threads": [(name, round(c, 3)) for c, name in threads if c > 0.005]}
    return out


def check_events(events_dir: Path, sent: collections.Counter, sockets: list[dict]) -> list[str]:
    """What oisp recorded against what went through it; a list of mismatches (empty: all good)."""
    events = []
    for path in sorted(events_dir.glob("events.jsonl*")):  # the sink rotates at 64 MB
        with open(path) as f:
            events += [json.loads(line) for line in f]
    problems = []
    by_type = collections.defaultdict(list)
    for e in events:
        by_type[e["event_type"]].append(e)
    for label, endpoint in (("WebSocket", WS_ENDPOINT), ("SSE", SSE_ENDPOINT)):
        requests = [e for e in by_type["ai.request"] if e["data"]["provider"]["endpoint"] == endpoint]
        responses = [e for e in by_type["ai.response"] if e["data"]["provider"]["endpoint"] == endpoint]
        want = sent[label]
        if not len(requests) == len(responses) == want:
            problems.append(f"{label}: {want} requests sent, {len(requests)} ai.request, {len(responses)} ai.response")
        if {e["data"]["request_id"] for e in requests} != {e["data"]["request_id"] for e in responses}:
            problems.append(f"{label}: ai.request and ai.response ids do not pair up")
        bad = 0
        for e in responses:
            d, u = e["data"], e["data"].get("usage") or {}
            content = (d.get("choices") or [{}])[0].get("message", {}).get("content")
            if label == "WebSocket":
                good = (d.get("success") and content == TEXT and u.get("prompt_tokens") == WS_USAGE["input_tokens"]
                        and u.get("completion_tokens") == WS_USAGE["output_tokens"]
                        and u.get("total_tokens") == WS_USAGE["total_tokens"]
                        and u.get("cached_tokens") == WS_USAGE["input_tokens_details"]["cached_tokens"])
            else:  # the warm-up request of each run is a plain completion: its own text, same usage
                good = (d.get("success") and content in (SSE_TEXT, CHAT_TEXT)
                        and u.get("prompt_tokens") == SSE_USAGE["prompt_tokens"]
                        and u.get("completion_tokens") == SSE_USAGE["completion_tokens"]
                        and u.get("total_tokens") == SSE_USAGE["total_tokens"])
            bad += not good
        if bad:
            problems.append(f"{label}: {bad} of {len(responses)} ai.response without the answer's text and usage")
    streamed = sum(1 for e in by_type["ai.response"]
                   if e["data"]["provider"]["endpoint"] == SSE_ENDPOINT
                   and (e["data"].get("choices") or [{}])[0].get("message", {}).get("content") == SSE_TEXT)
    if streamed != sent["SSE streams"]:
        problems.append(f"SSE: {sent['SSE streams']} streams sent, {streamed} ai.response with the stream's text")
    flows = [e["data"]["websocket"] for e in by_type["network.flow"] if "websocket" in e["data"]]
    if len(flows) != len(sockets):
        problems.append(f"{len(sockets)} WebSockets opened, {len(flows)} network.flow with a websocket record")
    got = sorted((f["client"]["messages"], f["server"]["messages"], any("permessage-deflate" in x for x in f["extensions"]),
                  f["decode_errors"]) for f in flows)
    want = sorted((s["answers"], s["answers"] * (WS_MESSAGES - 1), s["deflate"], 0) for s in sockets)
    if got != want:
        problems.append(f"WebSocket sessions recorded (client msgs, server msgs, deflate, decode errors) {got} "
                        f"!= sent {want}")
    return problems


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="oisp-wsb-"))
    lab = None
    rounds: list[dict] = []
    sent: collections.Counter = collections.Counter()
    sockets: list[dict] = []

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        lab = Lab(tmp, lean=True)
        log(f"lab up: lean provider {lab.pair.b_ip4}:443 in {lab.pair.b.name}, client and oisp in {lab.pair.a.name}")
        for rnd in range(args.rounds):
            order = WORKLOADS[rnd % 3:] + WORKLOADS[:rnd % 3]
            pid = lab.start_oisp()
            try:
                # One plain request first, so the host's leaf certificate is made before any timed run.
                sent["SSE"] += lab.client("oisp", "ttfc", 0, 0)["warmup"]
                idle_rate = idle(pid)
                row = {"idle_cpu": idle_rate, "order": list(order)}
                for workload in order:
                    r = run_workload(lab, workload, args.n, idle_rate)
                    row[workload] = r
                    if workload == "sse":
                        sent["SSE"] += r["answers"] + r["warmup"]
                        sent["SSE streams"] += r["answers"]
                    else:
                        sent["WebSocket"] += r["answers"]
                        sockets.append({"answers": r["answers"], "deflate": workload == "ws-deflate"})
                    log(f"round {rnd + 1} {workload:10} proxy CPU {r['cpu_ms']:7.1f} ms for {r['units']} messages: "
                        f"{r['us_per_unit']:6.1f} us/message (net of idle {r['net_us_per_unit']:6.1f}), "
                        f"{r['ms_per_answer']:5.1f} ms/answer; first message {statistics.median(r['ttfc']) * 1000:.2f} ms")
            finally:
                lab.stop_oisp()
            rounds.append(row)
        problems = check_events(tmp, sent, sockets)
        profiles = {}
        if args.profile:
            pyspy = args.py_spy or default_pyspy()
            if pyspy is None:
                raise SystemExit("--profile needs py-spy (pip install py-spy, or --py-spy PATH)")
            profiles = profile(lab, pyspy, tmp, args.n)
        return {"rounds": rounds, "sent": dict(sent), "sockets": sockets, "problems": problems, "profiles": profiles,
                "n": args.n}
    finally:
        if lab is not None:
            lab.close()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def report(data: dict) -> str:
    rounds = data["rounds"]
    out = []
    p = out.append
    p(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {machine()}")
    p(f"# lean lab, oisp record; {len(rounds)} rounds, workload order rotated; {data['n']} answers of "
      f"{STREAM_PIECES} pieces per workload per round on one connection; median [min-max] over rounds")
    p(f"# per message: SSE {SSE_EVENTS} events per stream; WebSocket {WS_MESSAGES} messages per response "
      f"(1 client + {WS_MESSAGES - 1} server)")
    load = os.getloadavg()
    p(f"# load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; oisp idle CPU per round (% of a core): "
      + " ".join(f"{r['idle_cpu'] * 100:.1f}" for r in rounds))
    p("")
    p(f"{'workload':11} {'us/message':>20} {'net of idle':>20} {'ms/answer':>20} {'first msg ms':>16}")
    for w in WORKLOADS:
        rs = [r[w] for r in rounds]
        p(f"{w:11} {spread([r['us_per_unit'] for r in rs]):>20} {spread([r['net_us_per_unit'] for r in rs]):>20} "
          f"{spread([r['ms_per_answer'] for r in rs]):>20} "
          f"{statistics.median(x for r in rs for x in r['ttfc']) * 1000:16.2f}")
    p("")
    for w in WS_WORKLOADS:
        ratio = [r[w]["us_per_unit"] / r["sse"]["us_per_unit"] for r in rounds]
        net = [r[w]["net_us_per_unit"] / r["sse"]["net_us_per_unit"] for r in rounds]
        p(f"{w} / sse, CPU per message, same round: median {statistics.median(ratio):.2f} "
          f"(rounds {' '.join(f'{x:.2f}' for x in ratio)}); net of idle {statistics.median(net):.2f} "
          f"(rounds {' '.join(f'{x:.2f}' for x in net)})")
    ratio = [r["ws-deflate"]["us_per_unit"] / r["ws"]["us_per_unit"] for r in rounds]
    p(f"ws-deflate / ws: median {statistics.median(ratio):.2f} (rounds {' '.join(f'{x:.2f}' for x in ratio)})")
    p("")
    p(f"sent through oisp: {data['sent']}; WebSockets {len(data['sockets'])}")
    p("events check: " + ("one ai.request/ai.response per request, each with the answer's text and usage; "
                          "one network.flow per socket with the message counts sent, no decode errors"
                          if not data["problems"] else "MISMATCH: " + "; ".join(data["problems"])))
    for w, prof in data["profiles"].items():
        total = prof["total"] or 1
        p("")
        cpu_s = prof["cpu_ms"] / 1000
        p(f"py-spy of oisp record, {w} ({prof['messages']} messages, {prof['cpu_ms']:.0f} ms CPU, {total} samples "
          f"at {RATE} Hz)")
        p("  CPU s by thread: " + ", ".join(f"{name} {c:.2f}" for name, c in prof["threads"]))
        for pkg in ("decode", "events"):
            busy = prof["by_pkg"].get(pkg, 0) / RATE
            p(f"  in oisp/{pkg}: {busy:.2f} s of samples = {busy / max(cpu_s, 1e-9) * 100:.1f} % of the process CPU, "
              f"{busy * 1e6 / prof['messages']:.1f} us/message")
        p("  by innermost oisp package on the stack (inclusive; py-spy counts native waits as busy):")
        for pkg, c in list(prof["by_pkg"].items())[:10]:
            p(f"    {pkg:40} {c * 100 / total:5.1f} %")
        p("  top leaf functions (self):")
        for where, c in list(prof["by_func"].items())[:12]:
            p(f"    {where[:96]:96} {c * 100 / total:5.1f} %")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=10, help="answers per workload per round, on one connection")
    parser.add_argument("--profile", action="store_true", help="add an untimed py-spy turn per workload")
    parser.add_argument("--py-spy", help="the py-spy binary (default: on PATH, or /tmp/wsbench-venv, /tmp/mitm-venv)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, the divert handle)")
    data = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(data))
    print(report(data))
    if data["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
