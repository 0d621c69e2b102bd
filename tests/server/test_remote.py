"""A remote model: a second Tertulia server on loopback as the upstream of the first."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tertulia.engine.engine import Engine
from tertulia.errors import TertuliaError
from tertulia.providers.local import LocalProvider
from tertulia.providers.remote import RemoteProvider, RemoteReply, parse_spec
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tests.server.conftest import free_port, running
from tests.server.openapi_schema import validate
from tests.server.test_conversations_api import events, new_conversation, send

QUESTION = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def upstream_model(make_tiny_model) -> LocalProvider:
    return LocalProvider(Engine(make_tiny_model(), max_batch=4))


def remote(name: str, url: str, **extra: object) -> RemoteProvider:
    return RemoteProvider(name, f"{url}/v1", backoff=0.01, **extra)  # type: ignore[arg-type]


def test_spec_parsing() -> None:
    assert parse_spec("remote:llama3@http://gpu:8000/v1/") == ("llama3", "http://gpu:8000/v1")
    for bad in ("remote:llama3", "remote:@http://x", "remote:x@ftp://y"):
        with pytest.raises(TertuliaError):
            parse_spec(bad)


def test_requests_pass_through_both_ways(upstream_model: LocalProvider) -> None:
    name = upstream_model.name
    with running(create_app([upstream_model])) as up, running(create_app([remote(name, up)])) as front:
        direct = openai.OpenAI(base_url=f"{up}/v1", api_key="x", max_retries=0)
        proxied = openai.OpenAI(base_url=f"{front}/v1", api_key="x", max_retries=0)
        assert [m.id for m in proxied.models.list().data] == [name]
        params = dict(model=name, messages=QUESTION, temperature=0, max_tokens=12)
        a = direct.chat.completions.create(**params)
        b = proxied.chat.completions.create(**params)
        assert b.choices[0].message.content == a.choices[0].message.content
        assert b.usage.completion_tokens == a.usage.completion_tokens
        validate(b.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
        streamed = proxied.chat.completions.create(**params, stream=True)
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            == a.choices[0].message.content
        )
        legacy = proxied.completions.create(model=name, prompt="Once upon", max_tokens=5, temperature=0)
        assert (
            legacy.choices[0].text
            == direct.completions.create(model=name, prompt="Once upon", max_tokens=5, temperature=0)
            .choices[0]
            .text
        )


def test_upstream_errors_keep_their_status_and_envelope(upstream_model: LocalProvider) -> None:
    name = upstream_model.name
    with running(create_app([upstream_model], api_keys={"k"})) as up:
        with running(create_app([remote(name, up, api_key="k")])) as front:
            long = [{"role": "user", "content": "word " * 400}]  # the tiny model's context is 256
            response = httpx.post(f"{front}/v1/chat/completions", json={"model": name, "messages": long})
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "context_length_exceeded"
        with running(create_app([remote(name, up)])) as front:  # no key for the upstream
            response = httpx.post(f"{front}/v1/chat/completions", json={"model": name, "messages": QUESTION})
            assert response.status_code == 401
            validate(response.json(), "ErrorResponse")


def test_busy_upstream_is_retried_then_reported(upstream_model: LocalProvider) -> None:
    name = upstream_model.name
    with running(create_app([upstream_model], max_queue=0)) as up:
        with running(create_app([remote(name, up, retries=2)])) as front:
            response = httpx.post(f"{front}/v1/chat/completions", json={"model": name, "messages": QUESTION})
            assert response.status_code == 429
            validate(response.json(), "ErrorResponse")
        requests = [
            line
            for line in httpx.get(f"{up}/metrics").text.splitlines()
            if line.startswith("tertulia_requests_total{")
        ]
        assert requests and float(requests[0].rsplit(" ", 1)[1]) == 3  # the first try and 2 retries


def test_unreachable_upstream_is_a_502() -> None:
    closed_port = free_port()  # bound and released: nothing listens there
    with running(create_app([remote("ghost", f"http://127.0.0.1:{closed_port}", retries=1)])) as front:
        for stream in (False, True):
            body = {"model": "ghost", "messages": QUESTION, "stream": stream}
            response = httpx.post(f"{front}/v1/chat/completions", json=body, timeout=30)
            assert response.status_code == 502
            validate(response.json(), "ErrorResponse")
            assert "unreachable" in response.json()["error"]["message"]


def test_a_conversation_with_a_remote_model_streams_and_is_kept(
    upstream_model: LocalProvider, tmp_path
) -> None:
    name = upstream_model.name
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([upstream_model])) as up:
        direct = openai.OpenAI(base_url=f"{up}/v1", api_key="x", max_retries=0)
        expected = direct.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=10)
        front_app = create_app([remote(name, up)], store=store)
        with running(front_app) as front:
            api = f"{front}/api"
            assert httpx.get(f"{api}/models").json() == [
                {"id": name, "local": False, "context_length": None, "default_settings": {}}
            ]
            conversation = new_conversation(api, model=name, settings={"temperature": 0, "max_tokens": 10})
            events = send(api, conversation, content="hello there")
            start, done = events[0], events[-1]
            assert start["context"] is None and start["prompt_tokens"] is None
            text = "".join(e["text"] for e in events if e["type"] == "delta")
            assert text == expected.choices[0].message.content
            assert done["status"] == "complete" and done["finish_reason"] == "length"
            assert done["completion_tokens"] == expected.usage.completion_tokens == 10
            stored = httpx.get(f"{api}/conversations/{conversation}").json()["messages"][1]
            assert stored["content"] == text and stored["model"] == name
            meter = httpx.get(f"{api}/conversations/{conversation}/context").json()
            assert meter["context"] is None
            # An upstream refusal reaches the page as the upstream's error, and nothing is stored.
            refused = httpx.post(
                f"{api}/conversations/{conversation}/reply",
                json={"content": "again", "settings": {"max_tokens": 30000}},
            )
            assert refused.status_code == 400 and "context" in refused.json()["error"]["message"]
            assert len(httpx.get(f"{api}/conversations/{conversation}").json()["messages"]) == 2


class Chunks(httpx.AsyncByteStream):
    """An upstream's response body arriving in the given pieces."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk


