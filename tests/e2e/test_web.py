"""The web chat in Debian's headless Chromium, driven by Playwright, against the real
gateway, generator and broker: type a message and watch the answer stream in, give it a
thumbs up, switch on compare mode and pick one of two answers — and find the matching
Interaction and Feedback events on Kafka; regenerate an answer and find the conversation
again after a reload; markdown rendered and the markup in it never run; the stop button
ending the generation in the generator. Screenshots (light, dark, phone) go to artifacts/."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect
from prometheus_client.parser import text_string_to_metric_families

from rlhf.v1 import events_pb2
from tests.gateway_stack import consume, fresh_topics, gateway_env
from tests.procs import ROOT, run_service, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "artifacts"
STORE_KEY = "rlhf-chat-history"  # where app.js keeps the conversations
LONG_ANSWER = 1900  # max_tokens of the stop test: the tiny model's context is 2048


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run scripts/install-system-deps.sh (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tiny_model_dir):
    """The generation service with its /metrics on (the stop test reads them) and room for
    one long answer; it pushes no policy versions, so it need not follow Kafka."""
    env = {
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_BACKEND": "transformers",
        "RLHF_FOLLOW_POLICY_UPDATES": "false",
        "RLHF_MAX_MAX_TOKENS": str(LONG_ANSWER),
    }
    with run_service("generator", tmp_path_factory.mktemp("generator"), env=env, timeout=180) as svc:
        yield svc


@pytest.fixture
def gateway_url(tmp_path, generator, broker):
    topics = fresh_topics(broker.bootstrap, "web")
    # sampled answers (temperature 1) so the two compare answers differ
    with run_service("gateway", tmp_path, env=gateway_env(generator, broker.bootstrap, topics.prefix)) as gw:
        yield gw.url, topics


def stored_conversation(page) -> dict:
    """The open conversation as the page keeps it in localStorage."""
    store = page.evaluate("key => JSON.parse(localStorage.getItem(key))", STORE_KEY)
    return store["conversations"][store["current"]]


def metrics(svc) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_vendored_libraries_match_their_pins():
    """The committed marked/DOMPurify files are the pinned releases (scripts/vendor-web.sh)."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "vendor-web.sh"), "--check"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    page = (ROOT / "services/gateway/static/index.html").read_text()
    for name in ("marked.umd.js", "purify.min.js"):
        assert f'<script src="/static/vendor/{name}"></script>' in page


