"""The dashboard in Firefox: Debian's firefox-esr, headless, driven over Marionette (Mozilla's own
marionette_driver; Playwright drives only its patched Firefox builds, which cannot be downloaded
here) against a real `oisp ui FILE.jsonl`, over events the real recorder made from the provider
fixtures. The Chromium tests (test_ui_browser.py) cover the rest; this checks that the same page
works in the other engine: totals equal the file's, the detail shows the call, a filter narrows
the list, and hostile text stays text."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import uievents

FIREFOX = "/usr/bin/firefox-esr"
marionette = pytest.importorskip("marionette_driver.marionette")
from marionette_driver.by import By  # noqa: E402
from marionette_driver.wait import Wait  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(FIREFOX), reason="needs Debian's firefox-esr (.ci/run installs it)")


@pytest.fixture(scope="module")
def firefox(tmp_path_factory):
    # gecko_log: Firefox's own log goes with the test's files, not into the working directory.
    log = tmp_path_factory.mktemp("firefox") / "gecko.log"
    client = marionette.Marionette(host="127.0.0.1", port=0, bin=FIREFOX, headless=True, startup_timeout=120,
                                   gecko_log=str(log))
    client.start_session()
    client.set_window_rect(width=1600, height=900)
    yield client
    client.delete_session()
    client.cleanup()


@pytest.fixture
def served(tmp_path):
    with uievents.serve_ui(tmp_path / "events.jsonl") as served:
        yield served


def page_js(client, script: str):
    # sandbox=None: run in the page's own window, so its globals (window.oispStats) are seen
    # as the page made them rather than through Marionette's Xray wrapper.
    return client.execute_script(script, sandbox=None)


def wait_for(client, script: str, timeout: float = 15) -> None:
    Wait(client, timeout=timeout, interval=0.05).until(lambda c: page_js(c, script),
                                                       message=f"never true in Firefox: {script}")


def total(client, key: str) -> str:
    return client.find_element(By.CSS_SELECTOR, f'[data-total="{key}"]').text


def shown_rows(client) -> list[str]:
    return [r.text for r in client.find_elements(By.CSS_SELECTOR, "#rows .row:not([hidden])")]


def test_the_page_works_in_firefox(firefox, served, tmp_path) -> None:
    want = uievents.totals(served.path)
    firefox.navigate(served.url)
    wait_for(firefox, f'return document.querySelector(\'[data-total="calls"]\').textContent === "{want["calls"]}"')
    assert "token" not in firefox.get_url()  # swapped for the cookie, as in Chromium
    for key in ("errors", "input", "cached", "output", "reasoning"):
        assert int(total(firefox, key).replace(",", "")) == want[key], key
    assert len(shown_rows(firefox)) == want["calls"]

    anthropic_json = next(c for c in uievents.load_cases() if c.name == "anthropic_json")
    row = next(r for r in firefox.find_elements(By.CSS_SELECTOR, "#rows .row:not([hidden])")
               if anthropic_json.request["model"] in r.text)
    row.click()
    wait_for(firefox, "return document.querySelector('#detail-body').textContent.includes('Capital of France?')")
    detail = firefox.find_element(By.ID, "detail-body").text
    assert anthropic_json.expected["text"] in detail
    assert "TLSv1.3" in detail

    page_js(firefox, """const s = document.getElementById('f-provider'); s.value = 'anthropic';
                              s.dispatchEvent(new Event('change', {bubbles: true}));""")
    wait_for(firefox, f"return window.oispStats.shown < {want['calls']}")
    narrowed = shown_rows(firefox)
    assert 0 < len(narrowed) < want["calls"]
    assert all("anthropic" in r for r in narrowed)
    (tmp_path / "firefox.png").write_bytes(firefox.screenshot(format="binary"))
    print(f"screenshot: {tmp_path / 'firefox.png'}")


def test_hostile_text_is_inert_in_firefox(firefox, served) -> None:
    firefox.navigate(served.url)
    wait_for(firefox, "return window.oispStats !== undefined && window.oispStats.calls > 0")
    row = next(r for r in firefox.find_elements(By.CSS_SELECTOR, "#rows .row:not([hidden])")
               if uievents.HOSTILE_PROCESS in r.text)
    row.click()
    wait_for(firefox, "return document.querySelector('#detail-body').textContent.includes('window.pwned')")
    assert uievents.HOSTILE in firefox.find_element(By.ID, "detail-body").text
    assert page_js(firefox, "return document.querySelectorAll('#detail-body script, #detail-body img, "
                                  "#rows script, #rows img').length") == 0
    time.sleep(0.5)  # an onerror handler would have fired by now
    assert page_js(firefox, "return typeof window.pwned") == "undefined"
