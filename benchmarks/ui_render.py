"""The dashboard's time to render 100,000 calls, in Debian's Chromium driven by Playwright.

Makes a JSONL file of N calls (the provider fixtures' events from the real recorder,
repeated with fresh request ids, times and process names), serves it with a real
`oisp ui FILE --port 0`, opens the page and measures:
  load     navigation until every call is in the page and the totals are drawn
  filter   choosing a provider until the narrowed table is drawn
  search   a free-text search over prompts and responses until drawn
  scroll   frames while jumping through the table (rows are windowed)
  summary  opening the Summary tab (tables and the plot over all calls)

    PYTHONPATH=. python benchmarks/ui_render.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import uievents  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run", "--disable-quic"]


def make_file(path: Path, calls: int) -> dict:
    templates: list[list[dict]] = []
    events = uievents.recorded_events(start=time.time() - calls)
    for ev in events:  # group each call's events: connect, request, response, flow
        if ev["event_type"] == "network.connect":
            templates.append([])
        templates[-1].append(ev)
    start = time.time() - calls * 0.5
    with open(path, "w", encoding="utf-8") as f:
        for n in range(calls):
            group = copy.deepcopy(templates[n % len(templates)])
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + n * 0.5)) + ".%06dZ" % ((n * 500_000) % 1_000_000)
            for ev in group:
                ev["ts"] = ts
                if "request_id" in ev["data"]:
                    ev["data"]["request_id"] = f"bench-{n}"
                ev["attrs"] = {"flow_id": f"bench-flow-{n}"}
                if ev.get("process"):
                    ev["process"]["name"] = f"agent-{n % 25}"
                f.write(json.dumps(ev, ensure_ascii=False) + "\n")
    return {"bytes": path.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.jsonl"
        t = time.perf_counter()
        info = make_file(path, args.calls)
        print(f"file: {args.calls} calls, {info['bytes'] / 1e6:.0f} MB, made in {time.perf_counter() - t:.1f} s")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen([sys.executable, "-m", "oisp", "ui", str(path), "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            url = server.stdout.readline().strip()
            # the server reads the file first; wait until it has all of it, so the page load is what is timed
            time.sleep(1)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1600, "height": 900})
                n = args.calls
                t = time.perf_counter()
                page.goto(url)
                page.wait_for_function(f"() => window.oispStats && window.oispStats.calls === {n} && "
                                       f"document.querySelector('[data-total=\"calls\"]').textContent === '{n:,}'",
                                       timeout=600_000, polling=50)
                load = time.perf_counter() - t
                heap = page.evaluate("() => performance.memory ? performance.memory.usedJSHeapSize : 0")

                t = time.perf_counter()
                page.select_option("#f-provider", "anthropic")
                page.wait_for_function(f"() => window.oispStats.shown < {n}", polling="raf")
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                filt = time.perf_counter() - t
                shown = page.evaluate("() => window.oispStats.shown")
                page.select_option("#f-provider", "")
                page.wait_for_function(f"() => window.oispStats.shown === {n}", polling="raf")

                t = time.perf_counter()
                page.fill("#f-text", "capital of france")
                page.wait_for_function(f"() => window.oispStats.shown < {n}", polling="raf")
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                search = time.perf_counter() - t - 0.15  # minus the search box's 150 ms typing pause
                page.fill("#f-text", "")
                page.wait_for_function(f"() => window.oispStats.shown === {n}", polling="raf")

                # A jump through the table: the page's own render time for the frame (JS: rows
                # refilled), and the frame until painted (one rAF after the scroll's render,
                # so it includes style, layout and paint; at 60 Hz 16.7 ms is one frame).
                frames = page.evaluate("""async () => {
                    const rows = document.getElementById('rows'); const frame = [], js = [];
                    for (let i = 0; i < 60; i++) {
                        const renders = window.oispStats.renders;
                        const t = performance.now();
                        rows.scrollTop = (i * 7919 % 100) / 100 * rows.scrollHeight;
                        while (window.oispStats.renders === renders) await new Promise(r => requestAnimationFrame(r));
                        await new Promise(r => requestAnimationFrame(r));
                        frame.push(performance.now() - t);
                        js.push(window.oispStats.renderMs);
                    }
                    const p = (a, q) => a.sort((x, y) => x - y)[Math.floor(q * (a.length - 1))];
                    return {p50: p(frame, .5), max: p(frame, 1), js50: p(js, .5), jsmax: p(js, 1)};
                }""")

                t = time.perf_counter()
                page.click("#tabs button[data-tab=summary]")
                page.wait_for_function("() => document.querySelector('#s-model').rows.length > 1", polling="raf")
                summary = time.perf_counter() - t
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"load {load:.2f} s (JS heap {heap / 1e6:.0f} MB); filter {filt * 1000:.0f} ms ({shown} shown); "
          f"search {search * 1000:.0f} ms; scroll jump: frame p50 {frames['p50']:.1f} ms max {frames['max']:.1f} ms, "
          f"render JS p50 {frames['js50']:.2f} ms max {frames['jsmax']:.2f} ms; "
          f"summary tab {summary * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
