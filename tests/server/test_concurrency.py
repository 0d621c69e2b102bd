"""16 people chatting at once: every stream completes, and batching does not change what they get."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.server.conftest import MODEL, LiveServer

pytestmark = pytest.mark.slow

TOPICS = [
    "dragons",
    "the sea",
    "coffee",
    "Madrid",
    "robots",
    "music",
    "winter",
    "cats",
    "rivers",
    "bread",
    "chess",
    "the moon",
    "trains",
    "gardens",
    "Python",
    "friendship",
]


def request(i: int) -> dict:
    return dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"Write two sentences about {TOPICS[i]}."}],
        temperature=0.8 if i % 2 else 0,
        seed=100 + i,
        max_tokens=24 + i,
    )


async def collect(client: openai.AsyncOpenAI, params: dict) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(**params, stream=True)
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_sixteen_concurrent_streams_equal_solo_runs(live_server: LiveServer) -> None:
    async def run() -> tuple[list, list]:
        client = openai.AsyncOpenAI(
            base_url=live_server.base_url, api_key="unused", max_retries=0, timeout=300
        )
        solo = [await collect(client, request(i)) for i in range(16)]
        together = await asyncio.gather(*(collect(client, request(i)) for i in range(16)))
        return solo, list(together)

    solo, together = asyncio.run(run())
    assert all(finish in ("stop", "length") for _, finish in together)
    assert all(text for text, _ in together)
    assert together == solo
    assert live_server.wait_until_idle()
