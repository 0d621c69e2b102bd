"""No request can crash the server or spoil anyone else's reply (a tiny random model on loopback)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tertulia.server.schemas import MAX_PROMPTS
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tests.server.conftest import running
from tests.server.openapi_schema import validate

STREAMS = 16


@pytest.fixture
def server(make_tiny_model, tmp_path: Path) -> Iterator[tuple[str, LocalProvider]]:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=2048), max_batch=STREAMS))
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([served], store=store, max_queue=64)) as url:
        yield url, served


def stream_body(model: str, seed: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me story number {seed}."}],
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 24,
        "stream": True,
    }


def stream_text(url: str, body: dict) -> tuple[str, bool]:
    """The streamed text, and whether the stream ended with [DONE]."""
    text, done = [], False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(text), done


def bad_requests(url: str, model: str) -> list[tuple[str, httpx.Response]]:
    """Items 1-5 of the hardening list, each sent as a careless or hostile client would."""
    api = f"{url}/api"
    conversation = httpx.post(f"{api}/conversations", json={}).json()["id"]
    export = {"format": "tertulia.conversation", "version": 1, "title": "t"}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    sent = [
        ("seed 1.5 in /api settings", "POST", f"{api}/conversations/{conversation}/reply",
         {"content": "hi", "settings": {"seed": 1.5}}),
        ("seed 1.5 on /v1", "POST", f"{url}/v1/chat/completions", dict(chat, seed=1.5)),
        ("top_k 2**63", "POST", f"{url}/v1/chat/completions", dict(chat, top_k=2**63)),
        ("1,000 prompts", "POST", f"{url}/v1/completions", {"model": model, "prompt": ["hi"] * 1000}),
        ("imported temperature 'hot'", "POST", f"{api}/conversations/import",
         dict(export, messages=[], settings={"temperature": "hot"})),
        ("imported max_tokens 'many'", "POST", f"{api}/conversations/import",
         dict(export, messages=[], settings={"max_tokens": "many"})),
        ("import parent_id []", "POST", f"{api}/conversations/import",
         dict(export, messages=[{"id": "a", "parent_id": [], "role": "user", "content": "x"}])),
        ("logit_bias '²' on /v1/completions", "POST", f"{url}/v1/completions",
         {"model": model, "prompt": "hi", "logit_bias": {"²": 1}}),
        ("a 400-character model name", "POST", f"{api}/conversations", {"model": "m" * 400}),
    ]  # fmt: skip
    return [
        (name, httpx.request(method, target, json=body, timeout=60)) for name, method, target, body in sent
    ]


def test_sixteen_streams_finish_untouched_while_bad_requests_arrive(server) -> None:
    url, served = server
    bodies = [stream_body(served.name, seed) for seed in range(STREAMS)]
    solo = [stream_text(url, body)[0] for body in bodies]
    results: list[tuple[str, bool] | None] = [None] * STREAMS

    def run(i: int) -> None:
        results[i] = stream_text(url, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    refused = bad_requests(url, served.name)
    for thread in threads:
        thread.join(120)
    for name, response in refused:
        assert response.status_code == 400, (name, response.text)
        validate(response.json(), "ErrorResponse")
    assert results == [(text, True) for text in solo]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/api/conversations").json()[0]["model"] is None  # nothing bad was stored


def test_a_list_of_prompts_counts_against_the_queue(make_tiny_model) -> None:
    served = LocalProvider(Engine(make_tiny_model(), max_batch=4))
    with running(create_app([served], max_queue=8)) as url:
        body = {"model": served.name, "max_tokens": 2}
        too_many = httpx.post(f"{url}/v1/completions", json=dict(body, prompt=["hi"] * 9), timeout=60)
        assert too_many.status_code == 429 and "retry-after" in too_many.headers
        over_limit = httpx.post(f"{url}/v1/completions", json=dict(body, prompt=["hi"] * (MAX_PROMPTS + 1)))
        assert over_limit.status_code == 400 and str(MAX_PROMPTS) in over_limit.json()["error"]["message"]
        fits = httpx.post(f"{url}/v1/completions", json=dict(body, prompt=["hi"] * 8), timeout=60)
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 8


def generated_tokens(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("tertulia_generation_tokens_total"):
            return float(line.split()[-1])
    return 0.0


def slowed(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """10 ms more per step: a tiny model's long reply lasts long enough to be interrupted, on any CPU."""
    step = engine.step

    def slow_step() -> list:
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    return engine


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_a_client_that_leaves_a_whole_answer_frees_the_engine(
    make_tiny_model, route: str, monkeypatch
) -> None:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=4096), max_batch=4))
    engine = slowed(served.engine, monkeypatch)
    no_end = {str(token): -100 for token in engine.stop_ids}
    body: dict = {
        "model": served.name,
        "max_tokens": 4000,
        "temperature": 1.0,
        "seed": 1,
        "logit_bias": no_end,
    }
    if route == "chat/completions":
        body["messages"] = [{"role": "user", "content": "Talk for a long time."}]
    else:
        body["prompt"] = ["Once upon a time", "Long ago"]
    with running(create_app([served])) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/{route}", json=body, timeout=1.0)
        assert not engine.idle  # still generating when the client left
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not engine.idle:
            time.sleep(0.1)
        assert engine.idle  # a correctness wait, bounded; no speed is asserted
        assert 0 < generated_tokens(url) < 4000  # it stopped when the client left, not at max_tokens


