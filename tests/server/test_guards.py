"""API keys, body-size limit and the bounded queue, on a server of a tiny random model."""

from __future__ import annotations

import re
import threading

import httpx
import openai
import pytest

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tests.server.conftest import running
from tests.server.openapi_schema import validate


@pytest.fixture
def tiny_served(make_tiny_model) -> LocalProvider:
    return LocalProvider(Engine(make_tiny_model(max_position_embeddings=4096), max_batch=4))


def chat_body(model: str, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_api_keys_guard_v1_but_not_health(tiny_served: LocalProvider) -> None:
    with running(create_app([tiny_served], api_keys={"s3cret", "other"})) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert response.status_code == 401
            validate(response.json(), "ErrorResponse")
            assert response.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == [tiny_served.name]
        reply = client.chat.completions.create(**chat_body(tiny_served.name, max_tokens=3))
        assert reply.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_oversized_and_undecodable_bodies(tiny_served: LocalProvider) -> None:
    with running(create_app([tiny_served])) as url:
        huge = chat_body(tiny_served.name)
        huge["messages"][0]["content"] = "x" * (5 * 1024 * 1024)
        response = httpx.post(f"{url}/v1/chat/completions", json=huge, timeout=60)
        assert response.status_code == 413
        validate(response.json(), "ErrorResponse")

        def chunks():  # no Content-Length: the size is only known by counting
            yield b'{"model": "x", "messages": [{"role": "user", "content": "'
            for _ in range(5 * 1024):
                yield b"x" * 1024
            yield b'"}]}'

        chunked = httpx.post(
            f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in chunked.request.headers
        assert chunked.status_code == 413, chunked.text
        assert chunked.json()["error"]["message"] == "The request body exceeds 4 MB."
        garbage = httpx.post(
            f"{url}/v1/chat/completions",
            content=b'{"model": "\xff\xfe"}',
            headers={"content-type": "application/json"},
        )
        assert garbage.status_code == 400
        validate(garbage.json(), "ErrorResponse")


def test_full_queue_answers_429_with_retry_after(tiny_served: LocalProvider) -> None:
    with running(create_app([tiny_served], max_queue=1)) as url:
        started, release = threading.Event(), threading.Event()

        def long_request() -> None:
            body = chat_body(tiny_served.name, max_tokens=3000, stream=True)
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                for _ in response.iter_lines():
                    started.set()
                    release.wait(60)  # hold the stream open while the second request arrives
                    break

        worker = threading.Thread(target=long_request)
        worker.start()
        assert started.wait(60)
        busy = httpx.post(f"{url}/v1/chat/completions", json=chat_body(tiny_served.name, max_tokens=2))
        release.set()
        worker.join(60)
        assert busy.status_code == 429
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"


def test_only_the_names_it_serves_are_answered(tiny_served: LocalProvider, make_tiny_model, tmp_path) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
    `Host: evil.example`; it is refused before reaching any route."""
    from tertulia.store.conversations import Store
    from tertulia.store.database import open_store

    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([tiny_served], store=store)) as url:
        port = url.rsplit(":", 1)[1]
        for name in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            response = httpx.get(f"{url}/api/conversations", headers={"Host": name})
            assert response.status_code == 400, name
            assert response.json()["error"]["code"] == "host_not_allowed"
            validate(response.json(), "ErrorResponse")
        for name in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            assert httpx.get(f"{url}/api/conversations", headers={"Host": name}).status_code == 200
    another = LocalProvider(Engine(make_tiny_model(), max_batch=2))
    with running(create_app([another], store=store, allowed_hosts=frozenset({"chat.example:443"}))) as url:
        assert httpx.get(f"{url}/api/conversations", headers={"Host": "chat.example"}).status_code == 200
        assert httpx.get(f"{url}/api/conversations", headers={"Host": "localhost"}).status_code == 400


def test_another_sites_page_cannot_change_anything(tiny_served: LocalProvider, tmp_path) -> None:
    from tertulia.store.conversations import Store
    from tertulia.store.database import open_store

    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([tiny_served], store=store)) as url:
        host = url.split("://", 1)[1]
        create = f"{url}/api/conversations"
        port = host.split(":")[1]
        other_port = f"http://127.0.0.1:{int(port) + 1}"  # another program's page on this machine
        for origin in ("https://evil.example", "null", f"http://evil.example:{port}", other_port):
            response = httpx.post(create, json={}, headers={"Origin": origin})
            assert response.status_code == 403, origin
            assert response.json()["error"]["code"] == "cross_origin_refused"
        assert httpx.get(f"{url}/api/conversations").json() == []
        # Reading is not a change; the page's own origin and programs without Origin may write.
        assert httpx.get(create, headers={"Origin": "https://evil.example"}).status_code == 200
        assert httpx.post(create, json={}, headers={"Origin": f"http://{host}"}).status_code == 201
        assert httpx.post(create, json={}).status_code == 201
        chat = chat_body(tiny_served.name, max_tokens=2)
        refused = httpx.post(
            f"{url}/v1/chat/completions", json=chat, headers={"Origin": "https://evil.example"}
        )
        assert refused.status_code == 403


def test_the_served_names_follow_the_bound_address() -> None:
    from tertulia.cli.serve import allowed_hosts

    assert allowed_hosts("127.0.0.1", []) == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("192.168.1.5", ["chat.example"]) == {
        "localhost",
        "127.0.0.1",
        "::1",
        "192.168.1.5",
        "chat.example",
    }
    assert allowed_hosts("0.0.0.0", []) == {"*"}
    assert "chat.example" in allowed_hosts("0.0.0.0", ["chat.example"])


def test_the_api_docs_load_nothing_from_the_internet(tiny_served: LocalProvider) -> None:
    with running(create_app([tiny_served])) as url:
        page = httpx.get(f"{url}/docs")
        assert page.status_code == 200
        sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
        assert sources and all(s.startswith("/") for s in sources), sources
        for source in sources:
            assert httpx.get(f"{url}{source}").status_code == 200, source
        assert httpx.get(f"{url}/openapi.json").json()["info"]["title"] == "Tertulia"
        assert httpx.get(f"{url}/redoc").status_code == 404


@pytest.mark.parametrize("public", [False, True])
def test_metrics_and_the_schema_take_a_key_when_the_server_does(make_tiny_model, public: bool) -> None:
    served = LocalProvider(Engine(make_tiny_model(), max_batch=2))
    with running(create_app([served], api_keys={"k"}, public_metrics=public)) as url:
        key = {"Authorization": "Bearer k"}
        assert httpx.get(f"{url}/metrics").status_code == (200 if public else 401)
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        assert httpx.get(f"{url}/metrics", headers=key).status_code == 200
        assert httpx.get(f"{url}/openapi.json", headers=key).status_code == 200
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == (
            200 if public else 401
        )
