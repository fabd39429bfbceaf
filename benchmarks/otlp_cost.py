"""What the OTLP sink adds to the sensor's CPU per request, A/B in one interception lab.

    sudo python benchmarks/otlp_cost.py [--rounds 6] [--seconds 4] [--workloads seq,newconn] [--default-lab]
                                        [--tree OTHER_CHECKOUT]

The lab is benchmarks/interception.py's (lean unless --default-lab: the stdlib client
and provider, so the sensor is the bottleneck and its CPU per request is what moves).
A real OTLP receiver (ddapm-test-agent, tests/otlp_receiver.py) listens on the sensor
namespace's loopback. Each round runs `oisp record` twice, plain (the JSONL sink) and
with `--otlp` to the receiver as well, in alternating order, under the same client
workloads. CPU per request comes from /proc around each workload: the sensor process's
(all threads), and beside it the OTLP sink's exporter process's (its worker, the SDK's
batch processors and exporters). The figures are the medians of the per-round ratios
otlp/plain, for the sensor process alone and with the exporter process added; the
receiver's own CPU is in neither. After each workload the exporter process is given
time to catch up (settle()): its CPU until then counts for that workload (it used to be
counted in the next one's), and how long that took is printed ("catch-up").
At the end the receiver's span count is checked against the requests sent with --otlp.
With ``--tree`` (another checkout of oisp, e.g. main's, for an A/B of the sink itself)
each round also runs `oisp record --otlp` from that tree ("otlp@other"), so both
versions are compared against the same plain runs, in rotating order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import interception as bench  # noqa: E402  (the lab)

from tests.otlp_receiver import Receiver  # noqa: E402


def children(pid: int) -> list[int]:
    """The OTLP exporter process(es) `pid` started (not its guardian)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            try:
                if b"oisp.sinks.otlp.child" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    out.append(kid)
            except OSError:
                pass
    return out


