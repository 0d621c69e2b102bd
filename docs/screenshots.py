"""Take the README's screenshots of the chat site: a real conversation with the embedded model, in the
light and the dark theme (and on a phone-sized screen), in Debian's headless chromium.

    .venv/bin/python docs/screenshots.py

Needs `make dev` and chromium (`apt-get install chromium`). Writes docs/screenshots/*.png.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from playwright.sync_api import Page, sync_playwright

from tertulia.engine.engine import Engine
from tertulia.models import registry
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store

OUT = Path(__file__).resolve().parent / "screenshots"
QUESTIONS = ["How do I reverse a list in Python? Show me code.", "And how do I sort it?"]
EARLIER = ["What is the capital of France?", "Tips to learn Spanish", "Write a haiku about the sea"]


def serve() -> tuple[str, uvicorn.Server]:
    model = registry.load("smollm2-135m")
    engine = Engine(model, quantization=registry.pick_quantization(model), max_batch=4)
    store = Store(open_store(f"sqlite:///{Path(tempfile.mkdtemp()) / 'shots.db'}"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app([LocalProvider(engine)], store=store)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return url, server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not start")


def ask(page: Page, text: str) -> None:
    before = int(page.evaluate("() => Number(document.body.dataset.replies || 0)"))
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"() => Number(document.body.dataset.replies || 0) > {before}", timeout=300_000)


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    url, server = serve()
    OUT.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        for question in EARLIER:  # a few conversations for the sidebar
            page.goto(url)
            page.wait_for_selector("body[data-ready='true']")
            ask(page, question)
        page.goto(url)
        page.wait_for_selector("body[data-ready='true']")
        for question in QUESTIONS:
            ask(page, question)
        conversation = page.url
        for theme in ("light", "dark"):
            context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme=theme)
            shot = context.new_page()
            shot.goto(conversation)
            shot.wait_for_selector("body[data-ready='true']")
            shot.locator(".message.user").first.scroll_into_view_if_needed()
            shot.screenshot(path=str(OUT / f"chat-{theme}.png"))
            context.close()
        phone = browser.new_context(viewport={"width": 390, "height": 800}, is_mobile=True)
        shot = phone.new_page()
        shot.goto(conversation)
        shot.wait_for_selector("body[data-ready='true']")
        shot.screenshot(path=str(OUT / "chat-phone.png"))
        browser.close()
    server.should_exit = True
    print(f"wrote {', '.join(p.name for p in sorted(OUT.glob('*.png')))} in {OUT}")


if __name__ == "__main__":
    main()