def test_chat_thumbs_and_compare_reach_the_broker(browser, gateway_url, broker):
    url, topics = gateway_url
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    streamed_chunks = []
    page.on(
        "response", lambda r: streamed_chunks.append(r.headers.get("content-type", "")) if "/v1/chat" in r.url else None
    )
    page.goto(url)
    # (Playwright's string predicates need eval, which the page's CSP refuses: expect() instead)
    expect(page.locator("#policy")).to_have_text(re.compile(r"v\d+"), timeout=60_000)
    policy = page.locator("#policy").inner_text()

    # 1. type (the textarea found by its label), see the answer stream in (the SSE response), then thumbs up
    page.get_by_label("Message", exact=True).fill("What is the capital of France?")
    page.keyboard.press("Enter")
    page.locator(".answer.done").first.wait_for()
    first = page.locator(".answer").first
    answer = stored_conversation(page)["entries"][1]["answers"][0]["text"]  # the raw text, before markdown
    assert answer and not first.locator(".text").text_content().startswith("No answer"), answer
    assert streamed_chunks and streamed_chunks[0].startswith("text/event-stream")
    assert first.locator(".version").inner_text() == policy.removeprefix("policy ")
    rated_id = first.get_attribute("data-response-id")
    up, down = first.locator(".thumb-up"), first.locator(".thumb-down")
    assert (up.get_attribute("aria-pressed"), down.get_attribute("aria-pressed")) == ("false", "false")
    up.click()
    page.locator(".thumb-up.chosen").wait_for()
    assert "good answer" in page.locator("#status").inner_text()
    assert (up.get_attribute("aria-pressed"), down.get_attribute("aria-pressed")) == ("true", "false")
    assert not down.is_disabled()  # the other thumb changes the rating (test_changed_thumb_tie_and_comment...)

    # 2. compare mode: two answers side by side, pick B
    page.locator(".switch").click()
    page.get_by_label("Message", exact=True).fill("Tell me a short story.")
    page.locator("#send").click()
    compare = page.locator(".turn.compare")
    compare.locator(".answer.done").nth(1).wait_for()
    a, b = compare.locator(".answer").nth(0), compare.locator(".answer").nth(1)
    box_a, box_b = a.bounding_box(), b.bounding_box()
    assert box_b["x"] > box_a["x"] + box_a["width"] - 1  # side by side on a wide screen
    ids = [a.get_attribute("data-response-id"), b.get_attribute("data-response-id")]
    texts = [x["text"] for x in stored_conversation(page)["entries"][3]["answers"]]
    b.locator(".pick").click()
    compare.locator(".answer.picked").wait_for()
    assert b.locator(".pick").get_attribute("aria-pressed") == "true"
    assert stored_conversation(page)["entries"][3]["picked"] == 1
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

    # a phone-sized screen stacks the comparison and keeps everything in view
    phone = browser.new_page(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
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
    feedback = consume(
        broker.bootstrap, topics.feedback, events_pb2.Feedback, lambda evs: len(evs) >= 2, group="web-test"
    )
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
    assert compare_prompt == [
        ("user", "What is the capital of France?"),
        ("assistant", answer),
        ("user", "Tell me a short story."),
    ]
    assert by_kind["comparison"].conversation_id == by_kind["rating"].conversation_id

    interactions = consume(
        broker.bootstrap, topics.interactions, events_pb2.Interaction, lambda evs: len(evs) >= 3, group="web-test"
    )
    assert sorted(len(i.response_ids) for i in interactions) == [1, 2, 2]


def test_changed_thumb_tie_and_comment_reach_the_broker(browser, gateway_url, broker):
    """Pressing the other thumb sends a rating that supersedes the first; in compare mode
    "Tie" sends a tie with the comment typed in the turn's comment box."""
    url, topics = gateway_url
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(url)
    page.get_by_label("Message", exact=True).fill("Name a colour.")
    page.keyboard.press("Enter")
    page.locator(".answer.done").wait_for()
    page.locator(".thumb-up").click()
    page.locator(".thumb-up.chosen").wait_for()
    page.locator(".thumb-down").click()
    page.locator(".thumb-down.chosen").wait_for()
    assert "Changed" in page.locator("#status").inner_text()
    assert page.locator(".thumb-up").get_attribute("aria-pressed") == "false"

    page.locator(".switch").click()
    page.get_by_label("Message", exact=True).fill("Another colour?")
    page.locator("#send").click()
    turn = page.locator(".turn.compare")
    turn.locator(".answer.done").nth(1).wait_for()
    turn.locator(".comment").fill("they are equally good")
    turn.locator(".tie").click()
    turn.locator(".tie.chosen").wait_for()
    assert turn.locator(".answer.picked").count() == 2  # a tie marks both
    assert stored_conversation(page)["entries"][3]["picked"] == "tie"
    page.screenshot(path=str(ARTIFACTS / "web-chat-tie.png"), full_page=True)

    feedback = consume(
        broker.bootstrap, topics.feedback, events_pb2.Feedback, lambda evs: len(evs) >= 3, group="web-tie"
    )
    ratings = [f for f in feedback if f.WhichOneof("kind") == "rating"]
    (tie,) = [f for f in feedback if f.WhichOneof("kind") == "comparison"]
    assert [r.rating.value for r in ratings] == [1, -1]
    assert ratings[1].supersedes_event_id == ratings[0].event_id and ratings[0].rater_id.startswith("web:")
    assert tie.comparison.outcome == events_pb2.COMPARISON_OUTCOME_TIE and tie.comment == "they are equally good"


def test_regenerate_and_the_conversation_survives_a_reload(browser, gateway_url, broker):
    url, topics = gateway_url
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(url)
    page.get_by_label("Message", exact=True).fill("Hello there")
    page.keyboard.press("Enter")
    page.locator(".answer.done").wait_for()
    first_id = page.locator(".answer").get_attribute("data-response-id")
    conversation_id = stored_conversation(page)["conversationId"]

    # regenerate: a new answer to the same message replaces the old one, same conversation
    page.locator(".regen").click()  # the old answer leaves the page at once
    page.locator(".answer.done").wait_for()
    assert page.locator(".answer").count() == 1 and page.locator(".msg.user").count() == 1
    second_id = page.locator(".answer").get_attribute("data-response-id")
    conv = stored_conversation(page)
    assert conv["conversationId"] == conversation_id
    assert [e["role"] for e in conv["entries"]] == ["user", "assistant"]
    assert conv["entries"][1]["answers"][0]["id"] == second_id != first_id
    page.locator(".thumb-down").click()
    page.locator(".thumb-down.chosen").wait_for()
    rendered = page.locator(".answer .text").inner_html()

    # a reload shows the same conversation, rating included, and it can go on
    page.reload()
    page.locator(".answer.done").wait_for()
    assert page.locator(".msg.user .bubble").inner_text() == "Hello there"
    assert page.locator(".answer").get_attribute("data-response-id") == second_id
    assert page.locator(".answer .text").inner_html() == rendered
    assert page.locator(".thumb-down").get_attribute("aria-pressed") == "true"
    assert page.locator(".thumb-up").get_attribute("aria-pressed") == "false"
    assert not page.locator(".thumb-up").is_disabled()  # after a reload the rating can still be changed
    assert page.locator("#history option:checked").text_content() == "Hello there"

    # "New chat" starts an empty conversation; the old one stays in the history list
    page.locator("#new-chat").click()
    assert page.locator("#empty").is_visible() and page.locator(".answer").count() == 0
    page.locator("#history").select_option(label="Hello there")
    page.locator(".answer.done").wait_for()
    assert page.locator(".answer").get_attribute("data-response-id") == second_id

    # "Delete" (confirmed) forgets it in this browser
    page.once("dialog", lambda d: d.accept())
    page.locator("#delete-chat").click()
    page.locator("#empty").wait_for()
    assert page.locator("#history option").all_text_contents() == ["New conversation"]
    assert page.evaluate("key => JSON.parse(localStorage.getItem(key)).conversations", STORE_KEY) == {}

    # on the broker: both answers, to the same prompt in the same conversation, and the rating
    interactions = consume(
        broker.bootstrap, topics.interactions, events_pb2.Interaction, lambda evs: len(evs) >= 2, group="web-regen"
    )
    assert sorted(i.response_ids[0] for i in interactions) == sorted([first_id, second_id])
    assert {i.conversation_id for i in interactions} == {conversation_id}
    assert all([(m.role, m.content) for m in i.prompt] == [("user", "Hello there")] for i in interactions)
    feedback = consume(broker.bootstrap, topics.feedback, events_pb2.Feedback, lambda evs: len(evs) >= 1, group="w")
    assert [(f.rating.response_id, f.rating.value) for f in feedback] == [(second_id, -1)]


MARKDOWN_ANSWER = """Here is **bold**, *italic* and `inline code`.

```python
print('hi')
```

| a | b |
|---|---|
| 1 | 2 |

- one
- two

<script>window.__xss = 'script'</script>
<img src="x" onerror="window.__xss = 'img'">
<svg onload="window.__xss = 'svg'"></svg>
<a href="javascript:window.__xss = 'href'">a raw link</a>

[a markdown link](javascript:window.__xss='markdown-link') and [a real one](https://example.org/)
"""


def _seed(page, url: str) -> None:
    """Open the page with a stored conversation whose answer is markdown (the tiny random
    model writes none), the way a reload finds one."""
    conv = {
        "id": "seeded",
        "title": "markdown",
        "updated": 1,
        "conversationId": None,
        "entries": [
            {"role": "user", "content": "Show me markdown"},
            {
                "role": "assistant",
                "picked": None,
                "settled": False,
                "answers": [{"text": MARKDOWN_ANSWER, "id": None, "version": 0, "rating": None, "stopped": False}],
            },
        ],
    }
    page.goto(url)
    page.evaluate(
        "([key, value]) => localStorage.setItem(key, value)",
        [STORE_KEY, json.dumps({"current": "seeded", "conversations": {"seeded": conv}})],
    )
    page.reload()
    page.locator(".answer.done").wait_for()


def _luminance(css_rgb: str) -> float:
    r, g, b = (float(x) for x in css_rgb.removeprefix("rgb(").removesuffix(")").split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_markdown_is_rendered_and_markup_in_it_never_runs(browser, gateway_url):
    url, _ = gateway_url
    ARTIFACTS.mkdir(exist_ok=True)
    light = browser.new_context(viewport={"width": 1100, "height": 800}, color_scheme="light")
    page = light.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    resp = page.goto(url)
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    _seed(page, url)

    answer = page.locator(".answer .text")
    assert answer.locator("strong").inner_text() == "bold"
    assert answer.locator("em").inner_text() == "italic"
    assert answer.locator("li").all_inner_texts() == ["one", "two"]
    assert answer.locator("td").all_inner_texts() == ["1", "2"]
    code = answer.locator("pre code")
    assert code.inner_text().strip() == "print('hi')"
    assert "monospace" in code.evaluate("el => getComputedStyle(el).fontFamily")
    # the sanitizer took out what runs: no script, no handlers, no javascript: links
    assert answer.locator("script").count() == 0
    assert answer.locator("[onerror], [onload]").count() == 0
    hrefs = answer.locator("a").evaluate_all("els => els.map(a => a.getAttribute('href'))")
    assert not any(h and h.lower().startswith("javascript") for h in hrefs), hrefs
    assert "https://example.org/" in hrefs
    assert answer.locator("a[href='https://example.org/']").get_attribute("rel") == "noopener noreferrer"
    answer.locator("a", has_text="a raw link").click()  # its href is gone; clicking runs nothing

    # what a person types is shown as typed, not as HTML (and goes to the model as typed)
    typed = "<img src=x onerror=\"window.__xss = 'user'\"> **not bold**"
    page.get_by_label("Message", exact=True).fill(typed)
    page.keyboard.press("Enter")
    page.locator(".answer.done").nth(1).wait_for()
    bubble = page.locator(".msg.user .bubble").nth(1)
    assert bubble.inner_text() == typed and bubble.locator("img, strong").count() == 0
    assert page.evaluate("window.__xss") is None and dialogs == []

    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "web-chat-markdown-light.png"))
    light_bg = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")

    # dark mode follows the system setting
    dark = browser.new_context(viewport={"width": 1100, "height": 800}, color_scheme="dark")
    dpage = dark.new_page()
    _seed(dpage, url)
    dpage.screenshot(path=str(ARTIFACTS / "web-chat-markdown-dark.png"))
    dark_bg = dpage.evaluate("getComputedStyle(document.documentElement).backgroundColor")
    dark_ink = dpage.locator(".answer .text").evaluate("el => getComputedStyle(el).color")
    assert _luminance(dark_bg) < 60 < 200 < _luminance(light_bg), (dark_bg, light_bg)
    assert _luminance(dark_ink) > 150, dark_ink  # light text on the dark panel
    assert dpage.evaluate("window.__xss") is None
    light.close()
    dark.close()


