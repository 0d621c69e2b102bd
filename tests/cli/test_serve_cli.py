"""`tertulia serve` as a user starts it: a real process on loopback, with an API key."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys

import httpx
import openai
import pytest

from tertulia.store.database import Database
from tests.answers import PARIS_QUESTIONS, assert_mostly
from tests.server.conftest import free_port, wait_until_serving

pytestmark = pytest.mark.slow


def test_serve_answers_with_a_key_and_stops_on_sigterm(embedded_dir, tmp_path) -> None:
    port = free_port()
    database = tmp_path / "chats.db"
    env = dict(os.environ, TERTULIA_API_KEYS="k1,k2")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tertulia",
            "serve",
            "--port",
            str(port),
            "--max-batch",
            "4",
            "--kv-memory",
            "64MiB",
            "--database-url",
            f"sqlite:///{database}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        # The store was opened and migrated on start.
        with sqlite3.connect(database) as connection:
            revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        assert revision == [(Database(f"sqlite:///{tmp_path / 'other.db'}").head(),)]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        # The chat site is served by the same process, with every asset it needs.
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and '<script type="module" src="/static/js/app.js">' in page.text
        assert httpx.get(f"{url}/static/js/markdown.js").status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k2", max_retries=0)
        replies = [
            client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": q}], temperature=0
            )
            for q in PARIS_QUESTIONS
        ]
        assert_mostly([r.choices[0].message.content for r in replies], "Paris")
        # 64 MiB of KV memory holds 91 blocks of 16 positions at 45 KiB each: that bounds the context.
        with pytest.raises(openai.BadRequestError, match="context is 1456 tokens"):
            client.completions.create(model="smollm2-135m", prompt=[17] * 1400, max_tokens=100)
    finally:
        process.terminate()
        code = process.wait(30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says how it ended.
    assert code in (0, -15)
    assert "Traceback" not in (process.stderr.read() if process.stderr else "")


def test_serve_refuses_a_public_address_without_keys() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tertulia", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "TERTULIA_API_KEYS"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: Refusing to serve on 0.0.0.0")


@pytest.mark.parametrize(
    ("size", "message"), [("lots", "Cannot read 'lots' as a size."), ("0", "A size must be more than zero")]
)
def test_serve_rejects_an_unusable_kv_memory(size: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tertulia", "serve", "--port", str(free_port()), "--kv-memory", size],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {message}")


def test_serve_rejects_an_unsupported_database_before_loading_models() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tertulia",
            "serve",
            "--port",
            str(free_port()),
            "--database-url",
            "mysql://a@b/c",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: Unsupported database 'mysql'.")
    assert "Loading" not in result.stderr


def test_serve_with_auth_prints_a_setup_link_that_makes_the_admin(embedded_dir, tmp_path) -> None:
    """What an operator does on a fresh --auth server: open the printed link (here: its token) and
    register; the link works once. With --public-metrics, /metrics needs no login."""
    port = free_port()
    command = [sys.executable, "-m", "tertulia", "serve", "--port", str(port), "--auth", "--public-metrics"]
    command += ["--database-url", f"sqlite:///{tmp_path / 'accounts.db'}", "--max-batch", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert process.stderr is not None
        printed = []
        for line in process.stderr:
            printed.append(line)
            if "?setup=" in line:
                break
        token = re.search(r"\?setup=([A-Za-z0-9_-]+)", "".join(printed))
        assert token, "".join(printed)
        wait_until_serving(process, url)
        admin = {"name": "ana", "password": "correct horse", "setup_token": token.group(1)}
        guess = httpx.post(f"{url}/api/auth/register", json=dict(admin, setup_token="guess"))
        assert guess.status_code == 403
        first = httpx.post(f"{url}/api/auth/register", json=admin)
        assert first.status_code == 201 and first.json()["is_admin"] is True
        again = httpx.post(f"{url}/api/auth/register", json=dict(admin, name="eve"))
        assert again.status_code in (401, 403)  # spent: now only an admin adds accounts
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/openapi.json").status_code == 401
    finally:
        process.terminate()
        process.wait(30)
