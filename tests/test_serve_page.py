"""The chat page of `persllm serve` in a real headless browser (Debian's chromium driven by
Playwright): it loads, answers stream in, the stage picker switches stage, and a reply holding HTML
is shown as text. A screenshot is kept in build/test-artifacts/serve-page.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.run_factory import make_run
from tests.serve_server import ServeProcess
from tests.test_serve import _env

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
XSS = '<img src=x onerror="window.__pwned = 1"> and <b>bold</b>'

# Counts the changes of each streamed answer, to see it arrive in pieces.
WATCH = """
window.__updates = 0;
new MutationObserver((list) => { for (const m of list) {
  const el = m.target.nodeType === 3 ? m.target.parentElement : m.target;
  if (el && el.closest && el.closest('.assistant')) window.__updates++;
}}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def test_page_streams_switches_stage_and_shows_html_as_text(harry, _embedded_models, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    run = make_run(tmp_path / "r1", _embedded_models / "smollm2-135m")
    with FakeOpenAI() as fake:
        env = _env(_embedded_models, OPENAI_API_KEY=fake.api_key, OPENAI_BASE_URL=fake.url)
        server = ServeProcess(str(run), "--api-model", "gpt-4o-mini", "--max-tokens", "24", env=env, cwd=harry)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 900, "height": 760})
                page.add_init_script(WATCH)
                page.goto(server.url + "/")
                expect(page.locator("#persona")).to_have_text("Harry Potter")
                assert page.locator("#model option").all_text_contents() == ["gpt-4o-mini", "r1"]
                page.select_option("#model", "r1")
                expect(page.locator("#stage")).to_have_value("late")

                page.fill("#input", "Who are you?")
                page.press("#input", "Enter")
                answer = page.locator(".assistant").last
                expect(answer).to_have_attribute("data-done", "1", timeout=120_000)
                assert answer.locator(".text").text_content().strip()
                assert page.evaluate("window.__updates") > 2  # streamed in pieces, not all at once
                assert "(late)" in answer.locator(".who").text_content()

                page.select_option("#stage", "early")
                expect(page.locator(".note").last).to_have_text("(now at stage early)")
                page.fill("#input", "And now?")
                page.press("#input", "Enter")
                answer = page.locator(".assistant").nth(1)
                expect(answer).to_have_attribute("data-done", "1", timeout=120_000)
                assert "(early)" in answer.locator(".who").text_content()

                page.select_option("#model", "gpt-4o-mini")
                fake.push(Reply(XSS))
                page.fill("#input", "Show me some HTML")
                page.press("#input", "Enter")
                answer = page.locator(".assistant").last
                expect(answer).to_have_attribute("data-done", "1", timeout=60_000)
                assert answer.locator(".text").text_content() == XSS
                assert page.locator("#log img, #log b").count() == 0
                assert page.evaluate("window.__pwned") is None
                out = REPO / "build" / "test-artifacts"
                out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out / "serve-page.png"), full_page=True)

                page.click("#reset")
                expect(page.locator("#log .msg")).to_have_count(0)
                browser.close()
        finally:
            assert server.stop() == 0, server.log()
