"""Answers of a model to a set of conversations, decoded greedily, many at once.

This is how a model is judged on what it says: the weights as they are served (same engine, same
template, same provider contract), so a remote model is judged the same way. Up to `concurrency`
replies are in flight together: a local engine batches them from its first step, a remote server gets
no more requests at once than a client of its own would send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tertulia.errors import TertuliaError
from tertulia.providers.base import Provider, ReplyRequest
from tertulia.providers.options import Options

CONCURRENCY = 16


async def greedy_answers(
    provider: Provider,
    conversations: list[list[dict[str, Any]]],
    max_tokens: int = 40,
    *,
    concurrency: int = CONCURRENCY,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """The reply to each conversation, in order. A reply that fails raises, naming which one."""
    options = Options(temperature=0, max_tokens=max_tokens)
    gate = asyncio.Semaphore(concurrency)

    async def answer(number: int, messages: list[dict[str, Any]]) -> str:
        async with gate:
            reply = await provider.reply(ReplyRequest(messages=messages, options=options))
            parts = []
            async for event in reply:
                parts.append(event.text)
                if event.finish_reason == "error":
                    raise TertuliaError(f"The model failed on conversation {number}: {event.error}")
        if advance is not None:
            advance(1)
        return "".join(parts).strip()

    return list(await asyncio.gather(*(answer(i, c) for i, c in enumerate(conversations, 1))))


def ask(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question}]