@pytest.fixture
def long_gateway(tmp_path, generator, broker):
    """A gateway whose default answer is as long as the generator allows: long enough to
    be stopped while it streams."""
    topics = fresh_topics(broker.bootstrap, "web-stop")
    env = gateway_env(
        generator,
        broker.bootstrap,
        topics.prefix,
        RLHF_DEFAULT_MAX_COMPLETION_TOKENS=str(LONG_ANSWER),
        RLHF_MAX_TOKENS_LIMIT=str(LONG_ANSWER),
    )
    with run_service("gateway", tmp_path, env=env) as gw:
        yield gw.url


def test_stop_ends_the_generation_in_the_generator(browser, long_gateway, generator):
    tokens = ("rlhf_generation_tokens_total", (("kind", "completion"),))
    cancelled = ("rlhf_grpc_server_handled_total", (("code", "CANCELLED"), ("method", "GenerateStream")))
    in_flight = ("rlhf_generation_requests_in_flight", ())

    def finished(reason):
        return ("rlhf_generator_finished_total", (("finish_reason", reason),))

    before = metrics(generator)

    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(long_gateway)
    page.get_by_label("Message", exact=True).fill("Count to a thousand.")
    page.keyboard.press("Enter")
    expect(page.locator(".answer.streaming .text")).to_have_text(re.compile(r"\S"), timeout=60_000)
    page.locator("#stop").click()
    page.locator(".answer.done").wait_for()

    # the page: the partial answer kept, marked stopped, not rateable; ready for the next message
    assert page.locator(".answer .note").inner_text() == "Stopped — not rated"
    assert page.locator(".thumb-up").is_disabled()
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    assert page.locator("#status").inner_text() == "Stopped."
    assert stored_conversation(page)["entries"][1]["answers"][0]["stopped"] is True

    # the generator: the gRPC call was cancelled, its sample counted as cancelled (not as
    # ending at max_tokens or EOS), its lease released. The engine drops a cancelled row from
    # the batch at its next decode step (rlhf/generation/hf_backend.py).
    def settled():
        m = metrics(generator)
        ended = m.get(in_flight) == 0 and m.get(cancelled, 0) > before.get(cancelled, 0)
        return m if ended and m.get(finished("cancelled"), 0) > before.get(finished("cancelled"), 0) else None

    after = wait_for(settled, timeout=60, what="the generator counting the stopped call", detail=generator.log)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    handled = {k: v for k, v in after.items() if k[0] == cancelled[0]}
    assert delta(cancelled) == 1, handled
    assert [delta(finished(r)) for r in ("cancelled", "length", "stop")] == [1, 0, 0]
    streamed = delta(tokens)
    print(f"tokens streamed before the stop took effect: {streamed:.0f} of max_tokens={LONG_ANSWER}")
    assert 0 < streamed < LONG_ANSWER
