"""API keys, body-size limit and the bounded queue, on a server of a tiny random model."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider, ServedModel
from tertulia.server.app import create_app
from tests.server.conftest import running
from tests.server.openapi_schema import validate


@pytest.fixture
def tiny_served(make_tiny_model) -> ServedModel:
    return ServedModel(LocalProvider(Engine(make_tiny_model(max_position_embeddings=4096), max_batch=4)))


def chat_body(model: str, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_api_keys_guard_v1_but_not_health(tiny_served: ServedModel) -> None:
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


def test_oversized_and_undecodable_bodies(tiny_served: ServedModel) -> None:
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


def test_full_queue_answers_429_with_retry_after(tiny_served: ServedModel) -> None:
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