def read_events(chunks: list[bytes]) -> tuple[list, RemoteReply]:
    reply = RemoteReply(httpx.Response(200, stream=Chunks(chunks)))

    async def collect() -> list:
        return [e async for e in reply]

    return asyncio.run(collect()), reply


def read_pieces(chunks: list[bytes]) -> list:
    return read_events(chunks)[0]


def chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def test_remote_streams_are_read_whatever_their_line_endings_and_splits() -> None:
    events = [
        chunk("Ho"),
        chunk("la ñ"),
        chunk("", "stop"),
        {"choices": [], "usage": {"completion_tokens": 3}},
    ]
    body = (
        "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"
    )
    raw = body.encode()
    split = [raw[i : i + 7] for i in range(0, len(raw), 7)]  # splits inside lines and inside "ñ"
    pieces, reply = read_events(split)
    assert "".join(p.text for p in pieces) == "Hola ñ"
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["stop"]
    assert reply.usage.completion_tokens == 3  # the upstream's own count replaces the pieces counted
    # A last event with no blank line after it still counts; junk and non-object events are skipped.
    tail = (
        b'data: 5\n\ndata: [1]\n\n: a comment\n\ndata: {"choices": [{"index": 0, "delta": {"content": "x"}}]}'
    )
    assert [p.text for p in read_pieces([tail])] == ["x"]


def test_an_upstream_error_mid_stream_ends_the_reply_with_its_message() -> None:
    body = f"data: {json.dumps(chunk('partial'))}\n\n" + 'data: {"error": {"message": "GPU fell over"}}\n\n'
    pieces = read_pieces([body.encode(), b'data: {"choices": [{"delta": {"content": "never"}}]}\n\n'])
    assert [p.text for p in pieces] == ["partial", ""]
    assert pieces[-1].finish_reason == "error" and pieces[-1].error == "GPU fell over"
    assert [p.text for p in read_pieces([b'data: {"error": null, "choices": []}\n\n'])] == []


def test_a_remote_conversation_whose_upstream_is_down_stores_nothing(tmp_path) -> None:
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    gone = remote("far-away", f"http://127.0.0.1:{free_port()}", retries=1)
    with running(create_app([gone], store=store)) as front:
        api = f"{front}/api"
        conversation = new_conversation(api)  # no model named: the only one served is the default
        refused = httpx.post(f"{api}/conversations/{conversation}/reply", json={"content": "hello?"})
        assert refused.status_code == 502 and "unreachable" in refused.json()["error"]["message"]
        assert httpx.get(f"{api}/conversations/{conversation}").json()["messages"] == []


def test_stopping_a_remote_reply_stops_the_upstream(make_tiny_model, tmp_path) -> None:
    upstream_model = LocalProvider(Engine(make_tiny_model(max_position_embeddings=4096)))
    name = upstream_model.name
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with (
        running(create_app([upstream_model])) as up,
        running(create_app([remote(name, up)], store=store)) as front,
    ):
        api = f"{front}/api"
        conversation = new_conversation(api, settings={"max_tokens": 3000, "temperature": 1.0})
        with httpx.stream(
            "POST", f"{api}/conversations/{conversation}/reply", json={"content": "Go on and on."}, timeout=60
        ) as response:
            stream = events(response)
            assert next(stream)["type"] == "start"
            assert next(stream)["type"] == "delta"
        # The page went away: the front closes its upstream request, whose engine then stops.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not upstream_model.engine.idle:
            time.sleep(0.05)
        assert upstream_model.engine.idle
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            reply = httpx.get(f"{api}/conversations/{conversation}").json()["messages"][-1]
            if reply["status"] != "streaming":
                break
            time.sleep(0.05)
        assert reply["status"] == "incomplete" and reply["completion_tokens"] < 3000
