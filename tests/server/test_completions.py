"""Legacy /v1/completions through the official client, validated against OpenAI's schemas."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, LiveServer
from tests.server.openapi_schema import validate

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)


def test_default_max_tokens_is_16_and_usage_is_right(live_server: LiveServer, client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    choice = reply.choices[0]
    assert reply.usage.completion_tokens <= 16
    prompt_ids = live_server.model.encode_text(PROMPT)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 16
    validate(reply.model_dump(exclude_unset=True), "CreateCompletionResponse")


def test_echo_and_list_prompts(client: openai.OpenAI) -> None:
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    several = client.completions.create(
        model=MODEL, prompt=[PROMPT, "1, 2, 3,"], n=2, temperature=0, max_tokens=4
    )
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == plain.choices[0].text


def test_token_id_prompts_and_logprobs(live_server: LiveServer, client: openai.OpenAI) -> None:
    ids = live_server.model.encode_text(PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=4, logprobs=2)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4)
    assert by_ids.choices[0].text == by_text.choices[0].text
    logprobs = by_ids.choices[0].logprobs
    assert "".join(logprobs.tokens) == by_ids.choices[0].text
    assert len(logprobs.token_logprobs) == 4 and all(len(t) <= 2 for t in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_streaming_matches_and_ends_with_done(live_server: LiveServer, client: openai.OpenAI) -> None:
    whole = (
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=12).choices[0].text
    )
    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=12, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{live_server.base_url}/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "prompt": ""},
        {"model": MODEL, "prompt": []},
        {"model": MODEL, "prompt": [99999999]},
        {"model": MODEL, "prompt": PROMPT, "logprobs": 9},
        {"model": MODEL, "prompt": PROMPT, "suffix": "x"},
        {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 1},
        {"model": MODEL, "prompt": {"text": PROMPT}},
    ],
)
def test_bad_completion_requests(live_server: LiveServer, body: dict) -> None:
    response = httpx.post(f"{live_server.base_url}/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    validate(response.json(), "ErrorResponse")
