"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a real
`oisp ui FILE.jsonl`, over events the real recorder made from the provider fixtures."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import uievents

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run", "--disable-quic"]
ROOT = Path(__file__).resolve().parent.parent

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (.ci/run installs it)")


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def served(tmp_path):
    with uievents.serve_ui(tmp_path / "events.jsonl") as served:
        yield served


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    pg = context.new_page()
    pg.shots = tmp_path  # screenshots are kept as test artifacts
    yield pg
    context.close()


def shot(page, name: str) -> Path:
    path = page.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    print(f"screenshot: {path}")
    return path


def total(page, key: str) -> str:
    return page.locator(f'[data-total="{key}"]').inner_text()


def as_int(text: str) -> int:
    return int(text.replace(",", ""))


def visible_rows(page):
    return page.locator("#rows .row:not([hidden])")


def open_page(page, served: uievents.Served, expect_calls: int) -> None:
    page.goto(served.url)
    page.wait_for_function(f'() => document.querySelector(\'[data-total="calls"]\').textContent === "{expect_calls}"',
                           timeout=10_000)


def test_rows_detail_and_totals_match_the_file(page, served) -> None:
    want = uievents.totals(served.path)
    # the fixtures hold a 429
    assert want["calls"] > 10
    assert want["input"] > 0
    assert want["errors"] >= 1
    open_page(page, served, want["calls"])
    assert "token" not in page.url  # the token went into the cookie, out of the address bar
    assert visible_rows(page).count() == want["calls"]
    for key in ("errors", "input", "cached", "output", "reasoning"):
        assert as_int(total(page, key)) == want[key], key
    assert want["cost"] > 0
    shown_cost = total(page, "cost")
    assert shown_cost.startswith("$"), shown_cost
    shown_digits = len(shown_cost.partition(".")[2])  # the page rounds: $0.2266 for 0.22662701
    assert shown_digits >= 2, shown_cost
    assert abs(float(shown_cost[1:]) - want["cost"]) <= 0.5 * 10 ** -shown_digits + 1e-12, shown_cost
    # newest first: the last call in the file (the hostile one, an openai chat) heads the table
    assert "gpt-4o" in visible_rows(page).first.inner_text()

    anthropic_json = next(c for c in uievents.load_cases() if c.name == "anthropic_json")
    page.locator("#rows .row", has_text=anthropic_json.request["model"]).first.click()
    assert anthropic_json.request["model"] in page.locator("#rows .row.selected").inner_text()
    detail = page.locator("#detail")
    page.wait_for_function("() => document.querySelector('#detail-body').textContent.includes('Capital of France?')")
    text = detail.inner_text()
    assert "Messages" in text
    assert "Capital of France?" in text
    assert "Response" in text
    assert anthropic_json.expected["text"] in text
    assert "TLSv1.3" in text  # the flow's TLS details, joined by flow id
    shot(page, "detail")


def test_filters_narrow_the_list(page, served) -> None:
    events = [json.loads(line) for line in served.path.read_text().splitlines()]
    responses = [e for e in events if e["event_type"] == "ai.response"]
    anthropic = {e["data"]["request_id"] for e in responses if e["data"]["provider"]["name"] == "anthropic"}
    agent_b = {e["data"]["request_id"] for e in responses if (e.get("process") or {}).get("name") == "agent-b"}
    errors = [e for e in responses if not e["data"]["success"]]
    assert 0 < len(anthropic) < len(responses)
    assert 0 < len(agent_b) < len(responses)
    open_page(page, served, len(responses))

    page.select_option("#f-provider", "anthropic")
    page.wait_for_function(f"() => document.querySelectorAll('#rows .row:not([hidden])').length === {len(anthropic)}")
    assert all("anthropic" in t for t in visible_rows(page).all_inner_texts())
    assert as_int(total(page, "calls")) == len(anthropic)
    page.select_option("#f-provider", "")

    page.select_option("#f-process", "agent-b")
    page.wait_for_function(f"() => document.querySelectorAll('#rows .row:not([hidden])').length === {len(agent_b)}")
    assert all("agent-b" in t for t in visible_rows(page).all_inner_texts())
    page.select_option("#f-process", "")

    page.select_option("#f-status", "error")
    page.wait_for_function(f"() => document.querySelectorAll('#rows .row:not([hidden])').length === {len(errors)}")
    assert "429" in visible_rows(page).first.inner_text()
    page.select_option("#f-status", "")

    page.fill("#f-text", "capital of france")  # free text reaches into prompts, case-insensitively
    page.wait_for_function("() => document.querySelectorAll('#rows .row:not([hidden])').length === 1")
    assert "claude" in visible_rows(page).first.inner_text()
    page.fill("#f-text", "")

    page.select_option("#f-range", "custom")
    page.fill("#f-from", "2001-01-01T00:00:00")
    page.fill("#f-to", "2001-01-02T00:00:00")
    page.locator("#f-to").dispatch_event("change")
    page.wait_for_function("() => document.querySelectorAll('#rows .row:not([hidden])').length === 0")
    page.select_option("#f-range", "300")  # the fixture calls are from the last minute
    page.wait_for_function(f"() => document.querySelectorAll('#rows .row:not([hidden])').length === {len(responses)}")

    page.click("#tabs button[data-tab=summary]")
    page.wait_for_function("() => document.querySelector('#s-model').rows.length > 1")
    assert "claude" in page.locator("#s-model").inner_text()
    assert "agent-a" in page.locator("#s-proc").inner_text()
    shot(page, "summary")
    page.click("#tabs button[data-tab=health]")
    assert "bad lines" in page.locator("#health").inner_text()
    shot(page, "health")


