"""/v1/completions, the legacy text-completion route: raw prompts, `echo`, several prompts at once.

Each prompt is a reply of its own (n choices each); choice k of prompt p is index p * n + k.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tertulia.providers.base import Capability, Provider, Reply, ReplyEvent, TokenLogprob, Unsupported
from tertulia.server.errors import APIError
from tertulia.server.openai_api import error_event, failure, finish_reason, forward, pick_model, usage_json
from tertulia.server.schemas import CompletionRequest
from tertulia.server.state import State
from tertulia.server.streaming import CLIENT_CLOSED, event_stream, sse, until_disconnected

router = APIRouter(prefix="/v1")


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, state: State
) -> JSONResponse | StreamingResponse | Response:
    requests = body.reply_requests()
    model = pick_model(state, request, body.model, count=len(requests))
    if Capability.PASSTHROUGH in model.capabilities:
        return await forward(model, "/completions", request, body.stream)
    if Capability.RAW_PROMPT not in model.capabilities:
        raise Unsupported(model.name, Capability.RAW_PROMPT)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported.", param="echo")
    replies: list[Reply] = []
    try:
        for one in requests:
            replies.append(await model.reply(one))
    except BaseException:
        for reply in replies:
            reply.cancel()
        raise
    header = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": model.fingerprint,
    }
    if body.stream:
        return event_stream(_events(replies, model, header, body))
    answer = await until_disconnected(request, _response(replies, model, header, body))
    return JSONResponse(answer) if answer is not None else Response(status_code=CLIENT_CLOSED)


def _legacy_logprobs(items: list[TokenLogprob], start: int) -> dict[str, Any]:
    offsets, offset = [], start
    for item in items:
        offsets.append(offset)
        offset += len(item.text)
    return {
        "tokens": [i.text for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{t.text: t.logprob for t in i.top} for i in items],
        "text_offset": offsets,
    }


def _echo(model: Provider, reply: Reply) -> str:
    return model.decode(reply.prompt_ids or [])


async def _merged(replies: list[Reply]) -> AsyncIterator[tuple[int, ReplyEvent]]:
    """Events of every reply as they come, with the number of the prompt they answer."""
    queue: asyncio.Queue[tuple[int, ReplyEvent] | None] = asyncio.Queue()

    async def pump(number: int, reply: Reply) -> None:
        try:
            async for event in reply:
                await queue.put((number, event))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(replies)]
    try:
        running = len(replies)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for reply in replies:
            reply.cancel()


async def _response(
    replies: list[Reply], model: Provider, header: dict[str, Any], body: CompletionRequest
) -> dict[str, Any]:
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    finishes: dict[int, str | None] = {}
    async with contextlib.aclosing(_merged(replies)) as events:
        async for number, event in events:
            index = number * body.n + event.index
            texts.setdefault(index, []).append(event.text)
            if event.logprob is not None:
                logprobs.setdefault(index, []).append(event.logprob)
            if event.finish_reason == "error":
                raise failure(event.error)
            if event.finish_reason:
                finishes[index] = event.finish_reason
    choices = []
    for number, reply in enumerate(replies):
        prefix = _echo(model, reply) if body.echo else ""
        for k in range(body.n):
            index = number * body.n + k
            choices.append(
                {
                    "index": index,
                    "text": prefix + "".join(texts.get(index, [])),
                    "logprobs": _legacy_logprobs(logprobs.get(index, []), 0)
                    if body.logprobs is not None
                    else None,
                    "finish_reason": finish_reason(finishes.get(index)),
                }
            )
    return dict(header, choices=choices, usage=usage_json(replies))


async def _events(
    replies: list[Reply], model: Provider, header: dict[str, Any], body: CompletionRequest
) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        data = dict(header, choices=[choice])
        if include_usage:
            data["usage"] = None
        return sse(data)

    try:
        offsets: dict[int, int] = {}
        if body.echo:
            for number, reply in enumerate(replies):
                for k in range(body.n):
                    yield chunk(number * body.n + k, _echo(model, reply), None)
        failed = False
        async with contextlib.aclosing(_merged(replies)) as events:
            async for number, event in events:
                if event.finish_reason == "error":
                    yield error_event(event.error)
                    failed = True
                    break
                index = number * body.n + event.index
                logprobs = None
                if body.logprobs is not None and event.logprob is not None:
                    logprobs = _legacy_logprobs([event.logprob], offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(event.text)
                finish = finish_reason(event.finish_reason) if event.finish_reason else None
                if event.text or finish or logprobs:
                    yield chunk(index, event.text, finish, logprobs)
        if include_usage and not failed:
            yield sse(dict(header, choices=[], usage=usage_json(replies)))
        yield "data: [DONE]\n\n"
    finally:
        for reply in replies:  # also when the client leaves before the first event
            reply.cancel()