def test_a_runaway_chat_template_fails_its_request_alone(make_tiny_model) -> None:
    model = make_tiny_model()
    from tertulia.models.chat_template import ChatTemplate

    model.template = ChatTemplate(
        "{% for m in messages %}{% for i in range(100000) %}{{ m['content'] }}{% endfor %}{% endfor %}",
        model.tokenizer,
    )
    served = LocalProvider(Engine(model, max_batch=2))
    with running(create_app([served])) as url:
        body = {"model": served.name, "messages": [{"role": "user", "content": "x" * 100}], "max_tokens": 2}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_queued_stream_hears_from_the_server_while_it_waits(make_tiny_model, monkeypatch) -> None:
    """One slot, taken by a long reply: the next streamed request waits its turn, and gets a first
    byte at once and an SSE comment every HEARTBEAT_SECONDS, so a client's read timeout never fires."""
    from tertulia.server import streaming

    monkeypatch.setattr(streaming, "HEARTBEAT_SECONDS", 0.2)
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=4096), max_batch=1))
    engine = slowed(served.engine, monkeypatch)
    no_end = {str(token): -100 for token in engine.stop_ids}
    long_body = {
        "model": served.name,
        "prompt": "Once",
        "max_tokens": 3000,
        "logit_bias": no_end,
        "stream": True,
    }
    with (
        running(create_app([served])) as url,
        httpx.stream("POST", f"{url}/v1/completions", json=long_body, timeout=60) as first,
    ):
        # Kept in a variable: a discarded line iterator closes the response, and the server stops.
        first_lines = first.iter_lines()
        next(line for line in first_lines if line.startswith("data: "))  # it holds the slot
        waiting = dict(long_body, max_tokens=2)
        with httpx.stream("POST", f"{url}/v1/completions", json=waiting, timeout=2.0) as second:
            comments = 0
            for line in second.iter_lines():
                assert not line.startswith("data: ")  # nothing generated yet: only comments
                comments += line.startswith(":")
                if comments >= 5:
                    break
            assert engine.waiting  # still queued behind the long reply, and heard from 5 times


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_prompts_are_tokenized_off_the_event_loop(make_tiny_model, monkeypatch, route: str) -> None:
    """While one request's prompt is being templated and tokenized (held here until released),
    the server keeps answering others: that work does not run on the event loop."""
    served = LocalProvider(Engine(make_tiny_model(), max_batch=2))
    entered, release = threading.Event(), threading.Event()
    encode_chat, encode_text = served.encode_chat, served.encode_text

    def held(encode):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            entered.set()
            assert release.wait(30)
            return encode(*args, **kwargs)

        return run

    monkeypatch.setattr(served, "encode_chat", held(encode_chat))
    monkeypatch.setattr(served, "encode_text", held(encode_text))
    body: dict = {"model": served.name, "max_tokens": 2}
    if route == "chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    with running(create_app([served])) as url:
        answer: list[int] = []
        sender = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{url}/v1/{route}", json=body, timeout=60).status_code)
        )
        sender.start()
        assert entered.wait(30)
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 200  # served meanwhile
        release.set()
        sender.join(60)
    assert answer == [200]
