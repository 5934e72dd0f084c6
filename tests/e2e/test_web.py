"""The web chat in Debian's headless Chromium, driven by Playwright, against the real
gateway, generator and broker: type a message and watch the answer stream in, give it a
thumbs up, switch on compare mode and pick one of two answers — and find the matching
Interaction and Feedback events on Kafka. Screenshots go to artifacts/."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.v1 import events_pb2
from tests.gateway_stack import consume, fresh_topics, gateway_env, generator  # noqa: F401 (fixture)
from tests.procs import ROOT, run_service

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run scripts/install-system-deps.sh (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def gateway_url(tmp_path, generator, broker):
    topics = fresh_topics(broker.bootstrap, "web")
    # sampled answers (temperature 1) so the two compare answers differ
    with run_service("gateway", tmp_path, env=gateway_env(generator, broker.bootstrap, topics.prefix)) as gw:
        yield gw.url, topics


def test_chat_thumbs_and_compare_reach_the_broker(browser, gateway_url, broker):
    url, topics = gateway_url
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    streamed_chunks = []
    page.on("response", lambda r: streamed_chunks.append(r.headers.get("content-type", "")) if "/v1/chat" in r.url else None)
    page.goto(url)
    page.wait_for_function("document.querySelector('#policy').textContent.match(/v\\d+/)")
    policy = page.locator("#policy").inner_text()

    # 1. type, see the answer stream in (the SSE response), then thumbs up
    page.fill("#prompt", "What is the capital of France?")
    page.keyboard.press("Enter")
    page.locator(".answer.done").first.wait_for()
    first = page.locator(".answer").first
    answer = first.locator(".text").text_content()  # exact text, unlike inner_text
    assert answer and not answer.startswith("No answer"), answer
    assert streamed_chunks and streamed_chunks[0].startswith("text/event-stream")
    assert first.locator(".version").inner_text() == policy.removeprefix("policy ")
    rated_id = first.get_attribute("data-response-id")
    first.locator(".thumb-up").click()
    page.locator(".thumb-up.chosen").wait_for()
    assert "good answer" in page.locator("#status").inner_text()

    # 2. compare mode: two answers side by side, pick B
    page.locator(".switch").click()
    page.fill("#prompt", "Tell me a short story.")
    page.locator("#send").click()
    compare = page.locator(".turn.compare")
    compare.locator(".answer.done").nth(1).wait_for()
    a, b = compare.locator(".answer").nth(0), compare.locator(".answer").nth(1)
    box_a, box_b = a.bounding_box(), b.bounding_box()
    assert box_b["x"] > box_a["x"] + box_a["width"] - 1  # side by side on a wide screen
    ids = [a.get_attribute("data-response-id"), b.get_attribute("data-response-id")]
    texts = [a.locator(".text").text_content(), b.locator(".text").text_content()]
    b.locator(".pick").click()
    compare.locator(".answer.picked").wait_for()
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

    # a phone-sized screen stacks the comparison and keeps everything in view
    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)
    phone.goto(url)
    phone.locator(".switch").click()
    phone.fill("#prompt", "Hello from a phone")
    phone.locator("#send").click()
    pair = phone.locator(".turn.compare .answer")
    phone.locator(".turn.compare .answer.done").nth(1).wait_for()
    pa, pb = pair.nth(0).bounding_box(), pair.nth(1).bounding_box()
    assert pb["y"] >= pa["y"] + pa["height"] - 1  # stacked
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    phone.screenshot(path=str(ARTIFACTS / "web-chat-phone.png"))

    # 3. the events on the real broker
    feedback = consume(broker.bootstrap, topics.feedback, events_pb2.Feedback,
                       lambda evs: len(evs) >= 2, group="web-test")
    by_kind = {f.WhichOneof("kind"): f for f in feedback}
    assert len(feedback) == 2 and set(by_kind) == {"rating", "comparison"}
    rating = by_kind["rating"].rating
    assert (rating.response_id, rating.value, rating.response) == (rated_id, 1, answer)
    assert by_kind["rating"].source == "web"
    assert [(m.role, m.content) for m in by_kind["rating"].prompt] == [("user", "What is the capital of France?")]
    comparison = by_kind["comparison"].comparison
    assert (comparison.chosen_id, comparison.rejected_id) == (ids[1], ids[0])
    assert (comparison.chosen, comparison.rejected) == (texts[1], texts[0])
    # the second turn carried the first answer as history, in the same conversation
    compare_prompt = [(m.role, m.content) for m in by_kind["comparison"].prompt]
    assert compare_prompt[0] == ("user", "What is the capital of France?") and compare_prompt[1][0] == "assistant"
    assert by_kind["comparison"].conversation_id == by_kind["rating"].conversation_id

    interactions = consume(broker.bootstrap, topics.interactions, events_pb2.Interaction,
                           lambda evs: len(evs) >= 3, group="web-test")
    assert sorted(len(i.response_ids) for i in interactions) == [1, 2, 2]
