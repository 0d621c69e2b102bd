"""The web app's /api on a live server: conversations kept in the store, replies streamed and saved."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tests.server.conftest import running
from tests.server.openapi_schema import validate


@pytest.fixture
def server(make_tiny_model, tmp_path: Path) -> Iterator[tuple[str, Store, LocalProvider]]:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=4096), max_batch=4))
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([served], store=store)) as url:
        yield f"{url}/api", store, served


def events(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])


def send(api: str, conversation: str, **body: object) -> list[dict]:
    with httpx.stream(
        "POST", f"{api}/conversations/{conversation}/reply", json=body, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        return list(events(response))


def new_conversation(api: str, **fields: object) -> str:
    response = httpx.post(f"{api}/conversations", json=fields)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_reply_streams_and_is_kept(server) -> None:
    api, _, _ = server
    conversation = new_conversation(api, settings={"max_tokens": 12, "seed": 1})
    stream = send(api, conversation, content="Hello, who are you?")
    start, deltas, done = stream[0], stream[1:-1], stream[-1]
    assert start["type"] == "start" and start["user_message"]["content"] == "Hello, who are you?"
    assert start["context"] == 4096 and start["prompt_tokens"] > 5 and start["dropped"] == 0
    assert done["type"] == "done" and done["status"] == "complete" and done["completion_tokens"] >= 1
    shown = httpx.get(f"{api}/conversations/{conversation}").json()
    assert shown["title"] == "Hello, who are you?"
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]
    reply = shown["messages"][1]
    assert reply["id"] == start["assistant_message_id"]
    assert reply["content"] == "".join(d["text"] for d in deltas)
    assert reply["status"] == "complete" and reply["completion_tokens"] == done["completion_tokens"]
    listed = httpx.get(f"{api}/conversations").json()
    assert [c["id"] for c in listed] == [conversation]
    assert httpx.get(f"{api}/conversations", params={"search": "who are"}).json()[0]["id"] == conversation
    assert httpx.get(f"{api}/conversations", params={"search": "nobody said this"}).json() == []


def test_regenerate_edit_and_switch_branches(server) -> None:
    api, _, _ = server
    conversation = new_conversation(api, settings={"max_tokens": 6, "temperature": 1.0})
    first = send(api, conversation, content="Tell me a joke.")
    question = first[0]["user_message"]["id"]
    send(api, conversation, parent_id=question, regenerate=True)
    shown = httpx.get(f"{api}/conversations/{conversation}").json()["messages"]
    assert shown[1]["branch"]["index"] == 1 and shown[1]["branch"]["count"] == 2
    assert shown[1]["id"] != first[0]["assistant_message_id"]
    back = httpx.post(
        f"{api}/conversations/{conversation}/branch", json={"message_id": first[0]["assistant_message_id"]}
    ).json()
    assert back[1]["id"] == first[0]["assistant_message_id"] and back[1]["branch"]["index"] == 0
    edited = send(api, conversation, content="Tell me a riddle.", parent_id=None)  # edit the first message
    shown = httpx.get(f"{api}/conversations/{conversation}").json()["messages"]
    assert shown[0]["content"] == "Tell me a riddle." and shown[0]["branch"]["count"] == 2
    assert shown[1]["id"] == edited[0]["assistant_message_id"]


def test_stop_keeps_the_partial_reply_and_a_reload_sees_it_streaming(server) -> None:
    api, store, served = server
    conversation = new_conversation(api, settings={"max_tokens": 3000})
    received = ""
    with httpx.stream(
        "POST", f"{api}/conversations/{conversation}/reply", json={"content": "Write a lot."}, timeout=60
    ) as response:
        stream = events(response)
        start = next(stream)
        received += next(stream)["text"]
        time.sleep(0.8)  # the server keeps generating and saving meanwhile
        during = httpx.get(f"{api}/conversations/{conversation}").json()["messages"][-1]
        assert during["status"] == "streaming" and during["content"]
        received += next(stream)["text"]
    # The client went away (what Stop does): generation stops, the reply is kept, marked incomplete.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not served.engine.idle:
        time.sleep(0.05)
    assert served.engine.idle
    reply = httpx.get(f"{api}/conversations/{conversation}").json()["messages"][-1]
    assert reply["id"] == start["assistant_message_id"]
    assert reply["status"] == "incomplete"
    assert reply["content"].startswith(received) and len(reply["content"]) >= len(during["content"])
    assert reply["completion_tokens"] < 3000


def test_personas_and_settings(server) -> None:
    api, _, _ = server
    persona = httpx.post(
        f"{api}/personas",
        json={"name": "Lola", "instructions": "You are Lola. " * 20, "settings": {"top_p": 0.5}},
    )
    assert persona.status_code == 201
    persona_id = persona.json()["id"]
    assert [p["name"] for p in httpx.get(f"{api}/personas").json()] == ["Lola"]
    plain = new_conversation(api, settings={"max_tokens": 2})
    with_persona = new_conversation(api, persona_id=persona_id, settings={"max_tokens": 2})
    tokens_plain = send(api, plain, content="Hi")[0]["prompt_tokens"]
    tokens_persona = send(api, with_persona, content="Hi")[0]["prompt_tokens"]
    assert tokens_persona > tokens_plain + 40  # the instructions are in the prompt
    renamed = httpx.patch(f"{api}/personas/{persona_id}", json={"name": "Lola II"}).json()
    assert renamed["name"] == "Lola II"
    assert httpx.delete(f"{api}/personas/{persona_id}").status_code == 204
    assert httpx.get(f"{api}/conversations/{with_persona}").json()["persona_id"] is None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"content": "   "}, 400),
        ({"content": "hi", "settings": {"temperature": 7}}, 400),
        ({"content": "hi", "settings": {"warp": 1}}, 400),
        ({"content": "hi", "settings": {"seed": 1.5}}, 400),
        ({"content": "hi", "settings": {"temperature": "hot"}}, 400),
        ({"content": "hi", "settings": {"top_k": 2**63}}, 400),
        ({"content": "hi", "settings": {"max_tokens": "many"}}, 400),
        ({"content": "hi", "settings": {"temperature": float("nan")}}, 400),
        ({"content": "hi", "bogus": 1}, 400),
        ({"regenerate": True}, 400),
        ({"content": "hi", "parent_id": "f" * 32}, 404),
        ({"content": "word " * 5000}, 400),  # longer than the 4096-token context
    ],
    ids=[
        "empty",
        "out-of-range",
        "unknown-setting",
        "float-seed",
        "string-temperature",
        "huge-top-k",
        "string-max-tokens",
        "nan-temperature",
        "unknown-field",
        "regenerate-nothing",
        "bad-parent",
        "too-long",
    ],
)
def test_bad_replies_are_refused_and_store_nothing(server, body: dict, status: int) -> None:
    api, _, _ = server
    conversation = new_conversation(api)
    raw = json.dumps(body)  # NaN included, as Python's json writes it and some clients send it
    response = httpx.post(
        f"{api}/conversations/{conversation}/reply",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    validate(response.json(), "ErrorResponse")
    assert httpx.get(f"{api}/conversations/{conversation}").json()["messages"] == []


def test_unknown_ids_rating_rename_and_delete(server) -> None:
    api, _, _ = server
    for query in ({"offset": 10**20}, {"offset": -1}, {"limit": 0}, {"limit": 501}, {"search": "x" * 1001}):
        assert httpx.get(f"{api}/conversations", params=query).status_code == 400
    missing = httpx.get(f"{api}/conversations/{'0' * 32}")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    conversation = new_conversation(api, settings={"max_tokens": 3})
    reply = send(api, conversation, content="Rate me")[0]["assistant_message_id"]
    assert httpx.post(f"{api}/messages/{reply}/rating", json={"rating": 1}).status_code == 204
    assert httpx.get(f"{api}/conversations/{conversation}").json()["ratings"] == {reply: 1}
    assert httpx.post(f"{api}/messages/{reply}/rating", json={"rating": 3}).status_code == 400
    assert (
        httpx.patch(f"{api}/conversations/{conversation}", json={"title": "Mine"}).json()["title"] == "Mine"
    )
    assert httpx.patch(f"{api}/conversations/{conversation}", json={"title": None}).status_code == 400
    assert httpx.delete(f"{api}/conversations/{conversation}").status_code == 204
    assert httpx.get(f"{api}/conversations/{conversation}").status_code == 404


def test_api_keys_guard_the_conversations_too(make_tiny_model, tmp_path: Path) -> None:
    served = LocalProvider(Engine(make_tiny_model(), max_batch=2))
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([served], api_keys={"k"}, store=store)) as url:
        assert httpx.get(f"{url}/api/conversations").status_code == 401
        assert httpx.get(f"{url}/api/conversations", headers={"Authorization": "Bearer k"}).json() == []


def test_export_and_import_keep_the_whole_tree(server) -> None:
    api, _, _ = server
    conversation = new_conversation(api, system_prompt="Be brief.", settings={"max_tokens": 4})
    question = send(api, conversation, content="Name a colour.")[0]["user_message"]["id"]
    send(api, conversation, parent_id=question, regenerate=True)
    exported = httpx.get(f"{api}/conversations/{conversation}/export")
    assert exported.status_code == 200 and "attachment" in exported.headers["content-disposition"]
    data = exported.json()
    assert data["format"] == "tertulia.conversation" and len(data["messages"]) == 3
    imported = httpx.post(f"{api}/conversations/import", json=data)
    assert imported.status_code == 201, imported.text
    copy, original = (
        httpx.get(f"{api}/conversations/{i}").json() for i in (imported.json()["id"], conversation)
    )
    assert copy["id"] != original["id"] and copy["system_prompt"] == "Be brief."
    assert [(m["role"], m["content"], m["branch"]["count"]) for m in copy["messages"]] == [
        (m["role"], m["content"], m["branch"]["count"]) for m in original["messages"]
    ]
    assert not {m["id"] for m in copy["messages"]} & {m["id"] for m in original["messages"]}
    markdown = httpx.get(f"{api}/conversations/{conversation}/export", params={"format": "markdown"}).text
    assert markdown.startswith("# Name a colour.") and "> Be brief." in markdown
    assert "**You**\n\nName a colour." in markdown and markdown.count("**Assistant**") == 1


@pytest.mark.parametrize(
    "broken",
    [
        {"format": "something else"},
        {"version": 99},
        {"messages": [{"id": "a", "parent_id": "b", "role": "user", "content": "x"}]},
        {"messages": [{"id": "a", "parent_id": None, "role": "tool", "content": "x"}]},
        {"messages": [{"id": "a", "parent_id": None, "role": "user", "content": 5}]},
        {"title": ["not", "text"]},
        {"messages": [{"id": "a", "parent_id": [], "role": "user", "content": "x"}]},
        {"model": "m" * 301},
        {"messages": [{"id": "a", "parent_id": None, "role": "user", "content": "x", "model": "m" * 301}]},
    ],
    ids=[
        "format",
        "version",
        "dangling-parent",
        "role",
        "content",
        "title",
        "list-parent",
        "long-model",
        "long-message-model",
    ],
)
def test_a_bad_import_changes_nothing(server, broken: dict) -> None:
    api, _, _ = server
    data = {"format": "tertulia.conversation", "version": 1, "title": "t", "messages": [], **broken}
    response = httpx.post(f"{api}/conversations/import", json=data)
    assert response.status_code == 400 and "Not a conversation export" in response.json()["error"]["message"]
    assert httpx.get(f"{api}/conversations").json() == []


@pytest.mark.parametrize(
    "settings",
    [{"temperature": "hot"}, {"max_tokens": "many"}, {"seed": 1.5}, {"warp": 1}, ["not", "an", "object"]],
)
def test_an_import_with_bad_settings_changes_nothing(server, settings: object) -> None:
    api, _, _ = server
    data = {
        "format": "tertulia.conversation",
        "version": 1,
        "title": "t",
        "messages": [],
        "settings": settings,
    }
    response = httpx.post(f"{api}/conversations/import", json=data)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("settings")
    assert httpx.get(f"{api}/conversations").json() == []


def test_settings_stored_by_an_older_version_are_refused_not_crashed_on(server) -> None:
    """Settings written before they were checked (straight into the store here): the reply and the
    context meter answer 400 naming the setting; the server keeps serving."""
    api, store, _ = server
    conversation = new_conversation(api)
    persona = httpx.post(f"{api}/personas", json={"name": "Old"}).json()["id"]
    user = store.local_user().id
    store.update_persona(user, persona, settings={"seed": 1.5})
    store.update_conversation(user, conversation, persona_id=persona, settings={"max_tokens": "many"})
    for response in (
        httpx.post(f"{api}/conversations/{conversation}/reply", json={"content": "hi"}, timeout=60),
        httpx.get(f"{api}/conversations/{conversation}/context"),
    ):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] in ("settings.seed", "settings.max_tokens")
    fresh = new_conversation(api, settings={"max_tokens": 3})
    assert send(api, fresh, content="still here?")[-1]["status"] == "complete"


def test_models_and_the_context_meter(server) -> None:
    api, _, _ = server
    assert httpx.get(f"{api}/models").json() == [
        {
            "id": "tiny-llama",
            "local": True,
            "context_length": 4096,
            "default_settings": {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1},
        }
    ]
    assert httpx.get(f"{api}/auth/me").json() == {"auth": False, "user": None}
    conversation = new_conversation(api, system_prompt="Be brief.", settings={"max_tokens": 4})
    empty = httpx.get(f"{api}/conversations/{conversation}/context").json()
    started = send(api, conversation, content="Hello there")[0]
    used = httpx.get(f"{api}/conversations/{conversation}/context").json()
    assert used["context"] == 4096 and used["reserve"] == 4 and used["dropped"] == 0
    # The meter counts what the next reply would send: the system prompt, the question and its answer.
    assert empty["prompt_tokens"] < started["prompt_tokens"] < used["prompt_tokens"]
    missing = httpx.get(f"{api}/conversations/nope/context")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_the_meter_says_when_old_turns_are_left_out(make_tiny_model, tmp_path: Path) -> None:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=256), max_batch=2))
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([served], store=store)) as url:
        api = f"{url}/api"
        conversation = new_conversation(api, settings={"max_tokens": 8})
        for i in range(8):
            send(api, conversation, content=f"Message number {i} with some words to fill the context up.")
        fit = httpx.get(f"{api}/conversations/{conversation}/context").json()
        assert fit["context"] == 256 and fit["dropped"] > 0 and fit["prompt_tokens"] + 8 <= 256
        assert "left out" in fit["notice"]
