"""What can be done to messages in the page, and how refusals are shown: ratings, copying, a message
that is too long, and the notice when a conversation outgrows the model's context."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tests.e2e.conftest import WebServer, export_of
from tests.e2e.test_web_chat import open_site
from tests.server.conftest import running

pytestmark = pytest.mark.slow

CODE_REPLY = "Try this:\n\n```python\nprint('hola')\n```\n"


def test_thumbs_up_and_down_are_stored_and_can_be_taken_back(page, web) -> None:
    cid = web.import_conversation(export_of(("user", "Rate me"), ("assistant", "A reply")))
    open_site(page, web, f"/c/{cid}")
    reply_id = page.locator(".message.assistant").get_attribute("data-id")
    page.click(".message.assistant .rate-up")
    page.wait_for_selector(".message.assistant .rate-up.active")
    assert web.conversation(cid)["ratings"] == {reply_id: 1}
    page.click(".message.assistant .rate-down")
    page.wait_for_selector(".message.assistant .rate-down.active")
    assert web.conversation(cid)["ratings"] == {reply_id: -1}
    page.click(".message.assistant .rate-down")  # again: no rating
    page.wait_for_selector(".message.assistant .rate-down:not(.active)")
    assert web.conversation(cid)["ratings"] == {}


def test_copy_a_code_block_and_a_message(browser, web) -> None:
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    cid = web.import_conversation(export_of(("user", "Show code"), ("assistant", CODE_REPLY)))
    open_site(page, web, f"/c/{cid}")
    page.click(".copy-code")
    page.wait_for_selector(".copy-code.flashed")
    assert page.evaluate("() => navigator.clipboard.readText()") == "print('hola')"
    page.click(".message.assistant .copy-message")
    page.wait_for_function("async () => (await navigator.clipboard.readText()).startsWith('Try this:')")
    assert page.evaluate("() => navigator.clipboard.readText()") == CODE_REPLY
    context.close()


def test_a_message_too_long_is_refused_with_a_message_and_kept(page, web) -> None:
    open_site(page, web)
    with web.api() as client:
        before = len(client.get("/conversations").json())
    text = "word " * 20_001  # over the 100,000-character limit
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('#toast').textContent.includes('at most 100000')")
    page.wait_for_function(f"() => document.querySelector('#input').value.length === {len(text)}")
    assert "/c/" not in page.url  # still a new, unsaved chat
    with web.api() as client:
        assert len(client.get("/conversations").json()) == before  # nothing was left behind


@pytest.fixture
def small_context(make_tiny_model, tmp_path: Path) -> Iterator[WebServer]:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=256), max_batch=2))
    store = Store(open_store(f"sqlite:///{tmp_path / 'small.db'}"))
    with running(create_app([served], store=store)) as url:
        yield WebServer(url, served, store)


def test_the_context_meter_and_its_notice_when_old_turns_are_left_out(page, small_context) -> None:
    web = small_context
    turns = []
    for i in range(12):
        turns += [
            ("user", f"Question {i} with a few words in it."),
            ("assistant", f"Answer {i}, also wordy."),
        ]
    cid = web.import_conversation(export_of(*turns))
    open_site(page, web, f"/c/{cid}")
    page.wait_for_selector("#notice:not([hidden])")
    assert "left out to fit the model's context" in page.locator("#notice").inner_text()
    label = page.locator(".meter-label").inner_text()
    used, context = (int(n) for n in label.removesuffix(" tokens").split(" / "))
    # What is sent fills the context but for the room kept for the reply (a quarter by default).
    assert context == 256 and 256 // 2 < used <= 256 - 256 // 4
    width = page.evaluate("() => parseFloat(document.querySelector('.meter-fill').style.width)")
    assert abs(width - 100 * used / context) < 0.1
