"""Browser tests: Debian's chromium driven by Playwright, headless, against live servers on loopback.

Playwright never downloads a browser here: it launches the system chromium (`apt-get install chromium`,
done by `make test`). Where chromium is missing these tests are skipped with a reason pytest prints.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tertulia.engine.engine import Engine
from tertulia.models import registry
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tests.server.conftest import LiveServer, running

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str | None:
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


# Package scope, not session: Playwright's sync API keeps an asyncio loop running on this thread while
# it is open, and the rest of the suite calls asyncio.run().
@pytest.fixture(scope="package")
def browser() -> Iterator[object]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("CHROMIUM IS NOT INSTALLED: browser tests did not run (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    """A fresh browser context (own cookies and storage) with a page; console errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not errors, f"errors in the page: {errors}"


@dataclass
class WebServer(LiveServer):
    """A live server with a store; `api` is an httpx client of its /api (the local user's)."""

    store: Store

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api", timeout=60)

    def conversation(self, conversation_id: str) -> dict:
        with self.api() as client:
            response = client.get(f"/conversations/{conversation_id}")
            response.raise_for_status()
            return response.json()

    def import_conversation(self, data: dict, client: httpx.Client | None = None) -> str:
        owned = client or self.api()
        try:
            response = owned.post("/conversations/import", json=data)
            assert response.status_code == 201, response.text
            return response.json()["id"]
        finally:
            if client is None:
                owned.close()


@pytest.fixture(scope="session")
def web(embedded_dir, tmp_path_factory) -> Iterator[WebServer]:
    """The embedded model served as `tertulia serve` serves it (int4), with an SQLite store."""
    model = registry.load("smollm2-135m")
    engine = Engine(model, quantization=registry.pick_quantization(model), max_batch=8)
    served = LocalProvider(engine)
    store = Store(open_store(f"sqlite:///{tmp_path_factory.mktemp('web') / 'chats.db'}"))
    with running(create_app([served], store=store)) as url:
        yield WebServer(url, served, store)


def shown(locator) -> str:
    """The text a reader sees in `locator`, read once the browser has painted it.

    Messages use `content-visibility: auto`: until the frame after they are (re)built, Chromium skips
    their contents and `innerText` is empty. Two animation frames later their visibility has been
    decided and laid out, so the read is what is on screen."""
    two_frames = "() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
    locator.page.evaluate(two_frames)
    return locator.inner_text()


def export_of(*turns: tuple[str, str], title: str = "Imported chat") -> dict:
    """A conversation export (the import format): one branch of (role, content) turns."""
    messages = []
    for i, (role, content) in enumerate(turns):
        messages.append(
            {"id": f"m{i}", "parent_id": f"m{i - 1}" if i else None, "role": role, "content": content}
        )
    return {"format": "tertulia.conversation", "version": 1, "title": title, "messages": messages}
