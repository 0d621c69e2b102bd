"""The chat site in a real browser on a live server with the embedded model: streaming, reload,
stop, regenerate, edit and branches, personas, settings, export, two tabs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import export_of, shown

pytestmark = pytest.mark.slow


def replies_done(page) -> int:
    return int(page.evaluate("() => Number(document.body.dataset.replies || 0)"))


def send(page, text: str) -> None:
    """Type a message and press Enter; returns once the reply has streamed and been read back."""
    before = replies_done(page)
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"() => Number(document.body.dataset.replies || 0) > {before}", timeout=120_000)


def open_site(page, web, path: str = "/") -> None:
    page.goto(web.url + path)
    page.wait_for_selector("body[data-ready='true']")


def conversation_id(page) -> str:
    match = re.fullmatch(r".*/c/([\w-]+)", page.url)
    assert match, page.url
    return match.group(1)


def set_setting(page, name: str, value: str) -> None:
    """Change a field of the settings panel and wait until the change is saved."""
    if page.locator("#settings-panel").is_hidden():
        page.click("#open-settings")
    saved = page.evaluate("() => Number(document.body.dataset.settingsSaved || 0)")
    page.fill(f"#settings-form [name={name}]", value)
    page.wait_for_function(f"() => Number(document.body.dataset.settingsSaved || 0) > {saved}")


def start_reply(page, text: str, written: int) -> None:
    """Send a message and return once the reply being written shows more than `written` characters."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(
        f"() => (document.querySelector('.message.writing .content')?.textContent || '').length > {written}"
    )


def test_a_message_streams_is_kept_and_survives_a_reload(page, web) -> None:
    open_site(page, web)
    set_setting(page, "max_tokens", "120")
    # The reply grows while it is being written (streamed), with Stop offered meanwhile.
    start_reply(page, "Write a short poem about the sea.", 0)
    first = page.evaluate("() => document.querySelector('.message.writing .content').textContent.length")
    assert page.locator("#stop").is_visible() and page.locator("#send").is_hidden()
    page.wait_for_function(
        f"() => !document.querySelector('.message.writing') || "
        f"document.querySelector('.message.writing .content').textContent.length > {first}"
    )
    page.wait_for_function("() => Number(document.body.dataset.replies || 0) >= 1", timeout=120_000)
    assert page.locator("#send").is_visible()
    reply = shown(page.locator(".message.assistant .content").last)
    assert len(reply) > first
    assert re.search(r"\d+ tokens · [\d.]+ tok/s", shown(page.locator(".message.assistant .stats")))
    cid = conversation_id(page)
    stored = web.conversation(cid)
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["status"] == "complete"
    # The sidebar names it after the first message, and it is all still there after a reload.
    assert (
        page.locator("#conversation-list .conversation.active").inner_text()
        == "Write a short poem about the sea."
    )
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    assert shown(page.locator(".message.user .content")) == "Write a short poem about the sea."
    assert shown(page.locator(".message.assistant .content")) == reply
    assert "tokens" in page.locator(".meter-label").inner_text()


def test_stop_really_stops_generation_and_keeps_the_partial_reply(page, web) -> None:
    open_site(page, web)
    set_setting(page, "max_tokens", "2000")
    start_reply(page, "Tell me a very long story about a dragon and a knight, with many chapters.", 40)
    page.keyboard.press("Escape")  # Esc stops, like the Stop button
    page.wait_for_selector(".message.assistant .badge.incomplete")
    # Generation stopped on the server: 2000 tokens would take it far longer than this wait.
    assert web.wait_until_idle(timeout=10)
    cid = conversation_id(page)
    reply = web.conversation(cid)["messages"][1]
    assert reply["status"] == "incomplete" and 0 < reply["completion_tokens"] < 2000
    assert shown(page.locator(".message.assistant .content")).strip() == reply["content"].strip()


def test_a_reload_mid_reply_keeps_what_was_written(page, web) -> None:
    open_site(page, web)
    set_setting(page, "max_tokens", "2000")
    start_reply(page, "Write a very long essay about the history of bread, in many parts.", 60)
    cid = conversation_id(page)
    page.reload()  # the tab goes away mid-reply, and comes back
    page.wait_for_selector("body[data-ready='true']")
    # What was generated was saved as it streamed; the cut reply is closed and marked incomplete.
    page.wait_for_selector(".message.assistant .badge.incomplete")
    written = shown(page.locator(".message.assistant .content"))
    assert len(written) > 60
    assert web.wait_until_idle(timeout=10)
    stored = web.conversation(cid)["messages"][1]
    assert stored["status"] == "incomplete" and stored["content"].strip() == written.strip()


