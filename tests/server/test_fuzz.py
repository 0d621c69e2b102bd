"""Fuzzing /v1 and /api from their OpenAPI schema (schemathesis): no input gets a 5xx or stops the server.

A tiny random model with a short context serves, so any max_tokens a generated request asks for is
either refused (400) or over in a moment; the number of examples per route is bounded. Schemathesis
generates the requests (valid and invalid ones) from the schema the server itself publishes; its
pytest plugin is not used, so one server serves every route.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tests.server.conftest import running

EXAMPLES_PER_ROUTE = 80


def test_no_generated_request_gets_a_server_error(make_tiny_model, tmp_path: Path) -> None:
    served = LocalProvider(Engine(make_tiny_model(max_position_embeddings=256), max_batch=4))
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    with running(create_app([served], store=store)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json").include(path_regex="^/(v1|api)/")
        # Deletions last: the ids the other routes aim at must still exist when they run.
        operations = sorted(
            (result.ok() for result in schema.get_all_operations()), key=lambda op: op.method == "delete"
        )
        assert len(operations) > 20  # the whole API, not a part of it
        real = existing_ids(f"{url}/api", served.name)
        statuses: dict[str, set[int]] = {}
        for operation in operations:
            fuzz(operation, url, real, statuses.setdefault(f"{operation.method} {operation.path}", set()))
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    # The fuzzing went past the door: replies and completions were generated, not only refused.
    for route in (
        "post /v1/chat/completions",
        "post /v1/completions",
        "post /api/conversations/{conversation_id}/reply",
    ):
        assert 200 in statuses[route] and any(400 <= s < 500 for s in statuses[route]), (
            route,
            statuses[route],
        )


def fuzz(operation, url: str, real: dict[str, str], statuses: set[int]) -> None:  # type: ignore[no-untyped-def]
    """Send EXAMPLES_PER_ROUTE generated requests to one route; fail on any 5xx."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_ROUTE,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def no_server_error(case) -> None:  # type: ignore[no-untyped-def]
        aim_at_what_exists(case, real)
        response = case.call_and_validate(base_url=url, checks=[not_a_server_error], timeout=60)
        statuses.add(response.status_code)

    no_server_error()


def existing_ids(api: str, model: str) -> dict[str, str]:
    """A conversation with a reply, a persona: ids for the generated requests to aim at."""
    conversation = httpx.post(f"{api}/conversations", json={"settings": {"max_tokens": 4}}).json()["id"]
    persona = httpx.post(f"{api}/personas", json={"name": "fuzz"}).json()["id"]
    with httpx.stream(
        "POST", f"{api}/conversations/{conversation}/reply", json={"content": "hi"}
    ) as response:
        start = next(json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: "))
    return {
        "conversation_id": conversation,
        "persona_id": persona,
        "message_id": start["assistant_message_id"],
        "name": model,
        "model": model,
    }


def aim_at_what_exists(case, real: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """Most generated ids and model names exist nowhere (a 404 at the door): point them at real ones,
    so the generated bodies reach the code behind."""
    for key in case.path_parameters or {}:
        if key in real:
            case.path_parameters[key] = real[key]
    if isinstance(case.body, dict):
        for key, real_key in (
            ("model", "model"),
            ("parent_id", "message_id"),
            ("message_id", "message_id"),
            ("persona_id", "persona_id"),
        ):
            if isinstance(case.body.get(key), str):
                case.body[key] = real[real_key]
