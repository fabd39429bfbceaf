"""What the dashboard costs the proxy: `oisp record` vs `oisp record --ui 0` with a page open.

    sudo python benchmarks/ui_overhead.py [--rounds 6] [--seconds 4] [--workloads seq,newconn,conc,ttfc]
        [--default-lab]

The lab is benchmarks/interception.py's (lean client and provider unless --default-lab).
Each round runs the same client workloads against three turns of `oisp record`, the order
rotating: `plain` (the JSONL sink only), `ui` (`--ui 0` as well, no page open: what the sink
and its server cost) and `ui+page` (`--ui 0` with Debian's Chromium driven by Playwright
keeping the dashboard open in the client's namespace for the whole turn,
benchmarks/interception/ui_page.py; on a 2-core machine the page's own work competes with
the proxy for CPU). The proxy's CPU per request (all its threads, the UI server's included,
from /proc) is the figure; the issue's bound is ui+page/plain <= 1.05. The page's own call
count at the end of each ui+page turn is checked against the calls made, so a page that
stopped following the events cannot pass for a cheap one.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import interception as bench  # the lab

PAGE = Path(__file__).parent / "interception" / "ui_page.py"


def open_page(lab: "bench.Lab") -> subprocess.Popen:
    url = next((m.group(1) for line in lab.oisp_log if (m := re.search(r"dashboard (\S+)", line))), None)
    if url is None:
        raise RuntimeError("oisp record printed no dashboard URL:\n" + "".join(lab.oisp_log))
    page = lab.pair.a.popen(sys.executable, str(PAGE), url, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=lab.env)
    line = page.stdout.readline()
    if line.strip() != "ready":
        page.kill()
        raise RuntimeError(f"the dashboard page did not open: {line}{page.stderr.read()[-2000:]}")
    return page


def close_page(page: subprocess.Popen, calls: int) -> int:
    out, err = page.communicate(input=f"{calls}\n", timeout=60)
    if page.returncode != 0:
        raise RuntimeError(f"the dashboard page failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])["calls"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workloads", default="seq,newconn,conc,ttfc")
    parser.add_argument("--default-lab", action="store_true", help="httpx + hypercorn instead of the lean pair")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    turns = ("plain", "ui", "ui+page")
    cpu = {(t, w): [] for t in turns for w in workloads}
    rate = {(t, w): [] for t in turns for w in workloads}
    lab = bench.Lab(Path(tempfile.mkdtemp(prefix="oisp-uiov-")), lean=not args.default_lab)
    print(f"# {bench.machine()}\n# {'lean' if not args.default_lab else 'default'} lab; {args.rounds} rounds, "
          f"{args.seconds} s per rate workload, order alternating", flush=True)
    try:
        for r in range(args.rounds):
            for turn in turns[r % 3:] + turns[:r % 3]:
                lab.start_oisp(extra=("--ui", "0") if turn != "plain" else ())
                page = open_page(lab) if turn == "ui+page" else None
                calls = 0
                try:
                    for w in workloads:
                        out = lab.client("oisp", w, args.seconds, 17)
                        calls += out["requests"] + out.get("warmup", 0)
                        cpu[turn, w].append(out["proxy_cpu_ms_per_req"])
                        rate[turn, w].append(statistics.median(out["ttfc"]) * 1000 if w == "ttfc"
                                             else out["requests"] / out["elapsed"])
                finally:
                    seen = close_page(page, calls) if page is not None else None
                    lab.stop_oisp()
                if seen is not None and seen < calls:
                    raise RuntimeError(f"the page showed {seen} calls of the {calls} made in round {r + 1}")
                print(f"round {r + 1} {turn:7} " + "  ".join(f"{w} {cpu[turn, w][-1]:.3f} ms CPU/req"
                                                             for w in workloads)
                      + (f"  (page: {seen} calls of {calls})" if seen is not None else ""), flush=True)
    finally:
        lab.close()
    print("\nproxy CPU per request, ms (median of rounds); ratios to plain: median of the per-round ratios "
          "(min..max); then req/s or TTFC ms, plain / ui / ui+page")
    for w in workloads:
        ratio = {}
        for turn in turns[1:]:
            per_round = [u / p for p, u in zip(cpu["plain", w], cpu[turn, w])]
            ratio[turn] = f"{statistics.median(per_round):.3f} ({min(per_round):.3f}..{max(per_round):.3f})"
        unit = "ms TTFC" if w == "ttfc" else "req/s"
        print(f"{w:8} plain {statistics.median(cpu['plain', w]):.3f}  ui {statistics.median(cpu['ui', w]):.3f} "
              f"x{ratio['ui']}  ui+page {statistics.median(cpu['ui+page', w]):.3f} x{ratio['ui+page']}  "
              + " / ".join(f"{statistics.median(rate[t, w]):.1f}" for t in turns) + f" {unit}")


if __name__ == "__main__":
    main()