def test_regenerate_edit_and_switch_branches(page, web) -> None:
    open_site(page, web)
    set_setting(page, "max_tokens", "24")
    set_setting(page, "temperature", "1")
    send(page, "Name a color.")
    first_reply = page.locator(".message.assistant").get_attribute("data-id")
    before = replies_done(page)
    page.click(".message.assistant .regenerate")
    page.wait_for_function(f"() => Number(document.body.dataset.replies) > {before}", timeout=120_000)
    assistant = page.locator(".message.assistant")
    assert shown(assistant.locator(".branch-label")) == "2/2"
    assert assistant.get_attribute("data-id") != first_reply
    page.click(".message.assistant .branch-prev")
    page.wait_for_function(
        f"() => document.querySelector('.message.assistant').dataset.id === '{first_reply}'"
    )
    assert shown(page.locator(".message.assistant .branch-label")) == "1/2"

    # Editing the question makes a second version of it, with its own answer.
    page.click(".message.user .edit-message")
    page.fill(".edit-box", "Name an animal.")
    before = replies_done(page)
    page.click(".save-edit")
    page.wait_for_function(f"() => Number(document.body.dataset.replies) > {before}", timeout=120_000)
    assert shown(page.locator(".message.user .content")) == "Name an animal."
    assert shown(page.locator(".message.user .branch-label")) == "2/2"
    page.click(".message.user .branch-prev")
    page.wait_for_function(
        "() => document.querySelector('.message.user .content').textContent === 'Name a color.'"
    )
    # The old question keeps its two answers; switching to it shows its newest one.
    assert shown(page.locator(".message.assistant .branch-label")) == "2/2"
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    assert shown(page.locator(".message.user .content")) == "Name a color."


def test_a_persona_gives_the_assistant_its_identity(page, web) -> None:
    open_site(page, web)
    page.click("#open-personas")
    page.fill("#persona-form [name=name]", "Luna")
    page.fill(
        "#persona-form [name=instructions]",
        "You are Luna, a friendly assistant. When asked your name, say: My name is Luna.",
    )
    page.fill("#persona-form [name=temperature]", "0")
    page.click("#persona-form button[type=submit]")
    page.wait_for_selector("#persona-list .persona-chat")
    page.click("#persona-list .persona-chat")
    assert page.locator(".empty h1").inner_text() == "You are talking to Luna."
    assert page.locator("#persona-picker option:checked").inner_text() == "Luna"
    send(page, "What is your name?")
    assert "Luna" in shown(page.locator(".message.assistant .content"))
    stored = web.conversation(conversation_id(page))
    assert stored["persona_id"] is not None


def test_settings_and_system_prompt_are_kept_per_conversation(page, web) -> None:
    open_site(page, web)
    set_setting(page, "temperature", "0")
    set_setting(page, "max_tokens", "5")
    set_setting(page, "system_prompt", "Answer in one word.")
    set_setting(page, "seed", "7")
    send(page, "Say hello.")
    stored = web.conversation(conversation_id(page))
    assert stored["settings"]["max_tokens"] == 5 and stored["settings"]["temperature"] == 0
    assert stored["settings"]["seed"] == 7 and stored["system_prompt"] == "Answer in one word."
    assert stored["messages"][1]["completion_tokens"] <= 5
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    page.click("#open-settings")
    assert page.input_value("#settings-form [name=max_tokens]") == "5"
    assert page.input_value("#settings-form [name=system_prompt]") == "Answer in one word."


def test_sidebar_search_rename_delete(page, web) -> None:
    one = web.import_conversation(export_of(("user", "zebras in the savanna"), ("assistant", "Stripes!")))
    two = web.import_conversation(export_of(("user", "penguins"), ("assistant", "They live in Antarctica.")))
    open_site(page, web)
    page.fill("#search", "antarctica")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#conversation-list .conversation')]"
        f".map(a => a.dataset.id).join() === '{two}'"
    )
    page.fill("#search", "")
    page.wait_for_selector(f"#conversation-list [data-id='{one}']")
    row = page.locator(".conversation-row", has=page.locator(f"[data-id='{one}']"))
    row.hover()
    row.locator(".rename").click()
    page.fill(".rename-box", "Savanna notes")
    page.press(".rename-box", "Enter")
    page.wait_for_selector(f"#conversation-list [data-id='{one}'] >> text=Savanna notes")
    assert web.conversation(one)["title"] == "Savanna notes"
    page.on("dialog", lambda dialog: dialog.accept())
    row = page.locator(".conversation-row", has=page.locator(f"[data-id='{one}']"))
    row.hover()
    row.locator(".delete").click()
    page.wait_for_selector(f"#conversation-list [data-id='{one}']", state="detached")
    with web.api() as client:
        assert client.get(f"/conversations/{one}").status_code == 404


