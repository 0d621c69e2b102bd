"""Answers of a model to a set of questions, decoded greedily, all in one batch.

This is how a fine-tune is judged: the weights as they will be served (same engine, same template),
not the training framework's idea of them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tertulia.providers.base import Provider, Reply, ReplyRequest
from tertulia.providers.options import Options


async def greedy_answers(
    provider: Provider, conversations: list[list[dict[str, Any]]], max_tokens: int = 40
) -> list[str]:
    options = Options(temperature=0, max_tokens=max_tokens)
    # All submitted before any is read, so the engine batches them from its first step.
    replies = [await provider.reply(ReplyRequest(messages=c, options=options)) for c in conversations]

    async def text(reply: Reply) -> str:
        return "".join([event.text async for event in reply]).strip()

    return list(await asyncio.gather(*(text(r) for r in replies)))


def ask(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question}]
