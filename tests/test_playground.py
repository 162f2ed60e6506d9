"""The browser playground in a real browser: Debian's Chromium, headless, driven by playwright, against
`python -m server serve` on the tiny checkpoint (the real vLLM engine) with an API key.

Skips, saying why, only where no browser can be had (scripts/install-browser.sh installs Debian's chromium).
Set DSV2_PLAYGROUND_SCREENSHOT=docs/playground.png to keep the screenshot the run takes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_gateway_engine import MODEL, Server, metric, metric_exact, start_server

pytestmark = pytest.mark.engine

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
KEY = "playground-test-key"
# Flags for a closed network: no background traffic, no GPU, no sandbox (root in a container).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
XSS = 'Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script>'


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not installed ({exc}); `make test` installs it")
    if not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: scripts/install-browser.sh installs Debian's chromium")
    return sync_playwright


@pytest.fixture(scope="module")
def server(tiny_lite_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _browser_or_skip()
    # Room for a reply long enough that a stop always finds it still generating, however slow the machine.
    srv = start_server(
        tiny_lite_dir,
        tmp_path_factory.mktemp("playground") / "server.log",
        "--api-keys",
        KEY,
        max_model_len=4096,
    )
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(scope="module")
def browser(server: Server):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server: Server):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.requests = requests
    page.goto(server.url + "/")
    page.wait_for_selector("#status:has-text('API key')")  # the server has keys: the page asks for one
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    yield page
    assert not errors, errors
    assert requests and all(url.startswith(server.url + "/") for url in requests), requests  # nothing leaves
    context.close()


def ignore_eos(route) -> None:
    """Forcing a long reply from a random model: the real request goes to the server with ignore_eos added."""
    body = json.loads(route.request.post_data)
    route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))


def test_chat_streams_and_reports(page, server, tmp_path):
    page.fill("#max_tokens", "24")
    page.fill("#system", "You are terse.")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")  # Enter sends
    reply = page.locator(".msg.assistant").last
    reply.locator(".stats").filter(has_text="completion tokens").wait_for(timeout=60_000)
    stats = reply.locator(".stats").inner_text()
    assert "TTFT" in stats and "tok/s" in stats and "prompt +" in stats, stats
    assert reply.locator(".body").inner_text().strip()
    assert page.locator(".msg.user").first.inner_text().endswith("Hello there")
    # second turn: the conversation goes back with the history
    page.fill("#input", "And again")
    page.press("#input", "Shift+Enter")  # Shift+Enter breaks the line, sends nothing
    assert page.input_value("#input") == "And again\n" and page.locator(".msg.user").count() == 1
    page.press("#input", "Enter")
    page.locator(".msg.assistant .stats").nth(1).filter(has_text="completion tokens").wait_for(timeout=60_000)
    # the API key stays in this tab's sessionStorage, never in localStorage
    assert page.evaluate("sessionStorage.getItem('dsv2-playground-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    shot = Path(os.environ.get("DSV2_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_aborts_the_generation(page, server):
    aborted = metric_exact(server, 'dsv2_aborted_requests_total{reason="client_disconnected"}')
    page.route("**/v1/chat/completions", ignore_eos)
    page.fill("#max_tokens", "4000")
    page.fill("#input", "Tell me a long story")
    page.click("#send")
    reply = page.locator(".msg.assistant").last
    reply.locator(".body p").first.wait_for(timeout=60_000)  # streamed text appeared
    assert metric(server, "dsv2_generation_requests_in_flight") == 1
    page.click("#stop")
    reply.locator(".stats").filter(has_text="stopped").wait_for(timeout=10_000)
    deadline = time.monotonic() + 10
    while metric(server, "dsv2_generation_requests_in_flight") or metric(server, "vllm:num_requests_running"):
        assert time.monotonic() < deadline, "the stopped generation is still running"
        time.sleep(0.1)
    assert metric_exact(server, 'dsv2_aborted_requests_total{reason="client_disconnected"}') == aborted + 1
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_model_output_cannot_inject_html(page):
    """A stub stream (the random model cannot be made to write this) carrying markup and script."""
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": XSS + "\n\n```html\n<b>bold?</b>\n```\n`<i>x</i>`"},
                    "finish_reason": None,
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}},
    ]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=sse),
    )
    page.fill("#input", "anything")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    reply.locator(".stats").filter(has_text="completion tokens").wait_for()
    assert XSS in reply.locator(".body").inner_text()  # shown as text
    assert reply.locator("img, script, b, i").count() == 0
    assert reply.locator("pre code").inner_text() == "<b>bold?</b>"
    assert reply.locator("p code").inner_text() == "<i>x</i>"
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None


def test_phone_sized_screen(browser, server):
    context = browser.new_context(viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server.url + "/playground")
    page.wait_for_selector("#composer")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = page.locator("#send").bounding_box()
    assert box and box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 667
    context.close()


def test_page_headers_and_assets(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "connect-src 'self'" in csp
    for asset in ("/playground/playground.js", "/playground/playground.css"):
        assert httpx.get(server.url + asset).status_code == 200
    html = httpx.get(server.url + "/playground").text
    assert "http://" not in html and "https://" not in html  # no external URL in the page
