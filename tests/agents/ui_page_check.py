"""Opens a live `oisp record --ui` dashboard in Debian's Chromium (Playwright) from inside the
client's namespace, where the dashboard listens, and prints what the page shows as JSON.

    python ui_page_check.py --url URL --expected-calls N --screenshot-dir DIR
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def status_of(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def main() -> None:
    parser = argparse.ArgumentParser(description="What a live dashboard shows in Chromium, as JSON.")
    parser.add_argument("--url", required=True, help="the dashboard's URL, with its token")
    parser.add_argument("--expected-calls", type=int, required=True, help="calls the page must come to show")
    parser.add_argument("--screenshot-dir", required=True)
    options = parser.parse_args()
    url, expected, shots = options.url, options.expected_calls, options.screenshot_dir
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    out: dict = {"no_token": status_of(origin + "/"),
                 "wrong_host": status_of(url, {"Host": f"attacker.example:{parts.port}"})}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(url)
        page.wait_for_function(f"() => document.querySelector('[data-total=\"calls\"]').textContent === '{expected}'",
                               timeout=20_000)
        out["totals"] = {key: page.locator(f'[data-total="{key}"]').inner_text()
                         for key in ("calls", "errors", "input", "cached", "output", "reasoning", "cost")}
        rows = page.locator("#rows .row:not([hidden])")
        out["rows"] = [rows.nth(i).inner_text() for i in range(rows.count())]
        out["details"] = []
        for i in range(rows.count()):
            rows.nth(i).click()
            page.wait_for_function("() => document.querySelector('#detail-body').textContent.includes('Response')")
            out["details"].append(page.locator("#detail-body").inner_text())
        page.screenshot(path=f"{shots}/record-ui.png")
        page.click("#tabs button[data-tab=health]")
        page.wait_for_function("() => document.querySelector('#health').textContent.includes('sinks')")
        out["health"] = page.locator("#health").inner_text()
        browser.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
