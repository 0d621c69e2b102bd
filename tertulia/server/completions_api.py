"""/v1/completions, the legacy text-completion route: raw prompts, `echo`, several prompts at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tertulia.engine.runner import RequestStream
from tertulia.engine.sequence import StepOutput, TokenLogprob
from tertulia.providers.local import ServedModel
from tertulia.providers.remote import RemoteModel
from tertulia.server.errors import APIError
from tertulia.server.limits import check_queue
from tertulia.server.openai_api import (
    CLIENT_CLOSED,
    event_stream,
    fingerprint,
    finish_reason,
    forward,
    pick_model,
    router,
    sse,
    until_disconnected,
)
from tertulia.server.schemas import CompletionRequest


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    model = pick_model(request, body.model)
    if isinstance(model, RemoteModel):
        return await forward(model, "/completions", request, body.stream)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported.", param="echo")
    prompts = body.prompts()
    # Each prompt is a request of its own for the engine: the queue counts them all.
    check_queue(model.runner.pending + len(prompts) - 1, request.app.state.max_queue)
    try:
        params = body.to_sampling()
        # Tokenizing thousands of prompts takes a while: not on the event loop.
        prompt_ids = await asyncio.to_thread(lambda: [model.encode_text(p) for p in prompts])
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from None
    streams: list[RequestStream] = []
    try:
        for ids in prompt_ids:
            streams.append(model.submit_ids(ids, params))
    except ValueError as exc:
        for stream in streams:
            stream.cancel()
        raise APIError(400, str(exc), param="prompt") from None
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return event_stream(_events(streams, model, completion_id, created, body))
    reply = await until_disconnected(request, _response(streams, model, completion_id, created, body))
    return JSONResponse(reply) if reply is not None else Response(status_code=CLIENT_CLOSED)


def _legacy_logprobs(model: ServedModel, items: list[TokenLogprob], start: int) -> dict[str, Any]:
    tokenizer = model.provider.model.tokenizer

    def text(token: int) -> str:
        raw = tokenizer.token_bytes[token] if token < len(tokenizer.token_bytes) else None
        return (raw if raw is not None else (tokenizer.id_to_token(token) or "").encode()).decode(
            errors="replace"
        )

    offsets, offset = [], start
    for item in items:
        offsets.append(offset)
        offset += len(text(item.token))
    return {
        "tokens": [text(i.token) for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{text(t): lp for t, lp in i.top} for i in items],
        "text_offset": offsets,
    }


def _echo_text(model: ServedModel, stream: RequestStream) -> str:
    return model.provider.model.tokenizer.decode(stream.prompt, skip_special=False)


def _usage(streams: list[RequestStream]) -> dict[str, int]:
    prompt_tokens = sum(len(s.prompt) for s in streams)
    completion_tokens = sum(len(seq.output) for s in streams for seq in s.sequences)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _response(
    streams: list[RequestStream],
    model: ServedModel,
    completion_id: str,
    created: int,
    body: CompletionRequest,
) -> dict[str, Any]:
    logprobs: dict[tuple[int, int], list[TokenLogprob]] = {}

    async def drain(number: int, stream: RequestStream) -> None:
        async for out in stream:
            if out.logprob is not None:
                logprobs.setdefault((number, out.sequence.index), []).append(out.logprob)

    try:
        await asyncio.gather(*(drain(i, s) for i, s in enumerate(streams)))
    finally:
        for stream in streams:
            stream.cancel()
    choices = []
    for number, stream in enumerate(streams):
        prefix = _echo_text(model, stream) if body.echo else ""
        for seq in stream.sequences:
            choices.append(
                {
                    "index": number * body.n + seq.index,
                    "text": prefix + seq.text,
                    "logprobs": _legacy_logprobs(model, logprobs.get((number, seq.index), []), 0)
                    if body.logprobs is not None
                    else None,
                    "finish_reason": finish_reason(seq.finish_reason),
                }
            )
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": fingerprint(model),
        "choices": choices,
        "usage": _usage(streams),
    }


async def _events(
    streams: list[RequestStream],
    model: ServedModel,
    completion_id: str,
    created: int,
    body: CompletionRequest,
) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    merged: asyncio.Queue[tuple[int, StepOutput] | None] = asyncio.Queue()

    async def pump(number: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await merged.put((number, out))
        finally:
            await merged.put(None)

    def chunk(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> str:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "system_fingerprint": fingerprint(model),
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    offsets: dict[int, int] = {}
    try:
        if body.echo:
            for number, stream in enumerate(streams):
                for i in range(body.n):
                    yield chunk(number * body.n + i, _echo_text(model, stream), None)
        running = len(streams)
        while running:
            item = await merged.get()
            if item is None:
                running -= 1
                continue
            number, out = item
            index = number * body.n + out.sequence.index
            logprobs = None
            if body.logprobs is not None and out.logprob is not None:
                logprobs = _legacy_logprobs(model, [out.logprob], offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(out.text)
            finish = finish_reason(out.sequence.finish_reason) if out.finished else None
            if out.text or finish or logprobs:
                yield chunk(index, out.text, finish, logprobs)
        if include_usage:
            yield sse(
                {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": body.model,
                    "choices": [],
                    "usage": _usage(streams),
                }
            )
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()
