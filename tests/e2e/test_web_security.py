"""Untrusted text stays inert in the page, and with --auth one account never reaches another's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tests.e2e.conftest import export_of, shown
from tests.e2e.test_web_chat import json_file, open_site, send, set_setting
from tests.server.conftest import running

pytestmark = pytest.mark.slow

PAYLOADS = [
    '<img src=x onerror="window.__xss=1">',
    "<script>window.__xss=1</script>",
    "<svg onload=window.__xss=1></svg>",
    '<a href="javascript:window.__xss=1">click me</a>',
    "[a link](javascript:window.__xss=1)",
    "![image](javascript:window.__xss=1)",
    '<iframe src="javascript:window.__xss=1"></iframe>',
    "```html\n<script>window.__xss=1</script>\n```",
]
EVIL = "\n\n".join(PAYLOADS)

INERT = """() => {
  const root = document.querySelector('#app');
  // Our own images (the logo of an empty chat) are the only ones allowed in the chat and the list.
  const bad = [...root.querySelectorAll('#messages script, #messages img:not([src^="/static/"]), '
    + '#messages svg:not(.svg-icon), #messages iframe, #messages object, #messages embed, '
    + '#conversation-list img, #conversation-list script')];
  const handlers = [...root.querySelectorAll('*')].flatMap(
    (e) => [...e.attributes].filter((a) => a.name.startsWith('on')).map((a) => e.tagName + ' ' + a.name));
  const scripted = [...root.querySelectorAll('a[href]')]
    .filter((a) => !/^(https?:|mailto:|\\/)/.test(a.getAttribute('href')));
  return {xss: window.__xss ?? null, bad: bad.map((e) => e.tagName), handlers,
          links: scripted.map((a) => a.getAttribute('href'))};
}"""


def assert_inert(page) -> None:
    found = page.evaluate(INERT)
    assert found == {"xss": None, "bad": [], "handlers": [], "links": []}


def test_the_page_sends_a_strict_content_security_policy(web) -> None:
    response = httpx.get(f"{web.url}/")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "object-src 'none'" in policy and "'unsafe-inline'" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{web.url}/static/js/app.js").headers["content-security-policy"] == policy


def test_xss_in_a_user_message_and_in_a_model_reply_stays_inert(page, web) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    # A reply carrying the payloads, as a model (or an imported file) could produce it.
    cid = web.import_conversation(
        export_of(("user", "Show me HTML."), ("assistant", EVIL), title=PAYLOADS[0])
    )
    open_site(page, web, f"/c/{cid}")
    reply = page.locator(".message.assistant .content")
    text = shown(reply)
    for payload in ('<img src=x onerror="window.__xss=1">', "<script>window.__xss=1</script>", "<svg onload"):
        assert payload in text  # shown as the text it is
    assert shown(reply.locator("pre code")).strip() == "<script>window.__xss=1</script>"
    assert page.locator(f"#conversation-list [data-id='{cid}']").inner_text() == PAYLOADS[0]
    assert_inert(page)

    # The same payloads typed by the user, then answered by the real model.
    set_setting(page, "max_tokens", "8")
    send(page, EVIL)
    assert shown(page.locator(".message.user .content").last) == EVIL
    assert_inert(page)
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    assert_inert(page)
    assert dialogs == []


def test_a_persona_name_with_markup_is_shown_as_text(page, web) -> None:
    with web.api() as client:
        persona = client.post("/personas", json={"name": PAYLOADS[0], "instructions": "x"}).json()
    open_site(page, web)
    assert page.locator(f"#persona-picker option[value='{persona['id']}']").inner_text() == PAYLOADS[0]
    page.select_option("#persona-picker", persona["id"])
    assert PAYLOADS[0] in page.locator(".empty h1").inner_text()
    assert_inert(page)


@pytest.fixture
def auth_site(make_tiny_model, tmp_path: Path) -> Iterator[str]:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=2048), max_batch=4))
    store = Store(open_store(f"sqlite:///{tmp_path / 'accounts.db'}"))
    with running(create_app([served], store=store, auth=True, setup_token="setup-123")) as url:
        yield url


def log_in(page, url: str, name: str, password: str) -> None:
    page.goto(url)
    page.wait_for_selector("#login-dialog[open]")
    page.fill("#login-form [name=name]", name)
    page.fill("#login-form [name=password]", password)
    page.click("#login-submit")
    page.wait_for_selector("body[data-ready='true']")
    assert page.locator("#open-account").inner_text() == name


def create_user(admin_page, name: str, password: str) -> None:  # type: ignore[no-untyped-def]
    """An admin adds an account from the account dialog."""
    admin_page.click("#open-account")
    admin_page.fill("#create-user [name=name]", name)
    admin_page.fill("#create-user [name=password]", password)
    admin_page.click("#create-user button")


def test_with_auth_one_user_cannot_open_anothers_conversation(browser, auth_site: str) -> None:
    url = auth_site
    ana_context, bob_context = browser.new_context(), browser.new_context()
    ana, bob = ana_context.new_page(), bob_context.new_page()
    # The operator opens the setup link the server printed, and registers the admin there.
    ana.goto(f"{url}/?setup=setup-123")
    ana.wait_for_selector("#login-dialog[open]")
    assert ana.locator("#first-account").is_visible()
    ana.fill("#login-form [name=name]", "ana")
    ana.fill("#login-form [name=password]", "correct horse battery")
    ana.click("#login-submit")
    ana.wait_for_selector("body[data-ready='true']")
    ana.set_input_files(
        "#import-file",
        json_file(
            "a.json",
            json.dumps(export_of(("user", "Ana's secret"), ("assistant", "Safe."))).encode(),
        ),
    )
    ana.wait_for_function("() => location.pathname.startsWith('/c/')")
    secret = ana.url.rsplit("/", 1)[1]
    # Ana (admin) creates Bob's account from the account dialog.
    create_user(ana, "bob", "another good password")
    ana.wait_for_selector("#create-user button.flashed")

    log_in(bob, url, "bob", "another good password")
    assert bob.locator("#conversation-list .conversation").count() == 0
    bob.goto(f"{url}/c/{secret}")
    bob.wait_for_selector("body[data-ready='true']")
    bob.wait_for_function("() => document.querySelector('#toast').textContent.includes('does not exist')")
    assert "Ana's secret" not in bob.content()
    statuses = bob.evaluate(
        """async (id) => {
            const me = await (await fetch('/api/auth/me')).json();
            const headers = {'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf_token};
            const get = await fetch(`/api/conversations/${id}`);
            const patch = await fetch(`/api/conversations/${id}`,
                                      {method: 'PATCH', headers, body: '{"title": "mine"}'});
            const del = await fetch(`/api/conversations/${id}`, {method: 'DELETE', headers});
            const exp = await fetch(`/api/conversations/${id}/export`);
            const noCsrf = await fetch('/api/conversations', {method: 'POST', body: '{}',
                                       headers: {'Content-Type': 'application/json'}});
            return [get.status, patch.status, del.status, exp.status, noCsrf.status];
        }""",
        secret,
    )
    assert statuses == [404, 404, 404, 404, 403]
    # Ana still has it, untouched.
    ana.reload()
    ana.wait_for_selector("body[data-ready='true']")
    assert shown(ana.locator(".message.user .content")) == "Ana's secret"
    # Logged out, the page asks for a login again.
    ana.on("dialog", lambda dialog: dialog.accept())
    ana.click("#open-account")
    ana.click("#logout")
    ana.wait_for_selector("#login-dialog[open]")
    assert not ana.locator("#first-account").is_visible()
    ana_context.close()
    bob_context.close()


def test_the_account_dialog_changes_the_password_and_disables_users(browser, auth_site: str) -> None:
    url = auth_site
    httpx.post(
        f"{url}/api/auth/register",
        json={"name": "ana", "password": "correct horse battery", "setup_token": "setup-123"},
    )
    ana_context, bob_context = browser.new_context(), browser.new_context()
    ana, bob = ana_context.new_page(), bob_context.new_page()
    log_in(ana, url, "ana", "correct horse battery")
    create_user(ana, "bob", "another good password")
    ana.wait_for_selector("#user-list li[data-user='bob']")
    log_in(bob, url, "bob", "another good password")
    # The admin disables Bob: his open page loses its session.
    ana.click("#user-list li[data-user='bob'] button")
    ana.wait_for_selector("#user-list li[data-user='bob'].disabled")
    assert bob.evaluate("async () => (await fetch('/api/conversations')).status") == 401
    ana.click("#user-list li[data-user='bob'] button")  # enabled again
    ana.wait_for_selector("#user-list li[data-user='bob']:not(.disabled)")
    # Bob changes his password from his own dialog; he is sent back to the login form.
    log_in(bob, url, "bob", "another good password")
    assert bob.locator("#user-admin").is_hidden()
    bob.click("#open-account")
    assert bob.locator("#user-admin").is_hidden()
    bob.fill("#change-password [name=current]", "another good password")
    bob.fill("#change-password [name=new]", "a brand new secret")
    bob.click("#change-password button")
    bob.wait_for_selector("#login-dialog[open]")
    log_in(bob, url, "bob", "a brand new secret")
    # Log out everywhere ends the other browser's session too.
    other = bob_context.browser.new_context().new_page()
    log_in(other, url, "bob", "a brand new secret")
    bob.click("#open-account")
    bob.click("#logout-everywhere")
    bob.wait_for_selector("#login-dialog[open]")
    assert other.evaluate("async () => (await fetch('/api/conversations')).status") == 401
    ana_context.close()
    bob_context.close()


def test_a_server_with_api_keys_asks_the_page_for_one(browser, make_tiny_model, tmp_path: Path) -> None:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=2048), max_batch=2))
    store = Store(open_store(f"sqlite:///{tmp_path / 'keys.db'}"))
    with running(create_app([served], store=store, api_keys={"the-right-key"})) as url:
        assert httpx.get(f"{url}/api/conversations").status_code == 401
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-form [name=key]", "a-wrong-key")
        page.click("#key-form button")
        page.wait_for_function(
            "() => document.querySelector('#key-error').textContent.includes('invalid API key')"
        )
        page.fill("#key-form [name=key]", "the-right-key")
        page.click("#key-form button")
        page.wait_for_selector("body[data-ready='true']")
        set_setting(page, "max_tokens", "3")
        send(page, "Hello")
        assert page.locator(".message.assistant").count() == 1
        with page.expect_download() as download:
            page.click("#export-md")  # downloads carry the key too
        assert "Hello" in Path(download.value.path()).read_text(encoding="utf-8")
        page.reload()  # the key is remembered in this browser
        page.wait_for_selector("body[data-ready='true']")
        assert page.locator("#key-dialog[open]").count() == 0
        context.close()
