"""Every sampling option, through every entry point, meets the same table: the same values are
accepted, and a refused value gets the same message (/v1 chat and completions, /api settings of a
conversation, a persona, a reply request and an import, and the terminal chat's flags)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tertulia.cli.app import app as cli
from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.providers.options import Options
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tertulia.store.transfer import FORMAT, VERSION
from tests.conftest import tiny_model_factory
from tests.server.conftest import running

INT64_MAX = 2**63 - 1
NAN = math.nan

# (option, value, accepted): in range, at each boundary, just past it, and of the wrong type.
CASES: list[tuple[str, Any, bool]] = [
    ("temperature", 0.7, True),
    ("temperature", 0, True),
    ("temperature", 2, True),
    ("temperature", 2.01, False),
    ("temperature", -0.1, False),
    ("temperature", "hot", False),
    ("temperature", "0.5", False),
    ("temperature", NAN, False),
    ("top_p", 1, True),
    ("top_p", 0.01, True),
    ("top_p", 0, False),
    ("top_p", 1.5, False),
    ("top_k", 0, True),
    ("top_k", 40, True),
    ("top_k", 1_000_000, True),
    ("top_k", 1_000_001, False),
    ("top_k", -1, False),
    ("top_k", 1.5, False),
    ("top_k", 2.0, False),
    ("min_p", 0.05, True),
    ("min_p", 1, True),
    ("min_p", 1.1, False),
    ("frequency_penalty", -2, True),
    ("frequency_penalty", 2, True),
    ("frequency_penalty", 2.5, False),
    ("presence_penalty", 0.5, True),
    ("presence_penalty", -2.1, False),
    ("repetition_penalty", 0.01, True),
    ("repetition_penalty", 10, True),
    ("repetition_penalty", 0, False),
    ("repetition_penalty", 10.5, False),
    ("repetition_penalty", NAN, False),
    ("seed", 0, True),
    ("seed", INT64_MAX, True),
    ("seed", -(2**63), True),
    ("seed", 2**63, False),
    ("seed", 1.5, False),
    ("seed", "7", False),
    ("max_tokens", 1, True),
    ("max_tokens", 3, True),
    ("max_tokens", 0, False),
    ("max_tokens", 2.5, False),
    ("stop", ["a"], True),
    ("stop", ["a", "b", "c", "d"], True),
    ("stop", ["a", "b", "c", "d", "e"], False),
    ("stop", [""], False),
    ("stop", 3, False),
    ("logit_bias", {"5": 100}, True),
    ("logit_bias", {"5": -100.0}, True),
    ("logit_bias", {"5": 101}, False),
    ("logit_bias", {"five": 1}, False),
    ("logit_bias", {"5": NAN}, False),
    ("logit_bias", {"5": "x"}, False),
]


def test_every_option_is_walked() -> None:
    assert {name for name, _, _ in CASES} == set(Options.model_fields)
    for name in Options.model_fields:
        outcomes = {accepted for option, _, accepted in CASES if option == name}
        assert outcomes == {True, False}, name


@pytest.fixture(scope="module")
def server(real_tokenizer, embedded_dir, tmp_path_factory) -> Iterator[tuple[str, str]]:
    model = tiny_model_factory(real_tokenizer, embedded_dir)(max_position_embeddings=512)
    served = LocalProvider(Engine(model, max_batch=8))
    store = Store(open_store(f"sqlite:///{tmp_path_factory.mktemp('store') / 'chats.db'}"))
    with running(create_app([served], store=store)) as url:
        yield url, served.name


Outcome = tuple[bool, str]  # (accepted, the refusal's message)


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    """JSON as Python writes it: NaN included, as a client may send it."""
    return httpx.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=60)


def _answer(response: httpx.Response, ok: int) -> Outcome:
    if response.status_code == ok:
        return True, ""
    assert response.status_code == 400, response.text
    return False, response.json()["error"]["message"]


def _body(name: str, value: Any) -> dict[str, Any]:
    # max_tokens 1 keeps each accepted request short; the case's own max_tokens wins.
    return {"max_tokens": 1} | {name: value}


def v1_chat(url: str, model: str, name: str, value: Any) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]} | _body(name, value)
    return _answer(post(f"{url}/v1/chat/completions", body), 200)


def v1_completions(url: str, model: str, name: str, value: Any) -> Outcome:
    body = {"model": model, "prompt": "hi"} | _body(name, value)
    return _answer(post(f"{url}/v1/completions", body), 200)


def api_conversation(url: str, model: str, name: str, value: Any) -> Outcome:
    body = {"settings": {name: value}}
    return _answer(post(f"{url}/api/conversations", body), 201)


def api_persona(url: str, model: str, name: str, value: Any) -> Outcome:
    body = {"name": "walker", "settings": {name: value}}
    return _answer(post(f"{url}/api/personas", body), 201)


def api_import(url: str, model: str, name: str, value: Any) -> Outcome:
    body = {
        "format": FORMAT,
        "version": VERSION,
        "title": "imported",
        "settings": {name: value},
        "messages": [],
    }
    return _answer(post(f"{url}/api/conversations/import", body), 201)


def api_reply(url: str, model: str, name: str, value: Any) -> Outcome:
    conversation = httpx.post(f"{url}/api/conversations", json={}).json()["id"]
    body = {"content": "hi", "settings": _body(name, value)}
    return _answer(post(f"{url}/api/conversations/{conversation}/reply", body), 200)


def cli_flags(url: str, model: str, name: str, value: Any) -> Outcome | None:
    """The flags as a user types them: text, read by the table like JSON (None: not typeable)."""
    flag = "--" + name.replace("_", "-")
    if name == "stop":
        if not isinstance(value, list):
            return None
        args = [part for stop in value for part in (flag, stop)]
    elif name == "logit_bias":
        args = [part for token, bias in value.items() for part in (flag, f"{token}={json.dumps(bias)}")]
    else:
        args = [flag, json.dumps(value)]
    if name != "max_tokens":
        args += ["--max-tokens", "1"]
    result = CliRunner().invoke(cli, ["chat", "-m", f"remote:{model}@{url}/v1", "-p", "hi", *args])
    if result.exit_code == 0:
        return True, ""
    assert isinstance(result.exception, Exception) and not isinstance(result.exception, SystemExit), result
    return False, str(result.exception)


ENTRY_POINTS: list[Callable[..., Outcome | None]] = [
    v1_chat,
    v1_completions,
    api_conversation,
    api_persona,
    api_import,
    api_reply,
    cli_flags,
]


@pytest.mark.parametrize("name, value, accepted", CASES, ids=[f"{n}={v!r}" for n, v, _ in CASES])
def test_the_same_verdict_and_message_everywhere(server, name: str, value: Any, accepted: bool) -> None:
    url, model = server
    outcomes = {entry.__name__: entry(url, model, name, value) for entry in ENTRY_POINTS}
    seen = {entry: outcome for entry, outcome in outcomes.items() if outcome is not None}
    assert {entry: verdict for entry, (verdict, _) in seen.items()} == dict.fromkeys(seen, accepted)
    if not accepted:
        # The /v1 message is the table's own ("name: what is wrong"); the others say the same,
        # under "settings: " for /api and "error: " on the terminal.
        message = seen["v1_chat"][1]
        assert message.startswith(f"{name}") and ": " in message, message
        for entry, (_, said) in seen.items():
            assert said.endswith(message), (entry, said, message)
