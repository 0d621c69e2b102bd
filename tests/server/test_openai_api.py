"""The OpenAI-compatible API, driven by the official `openai` client against a live server on loopback.

Response bodies are validated against the schemas of OpenAI's own OpenAPI file.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.answers import PARIS_QUESTIONS, assert_mostly
from tests.server.conftest import MODEL, LiveServer
from tests.server.openapi_schema import validate

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)


def test_health_and_models(live_server: LiveServer, client: openai.OpenAI) -> None:
    assert httpx.get(f"{live_server.url}/health").json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    validate(httpx.get(f"{live_server.base_url}/models").json(), "ListModelsResponse")
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_answers_and_counts_tokens(live_server: LiveServer, client: openai.OpenAI) -> None:
    replies = [
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0)
        for q in PARIS_QUESTIONS
    ]
    assert_mostly([r.choices[0].message.content for r in replies], "Paris")
    reply = replies[0]
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    prompt = live_server.model.encode_chat(QUESTION)
    assert reply.usage.prompt_tokens == len(prompt)
    tokenizer = live_server.model.model.tokenizer
    # The completion tokens are the text's tokens plus the end-of-turn token.
    assert reply.usage.completion_tokens == len(tokenizer.encode(choice.message.content)) + 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    validate(reply.model_dump(exclude_unset=True), "CreateChatCompletionResponse")


def test_raw_body_matches_openai_schema(live_server: LiveServer) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 5, "logprobs": True, "top_logprobs": 3}
    response = httpx.post(f"{live_server.base_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    data = response.json()
    validate(data, "CreateChatCompletionResponse")
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"] == 5
    assert all(len(item["top_logprobs"]) == 3 and item["logprob"] <= 0 for item in content)
    assert data["choices"][0]["finish_reason"] == "length"


def test_streaming_equals_non_streaming(live_server: LiveServer, client: openai.OpenAI) -> None:
    params = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**params).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format(live_server: LiveServer) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{live_server.base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    # An SSE comment goes out at once (headers and a first byte, even while the request waits its turn).
    assert lines[0].startswith(":")
    events = [line for line in lines if not line.startswith(":")]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    for line in events[:-1]:
        validate(json.loads(line[len("data: ") :]), "CreateChatCompletionStreamResponse")


def test_n_choices_with_seed_are_reproducible(client: openai.OpenAI) -> None:
    params = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a joke."}],
        n=3,
        seed=7,
        temperature=1.0,
        max_tokens=24,
    )
    first = client.chat.completions.create(**params)
    second = client.chat.completions.create(**params)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1
    streamed = client.chat.completions.create(**params, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in first.choices]


def test_stop_sequences_cut_the_reply(client: openai.OpenAI) -> None:
    params = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**params).choices[0].message.content
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    cut = client.chat.completions.create(**params, stop=[stop, "zzzz"]).choices[0]
    assert cut.message.content == whole[: whole.index(stop)]
    assert cut.finish_reason == "stop"


def test_json_mode_replies_parse(client: openai.OpenAI) -> None:
    """response_format json_object guarantees: a reply that stops is one JSON object; one cut by max_tokens
    says "length" and is closed so that it still parses. Sampled or greedy, whatever the model's luck."""
    messages = [{"role": "user", "content": "Describe a cat as a JSON object with its name and age."}]
    params = dict(model=MODEL, messages=messages, response_format={"type": "json_object"})
    greedy = client.chat.completions.create(**params, max_tokens=300, temperature=0).choices[0]
    sampled = client.chat.completions.create(**params, max_tokens=300, temperature=1.0, seed=3, n=3).choices
    short_reply = client.chat.completions.create(**params, max_tokens=8, temperature=1.0, seed=5, n=3)
    short = short_reply.choices
    assert short_reply.usage.completion_tokens <= 3 * 8
    for choice in [greedy, *sampled, *short]:
        assert choice.finish_reason in ("stop", "length"), choice.message.content
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    again = client.chat.completions.create(**params, max_tokens=300, temperature=1.0, seed=3, n=3).choices
    assert [c.message.content for c in again] == [c.message.content for c in sampled]
    streamed = client.chat.completions.create(**params, max_tokens=300, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == greedy.message.content


def test_async_client_streams(live_server: LiveServer) -> None:
    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    whole = openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)
    reply = whole.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert asyncio.run(run()) == reply.choices[0].message.content


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": QUESTION, "temperature": 5}, "temperature"),
        ({"model": MODEL, "messages": QUESTION, "n": 0}, "n"),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": QUESTION, "logit_bias": {"word": 3}}, "logit_bias"),
        ({"model": MODEL, "messages": QUESTION, "logit_bias": {"99999999": 3}}, None),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "  "}]}, None),
        ({"messages": QUESTION}, "model"),
        ({"model": MODEL, "messages": QUESTION, "top_logprobs": 2}, None),
    ],
)
def test_bad_requests_get_openai_errors(live_server: LiveServer, body: dict, param: str | None) -> None:
    response = httpx.post(f"{live_server.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    data = response.json()
    assert "detail" not in data
    validate(data, "ErrorResponse")
    assert data["error"]["type"] == "invalid_request_error" and data["error"]["message"]
    if param:
        assert data["error"]["param"] == param


def test_malformed_and_oversized_prompts(live_server: LiveServer) -> None:
    url = f"{live_server.base_url}/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    long = [{"role": "user", "content": "word " * 9000}]
    too_long = httpx.post(url, json={"model": MODEL, "messages": long, "max_tokens": 10}, timeout=60)
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded" and "8192" in error["message"]
    unknown = httpx.post(url, json={"model": "gpt-9", "messages": QUESTION})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{live_server.url}/v1/nothing-here").json()["error"]["type"] == "not_found_error"


def test_disconnected_client_frees_its_blocks(live_server: LiveServer) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 2000,
        "stream": True,
        "n": 2,
    }
    with httpx.stream("POST", f"{live_server.base_url}/chat/completions", json=body, timeout=60) as response:
        tokens = (
            line for line in response.iter_lines() if '"content": "' in line and '"content": ""' not in line
        )
        next(tokens)  # generating: the request holds its blocks
        engine = live_server.model.engine
        assert len(engine.running) == 2 and engine.blocks.used >= 2
    assert live_server.wait_until_idle(), "the aborted request still holds KV blocks"


def _metrics(live_server: LiveServer) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{live_server.url}/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == MODEL:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def test_metrics_count_what_the_requests_did(live_server: LiveServer, client: openai.OpenAI) -> None:
    assert live_server.wait_until_idle()
    before = _metrics(live_server)
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    after = _metrics(live_server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("tertulia_requests_total") == 1
    assert delta("tertulia_prompt_tokens_total") == reply.usage.prompt_tokens
    assert delta("tertulia_generation_tokens_total") == reply.usage.completion_tokens
    assert delta("tertulia_time_to_first_token_seconds_count") == 1
    assert delta("tertulia_inter_token_latency_seconds_count") == reply.usage.completion_tokens - 1
    assert after["tertulia_running_sequences"] == 0 and after["tertulia_kv_cache_usage_ratio"] == 0
    assert "tertulia_queue_depth" in after