def test_appended_events_appear_and_streaming_call_shows_in_progress(page, served) -> None:
    before = uievents.totals(served.path)["calls"]
    open_page(page, served, before)
    case = next(c for c in uievents.load_cases() if c.name == "openai_chat_stream")
    rec = uievents.recorder(case, 900, time.time(), "late-agent")
    uievents.write_jsonl(served.path, rec.feed(uievents.Direction.REQUEST, uievents.http1_request(case), time.time()), "a")
    started = time.monotonic()
    page.wait_for_function(f'() => document.querySelector(\'[data-total="calls"]\').textContent === "{before + 1}"', timeout=5000)
    assert time.monotonic() - started < 3
    head = visible_rows(page).first
    assert "late-agent" in head.inner_text()
    assert "pending" in (head.get_attribute("class") or "")
    assert total(page, "pending") == "1"

    events = rec.feed(uievents.Direction.RESPONSE, uievents.http1_response(case), time.time()) + rec.close(time.time())
    uievents.write_jsonl(served.path, events, "a")
    page.wait_for_function('() => document.querySelector(\'[data-total="pending"]\').textContent === "0"', timeout=5000)
    assert "pending" not in (visible_rows(page).first.get_attribute("class") or "")
    assert as_int(total(page, "output")) == uievents.totals(served.path)["output"]


def test_the_token_and_the_host_are_required(page, served) -> None:
    def status(url: str, headers: dict | None = None) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    for path in ("/", "/app.js", "/api/stream", "/?token=wrong"):
        assert status(served.origin + path)[0] == 403, path
    code, headers = status(served.url)
    assert code == 200
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    assert not any(h.lower().startswith("access-control-") for h in headers)
    assert re.search(r"HttpOnly", headers["Set-Cookie"])
    assert "SameSite=Strict" in headers["Set-Cookie"]
    # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends its own name as Host
    assert status(served.url, {"Host": f"evil.example:{served.port}"})[0] == 403
    assert status(served.url, {"Host": f"localhost:{served.port}"})[0] == 200

    # The browser, once given the token, keeps it as a cookie: a reload without it works.
    open_page(page, served, uievents.totals(served.path)["calls"])
    response = page.goto(served.origin + "/")
    assert response.status == 200
    other = page.context.browser.new_context()
    try:
        assert other.new_page().goto(served.origin + "/").status == 403  # a browser without the cookie
    finally:
        other.close()


def test_html_in_prompts_and_process_names_renders_as_text(page, served) -> None:
    open_page(page, served, uievents.totals(served.path)["calls"])
    row = page.locator("#rows .row", has_text=uievents.HOSTILE_PROCESS)
    assert row.count() == 1
    row.click()
    page.wait_for_function("() => document.querySelector('#detail-body').textContent.includes('window.pwned')")
    body = page.locator("#detail-body")
    assert uievents.HOSTILE in body.inner_text()
    assert body.locator("script").count() == 0
    assert body.locator("img").count() == 0
    assert page.locator("#rows img, #rows script").count() == 0
    page.click("#tabs button[data-tab=summary]")
    page.wait_for_function("() => document.querySelector('#s-proc').rows.length > 1")
    assert uievents.HOSTILE_PROCESS in page.locator("#s-proc").inner_text()
    page.click("#tabs button[data-tab=calls]")
    time.sleep(0.5)  # an onerror handler would have fired by now
    assert page.evaluate("typeof window.pwned") == "undefined"
    shot(page, "hostile")