def settle(kids: list[int], timeout: float = 20.0) -> float:
    """Seconds until the exporter process has caught up after a workload (its CPU grows by
    under 10 ms in 0.25 s), so that what it exports late is counted in that workload's
    figure and not in the next one's."""
    start = time.monotonic()
    before = sum(bench.cpu_seconds(k) for k in kids)
    while time.monotonic() - start < timeout:
        time.sleep(0.25)
        now = sum(bench.cpu_seconds(k) for k in kids)
        if now - before < 0.010:
            break
        before = now
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workloads", default="seq,newconn")
    parser.add_argument("--default-lab", action="store_true", help="httpx + hypercorn instead of the lean pair")
    parser.add_argument("--tree", type=Path, help="another oisp checkout whose --otlp runs beside this one's")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    modes = ["plain", "otlp"] + (["otlp@other"] if args.tree else [])
    tmp = Path(tempfile.mkdtemp(prefix="otlp-cost-"))
    lab = bench.Lab(tmp, lean=not args.default_lab)
    ns = lab.pair.a
    receiver = Receiver(wrap=lambda argv: ns.cmd(*argv))

    def query(path: str):
        return json.loads(ns.run("curl", "-sS", "--fail", "-m", "30", receiver.http_url + path).stdout)

    cpu = {(mode, w): [] for mode in modes for w in workloads}
    child = {(mode, w): [] for mode in modes for w in workloads}
    rate = {(mode, w): [] for mode in modes for w in workloads}
    lag = {(mode, w): [] for mode in modes for w in workloads}
    losses = {mode: [] for mode in modes}
    otlp_requests = 0
    try:
        receiver.start(query)
        extra = {"plain": (), "otlp": ("--otlp", receiver.http_url), "otlp@other": ("--otlp", receiver.http_url)}
        trees = {"plain": bench.ROOT, "otlp": bench.ROOT, "otlp@other": args.tree.resolve() if args.tree else None}
        for i in range(args.rounds):
            order = modes[i % len(modes):] + modes[:i % len(modes)]
            for mode in order:
                pid = lab.start_oisp(extra=extra[mode], tree=trees[mode])
                try:
                    for w in workloads:
                        kids = children(pid)  # the OTLP sink's exporter process
                        kids0 = sum(bench.cpu_seconds(k) for k in kids)
                        out = lab.client("oisp", w, args.seconds, 17)
                        total = out["requests"] + out.get("warmup", 0)
                        cpu[(mode, w)].append(out["proxy_cpu_ms_per_req"])
                        lag[(mode, w)].append(settle(kids) if kids else 0.0)
                        child[(mode, w)].append((sum(bench.cpu_seconds(k) for k in kids) - kids0) * 1000 / total)
                        rate[(mode, w)].append(out["requests"] / out["elapsed"])
                        if mode != "plain":
                            otlp_requests += out["requests"] + out.get("warmup", 0)
                finally:
                    lab.stop_oisp()
                bench.log(f"round {i + 1} {mode}: " + "  ".join(
                    f"{w} {cpu[(mode, w)][-1]:.3f} (+{child[(mode, w)][-1]:.3f} exporter) ms/req "
                    f"{rate[(mode, w)][-1]:.0f} req/s" for w in workloads))
                if mode != "plain":
                    lost = [line.strip() for line in lab.oisp_log if "sink otlp lost" in line]
                    losses[mode].append(int(lost[0].split(" lost ", 1)[1].split()[0]) if lost else 0)
                    if lost:
                        bench.log(f"  {lost[0]}")
        spans = sum(len(ss.get("spans", [])) for r in query("/test/session/traces")
                    for rs in r.get("resource_spans", []) for ss in rs.get("scope_spans", []))
    finally:
        receiver.stop()
        lab.close()
    print(f"# {bench.machine()}")
    print(f"# {'lean' if not args.default_lab else 'default'} lab, {args.rounds} rounds interleaved, "
          f"{args.seconds:g} s per workload; CPU = the sensor process, all threads")
    print("CPU ms per request, median of rounds; ratio = median of the per-round ratios otlp/plain")
    if args.tree:
        print(f"# otlp@other: --otlp from {args.tree.resolve()}")
    print(f"{'workload':10} {'mode':11} {'plain':>8} {'otlp: sensor':>13} {'ratio':>7} {'+ exporter process':>19} "
          f"{'ratio':>7}")
    for w in workloads:
        for mode in modes[1:]:
            ratios = [o / p for o, p in zip(cpu[(mode, w)], cpu[("plain", w)])]
            both = [(o + c) / p for o, c, p in zip(cpu[(mode, w)], child[(mode, w)], cpu[("plain", w)])]
            print(f"{w:10} {mode:11} {statistics.median(cpu[('plain', w)]):8.3f} "
                  f"{statistics.median(cpu[(mode, w)]):13.3f} {statistics.median(ratios):7.3f} "
                  f"{statistics.median(o + c for o, c in zip(cpu[(mode, w)], child[(mode, w)])):19.3f} "
                  f"{statistics.median(both):7.3f}")
            print(f"{'':22} per-round sensor ratios " + " ".join(f"{r:.3f}" for r in ratios))
            print(f"{'':22} per-round sensor+exporter ratios " + " ".join(f"{r:.3f}" for r in both))
            print(f"{'':22} exporter ms/req per round " + " ".join(f"{c:.3f}" for c in child[(mode, w)]))
            print(f"{'':22} exporter catch-up s per round " + " ".join(f"{c:.2f}" for c in lag[(mode, w)]))
            print(f"{'':22} req/s plain {statistics.median(rate[('plain', w)]):.0f}, {mode} "
                  f"{statistics.median(rate[(mode, w)]):.0f}")
    for mode in modes[1:]:
        print(f"{mode}: events lost per round {losses[mode]}")
    print(f"spans received {spans} for {otlp_requests} requests sent with --otlp")


if __name__ == "__main__":
    main()
