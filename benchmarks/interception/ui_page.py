"""Keeps one dashboard page open in Debian's Chromium (Playwright) while a benchmark runs.

    python ui_page.py URL [--chromium /usr/bin/chromium]

Prints "ready" once the page has connected, then reads from stdin the number of calls the
benchmark made, gives the page up to 15 s to show them (the last batch is pushed up to a
few hundred ms after the call), and prints the page's own count (window.oispStats.calls)
as JSON, so the caller can check the page really followed the events it was sent.
"""

from __future__ import annotations

import argparse
import json
import sys

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(args.url)
        page.wait_for_function("() => window.oispStats !== undefined", timeout=30_000)
        print("ready", flush=True)
        made = int(sys.stdin.readline() or 0)  # the benchmark's calls, once it is done
        try:
            page.wait_for_function(f"() => window.oispStats.calls >= {made}", timeout=15_000)
        except PlaywrightTimeout:
            pass  # the count below says how far it got
        calls = page.evaluate("() => window.oispStats.calls")
        browser.close()
    print(json.dumps({"calls": calls}), flush=True)


if __name__ == "__main__":
    main()
