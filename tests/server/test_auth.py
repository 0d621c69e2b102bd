"""`--auth` on a live server: accounts, session cookies with CSRF, per-user API keys, and isolation."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.server import throttle
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tests.server.conftest import running

SETUP = "operator-setup-token"
FIRST = {"name": "ana", "password": "correct horse", "setup_token": SETUP}


@pytest.fixture
def site(make_tiny_model, tmp_path: Path) -> Iterator[tuple[str, Store]]:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=2048), max_batch=2))
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([served], store=store, auth=True, setup_token=SETUP)) as url:
        yield url, store


def browser(url: str, name: str, password: str) -> httpx.Client:
    """A logged-in client that sends the CSRF header, as the web page does."""
    client = httpx.Client(base_url=url, timeout=60)
    response = client.post("/api/auth/login", json={"name": name, "password": password})
    assert response.status_code == 200, response.text
    client.headers["X-CSRF-Token"] = response.json()["csrf_token"]
    return client


def test_first_account_is_admin_and_only_an_admin_adds_accounts(site) -> None:
    url, store = site
    # A logged-out page learns that it must log in, and that registration is open (no account yet).
    assert httpx.get(f"{url}/api/auth/me").json() == {"auth": True, "user": None, "first_account": True}
    # The first visitor is not the admin: the operator's one-time setup token is.
    for token in (None, "guess", SETUP[:-1]):
        stranger = httpx.post(f"{url}/api/auth/register", json=dict(FIRST, name="eve", setup_token=token))
        assert stranger.status_code == 403 and stranger.json()["error"]["code"] == "setup_token_required"
    first = httpx.post(f"{url}/api/auth/register", json=FIRST)
    assert first.status_code == 201 and first.json()["is_admin"] is True
    assert store.user_by_name("ana").password_hash.startswith("$argon2id$")
    assert httpx.get(f"{url}/api/auth/me").json()["first_account"] is False
    closed = httpx.post(f"{url}/api/auth/register", json={"name": "eve", "password": "let me in!"})
    assert closed.status_code == 401  # registration closed: log in as the admin
    ana = browser(url, "ana", "correct horse")
    added = ana.post("/api/auth/register", json={"name": "bruno", "password": "another pass"})
    assert added.status_code == 201 and added.json()["is_admin"] is False
    bruno = browser(url, "bruno", "another pass")
    assert bruno.post("/api/auth/register", json={"name": "x", "password": "12345678"}).status_code == 403
    short = ana.post("/api/auth/register", json={"name": "carla", "password": "short"})
    assert short.status_code == 400 and "at least 8" in short.json()["error"]["message"]


def test_login_cookie_csrf_and_logout(site) -> None:
    url, _ = site
    httpx.post(f"{url}/api/auth/register", json=FIRST)
    assert httpx.get(f"{url}/api/conversations").status_code == 401
    wrong = httpx.post(f"{url}/api/auth/login", json={"name": "ana", "password": "wrong horse"})
    assert wrong.status_code == 401
    assert (
        httpx.post(f"{url}/api/auth/login", json={"name": "nobody", "password": "x" * 8}).status_code == 401
    )
    login = httpx.post(f"{url}/api/auth/login", json={"name": "ana", "password": "correct horse"})
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    client = httpx.Client(base_url=url, cookies=login.cookies)
    assert client.get("/api/conversations").json() == []
    # A state-changing request without the CSRF token (what a forged cross-site form sends) is refused.
    forged = client.post("/api/conversations", json={})
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "csrf"
    client.headers["X-CSRF-Token"] = "wrong"
    assert client.post("/api/conversations", json={}).status_code == 403
    client.headers["X-CSRF-Token"] = login.json()["csrf_token"]
    assert client.post("/api/conversations", json={}).status_code == 201
    assert client.get("/api/auth/me").json()["user"]["name"] == "ana"
    assert client.post("/api/auth/logout").status_code == 204
    stale = httpx.Client(base_url=url, cookies=login.cookies)
    assert stale.get("/api/conversations").status_code == 401  # the session is gone server-side


def test_one_account_never_reaches_another_accounts_conversation(site) -> None:
    url, _ = site
    httpx.post(f"{url}/api/auth/register", json=FIRST)
    ana = browser(url, "ana", "correct horse")
    ana.post("/api/auth/register", json={"name": "bruno", "password": "another pass"})
    bruno = browser(url, "bruno", "another pass")
    conversation = ana.post("/api/conversations", json={"settings": {"max_tokens": 2}}).json()["id"]
    with ana.stream(
        "POST", f"/api/conversations/{conversation}/reply", json={"content": "my secret"}
    ) as reply:
        assert reply.status_code == 200
        reply.read()
    message = ana.get(f"/api/conversations/{conversation}").json()["messages"][1]["id"]
    by_url = [
        bruno.get(f"/api/conversations/{conversation}"),
        bruno.get(f"/api/conversations/{conversation}/export"),
        bruno.patch(f"/api/conversations/{conversation}", json={"title": "mine"}),
        bruno.delete(f"/api/conversations/{conversation}"),
        bruno.post(f"/api/conversations/{conversation}/reply", json={"content": "hi"}),
        bruno.post(f"/api/conversations/{conversation}/branch", json={"message_id": message}),
        bruno.post(f"/api/messages/{message}/rating", json={"rating": -1}),
    ]
    assert [r.status_code for r in by_url] == [404] * len(by_url)
    assert bruno.get("/api/conversations", params={"search": "secret"}).json() == []
    assert [m["content"] for m in ana.get(f"/api/conversations/{conversation}").json()["messages"]][
        0
    ] == "my secret"


def test_per_user_api_keys_for_v1_and_api(site) -> None:
    url, _ = site
    httpx.post(f"{url}/api/auth/register", json=FIRST)
    ana = browser(url, "ana", "correct horse")
    created = ana.post("/api/keys", json={"name": "laptop"}).json()
    secret = created["key"]
    assert secret.startswith("tt-") and created["prefix"] == secret[:10]
    assert [k["name"] for k in ana.get("/api/keys").json()] == ["laptop"]
    assert "key" not in ana.get("/api/keys").json()[0]  # shown once, never listed
    assert httpx.get(f"{url}/v1/models").status_code == 401
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
    assert len(client.models.list().data) == 1
    headers = {"Authorization": f"Bearer {secret}"}
    assert (
        httpx.post(f"{url}/api/conversations", json={}, headers=headers).status_code == 201
    )  # no CSRF: not a cookie
    assert ana.delete(f"/api/keys/{created['id']}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert httpx.get(f"{url}/api/conversations", headers=headers).status_code == 401


def test_metrics_and_the_schema_are_for_logged_in_users(site) -> None:
    url, _ = site
    for path in ("/metrics", "/openapi.json"):
        assert httpx.get(f"{url}{path}").status_code == 401, path
    httpx.post(f"{url}/api/auth/register", json=FIRST)
    ana = browser(url, "ana", "correct horse")
    for path in ("/metrics", "/openapi.json"):
        assert ana.get(path).status_code == 200, path


def test_two_racing_first_registrations_make_one_admin(make_tiny_model, tmp_path: Path) -> None:
    served = LocalProvider(Engine(make_tiny_model(), max_batch=2))
    store = Store(open_store(f"sqlite:///{tmp_path / 'race.db'}"))
    with running(create_app([served], store=store, auth=True, setup_token=SETUP)) as url:

        def register(name: str) -> int:
            body = dict(FIRST, name=name)
            return httpx.post(f"{url}/api/auth/register", json=body, timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(register, [f"user{i}" for i in range(8)]))
    assert sorted(statuses) == [201] + [403] * 7
    assert sum(store.user_by_name(f"user{i}") is not None for i in range(8)) == 1


def test_password_guessing_is_throttled(site) -> None:
    url, _ = site
    httpx.post(f"{url}/api/auth/register", json=FIRST)
    wrong = {"name": "ana", "password": "not the password"}
    answers = [
        httpx.post(f"{url}/api/auth/login", json=wrong) for _ in range(throttle.FAILURES_PER_ACCOUNT + 1)
    ]
    assert [a.status_code for a in answers] == [401] * throttle.FAILURES_PER_ACCOUNT + [429]
    assert 1 <= int(answers[-1].headers["retry-after"]) <= throttle.WINDOW_SECONDS
    assert answers[-1].json()["error"]["code"] == "login_throttled"
    # Even the right password waits: a guesser must not learn it was right.
    assert httpx.post(f"{url}/api/auth/login", json=FIRST | {"setup_token": None}).status_code in (
        422,
        400,
        429,
    )
    right = {"name": "ana", "password": "correct horse"}
    assert httpx.post(f"{url}/api/auth/login", json=right).status_code == 429


def test_the_throttle_windows() -> None:
    now = [0.0]
    limits = throttle.LoginThrottle(clock=lambda: now[0])
    for _ in range(throttle.FAILURES_PER_ACCOUNT):
        assert limits.retry_after("Ana ", "10.0.0.1") == 0  # counted until it succeeds
    assert limits.retry_after("ana", "10.0.0.2") == throttle.WINDOW_SECONDS  # by name, any address
    assert limits.retry_after("bruno", "10.0.0.1") == 0  # another account from the same address
    now[0] = throttle.WINDOW_SECONDS + 0.5
    assert limits.retry_after("ana", "10.0.0.1") == 0  # the window slid past the failures
    limits.succeeded("ana")
    for i in range(throttle.ATTEMPTS_PER_ADDRESS):
        assert limits.retry_after(f"name{i}", "10.0.0.9") == 0
    assert limits.retry_after("one more", "10.0.0.9") > 0  # one address, many names


def test_change_password_and_log_out_everywhere(site) -> None:
    url, _ = site
    httpx.post(f"{url}/api/auth/register", json=FIRST)
    laptop, phone = browser(url, "ana", "correct horse"), browser(url, "ana", "correct horse")
    key = laptop.post("/api/keys", json={"name": "script"}).json()["key"]
    with_key = httpx.post(
        f"{url}/api/auth/password",
        json={"current": "correct horse", "new": "taken over!"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert with_key.status_code == 403  # a leaked key cannot guess the password or change it
    wrong = laptop.post("/api/auth/password", json={"current": "nope", "new": "a new password"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "current"
    short = laptop.post("/api/auth/password", json={"current": "correct horse", "new": "short"})
    assert short.status_code == 400 and "at least 8" in short.json()["error"]["message"]
    assert (
        laptop.post(
            "/api/auth/password", json={"current": "correct horse", "new": "a new password"}
        ).status_code
        == 204
    )
    for client in (laptop, phone):  # every session ended
        assert client.get("/api/conversations").status_code == 401
    assert (
        httpx.post(f"{url}/api/auth/login", json={"name": "ana", "password": "correct horse"}).status_code
        == 401
    )
    tablet, desktop = browser(url, "ana", "a new password"), browser(url, "ana", "a new password")
    assert tablet.post("/api/auth/logout-everywhere").status_code == 204
    assert desktop.get("/api/conversations").status_code == 401
    # Keys are not sessions: a script keeps working until its key is revoked.
    assert (
        httpx.get(f"{url}/api/conversations", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    )


def test_an_admin_disables_and_enables_an_account(site) -> None:
    url, _ = site
    httpx.post(f"{url}/api/auth/register", json=FIRST)
    ana = browser(url, "ana", "correct horse")
    bruno_id = ana.post("/api/auth/register", json={"name": "bruno", "password": "another pass"}).json()["id"]
    bruno = browser(url, "bruno", "another pass")
    key = bruno.post("/api/keys", json={"name": "k"}).json()["key"]
    bearer = {"Authorization": f"Bearer {key}"}
    assert bruno.post(f"/api/users/{bruno_id}/disable").status_code == 403  # not an admin
    assert bruno.get("/api/users").status_code == 403
    disabled = ana.post(f"/api/users/{bruno_id}/disable")
    assert disabled.status_code == 200 and disabled.json()["disabled"] is True
    assert bruno.get("/api/conversations").status_code == 401  # the session ended
    assert httpx.get(f"{url}/api/conversations", headers=bearer).status_code == 401  # the key too
    login = httpx.post(f"{url}/api/auth/login", json={"name": "bruno", "password": "another pass"})
    assert login.status_code == 401
    ana_id = ana.get("/api/auth/me").json()["user"]["id"]
    only_admin = ana.post(f"/api/users/{ana_id}/disable")
    assert only_admin.status_code == 400 and "only admin" in only_admin.json()["error"]["message"]
    assert {u["name"]: u["disabled"] for u in ana.get("/api/users").json()} == {"ana": False, "bruno": True}
    assert ana.post(f"/api/users/{bruno_id}/enable").json()["disabled"] is False
    assert httpx.get(f"{url}/api/conversations", headers=bearer).status_code == 200
    assert ana.post(f"/api/users/{'0' * 32}/disable").status_code == 404