def test_export_json_and_markdown_and_import_back(page, web) -> None:
    cid = web.import_conversation(
        export_of(("user", "Export me"), ("assistant", "**Done**"), title="Exportable")
    )
    open_site(page, web, f"/c/{cid}")
    with page.expect_download() as download:
        page.click("#export-json")
    data = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert [m["content"] for m in data["messages"]] == ["Export me", "**Done**"]
    with page.expect_download() as download:
        page.click("#export-md")
    markdown = Path(download.value.path()).read_text(encoding="utf-8")
    assert markdown.startswith("# Exportable") and "**Done**" in markdown
    page.set_input_files("#import-file", json_file("export.json", json.dumps(data).encode()))
    page.wait_for_function(
        f"() => location.pathname.startsWith('/c/') && !location.pathname.endsWith('{cid}')"
    )
    # The import is a new conversation (a copy), opened once it is stored.
    page.wait_for_function(
        "() => document.querySelector('#conversation-list .conversation.active')?.dataset.id"
        " === location.pathname.slice(3)"
    )
    copy = conversation_id(page)
    assert copy != cid and web.conversation(copy)["title"] == "Exportable"
    assert shown(page.locator(".message.assistant .content strong")) == "Done"


def json_file(name: str, content: bytes) -> dict:
    """A file for an <input type=file>, made in memory."""
    return {"name": name, "mimeType": "application/json", "buffer": content}


def test_an_oversized_or_broken_import_is_refused_with_a_message(page, web) -> None:
    open_site(page, web)
    page.set_input_files("#import-file", json_file("big.json", b"x" * (5 << 20)))
    assert "too large" in page.locator("#toast").inner_text()
    page.set_input_files("#import-file", json_file("bad.json", b"{nope"))
    page.wait_for_function("() => document.querySelector('#toast').textContent.includes('not a Tertulia')")
    page.set_input_files("#import-file", json_file("other.json", b'{"format": "other"}'))
    page.wait_for_function(
        "() => document.querySelector('#toast').textContent.includes('Not a conversation export')"
    )


def test_two_tabs_on_one_conversation_make_branches_not_a_tangle(browser, web) -> None:
    context = browser.new_context()
    first, second = context.new_page(), context.new_page()
    cid = web.import_conversation(export_of(("user", "Hi"), ("assistant", "Hello!")))
    for tab in (first, second):
        open_site(tab, web, f"/c/{cid}")
    for tab, text in ((first, "From the first tab"), (second, "From the second tab")):
        tab.fill("#input", text)
    for tab in (first, second):
        tab.press("#input", "Enter")
    for tab in (first, second):
        tab.wait_for_function("() => Number(document.body.dataset.replies || 0) >= 1", timeout=120_000)
    stored = web.store.path(web.store.local_user().id, cid)
    user_turn = stored[2]
    assert user_turn.count == 2  # both questions answer "Hello!": two versions side by side
    for turn in stored:
        assert turn.message.status == "complete"
    context.close()


def test_page_assets_total_under_one_megabyte(page, web) -> None:
    open_site(page, web)
    sizes = page.evaluate(
        "() => performance.getEntriesByType('resource').concat(performance.getEntriesByType('navigation'))"
        ".filter(e => !e.name.includes('/api/')).map(e => [e.name, e.decodedBodySize])"
    )
    total = sum(size for _, size in sizes)
    names = [name for name, _ in sizes]
    assert any(name.endswith("/static/js/app.js") for name in names)
    assert any(name.endswith("/static/css/app.css") for name in names)
    assert all(name.startswith(web.url) for name in names)  # nothing from another origin
    assert 0 < total < 1_000_000, sizes


def test_phone_sized_screen(browser, web) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    open_site(page, web)
    assert not page.locator("#sidebar").evaluate("e => e.getBoundingClientRect().right > 0")
    page.click("#open-sidebar")
    page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().left >= 0")
    page.click("#scrim", position={"x": 370, "y": 400})  # beside the open sidebar
    page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    composer = page.locator("#composer").bounding_box()
    assert composer["x"] >= 0 and composer["x"] + composer["width"] <= 390
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    context.close()


def test_theme_and_language_are_switchable_and_remembered(page, web) -> None:
    open_site(page, web)
    theme = page.evaluate("() => document.documentElement.dataset.theme")
    page.click("#toggle-theme")
    other = page.evaluate("() => document.documentElement.dataset.theme")
    assert {theme, other} == {"light", "dark"}
    page.select_option("#language", "es")
    assert page.locator("#new-chat").inner_text().endswith("Nuevo chat")
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    assert page.evaluate("() => document.documentElement.dataset.theme") == other
    assert page.get_attribute("#input", "placeholder") == "Escribe a Tertulia…"
    assert page.evaluate("() => document.documentElement.lang") == "es"


def test_shift_enter_is_a_new_line_and_enter_sends(page, web) -> None:
    open_site(page, web)
    set_setting(page, "max_tokens", "4")
    page.click("#input")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#input") == "first line\nsecond line"
    assert "/c/" not in page.url  # nothing sent yet
    before = replies_done(page)
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => Number(document.body.dataset.replies || 0) > {before}", timeout=120_000)
    assert shown(page.locator(".message.user .content")) == "first line\nsecond line"
