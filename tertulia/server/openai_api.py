"""/v1 routes: chat completions (streaming and not) and the model list, shaped as OpenAI's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tertulia import __version__
from tertulia.engine.runner import RequestStream
from tertulia.engine.sequence import StepOutput, TokenLogprob
from tertulia.providers.local import ServedModel
from tertulia.providers.remote import RemoteModel
from tertulia.server.errors import APIError
from tertulia.server.limits import check_queue
from tertulia.server.schemas import ChatCompletionRequest

router = APIRouter(prefix="/v1")
T = TypeVar("T")


def served_models(request: Request) -> dict[str, ServedModel]:
    return request.app.state.models


def pick_model(request: Request, name: str, *, admit: bool = True) -> ServedModel | RemoteModel:
    """The served model called `name` (404 otherwise). With `admit` (a request that will generate):
    counted in the metrics, and 429 when its queue is full."""
    models = served_models(request)
    if name not in models:
        raise APIError(
            404,
            f"The model '{name}' does not exist. Available: {', '.join(models)}.",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    model = models[name]
    if admit:
        # Labelled by the route's template, so ids in paths do not make a series per conversation.
        route = getattr(request.scope.get("route"), "path", request.url.path)
        request.app.state.metrics.requests.labels(name, route).inc()
        if isinstance(model, ServedModel):
            check_queue(model.runner.pending, request.app.state.max_queue)
    return model


CLIENT_CLOSED = 499  # nginx's status for "the client left before the answer": nobody reads it


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work` (a whole, non-streamed answer) unless the client leaves first: then it is cancelled,
    which frees its engine slots, and None is returned. Streamed answers stop when their generator is
    closed instead.

    The body has been read, so the next message the server sends the app is the disconnect.
    """
    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        task.cancel()
        left.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tertulia"}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    created = request.app.state.started
    return {"object": "list", "data": [model_card(name, created) for name in served_models(request)]}


@router.get("/models/{name:path}")
async def get_model(request: Request, name: str) -> dict[str, Any]:
    pick_model(request, name, admit=False)
    return model_card(name, request.app.state.started)


async def forward(
    model: RemoteModel, path: str, request: Request, stream: bool
) -> JSONResponse | StreamingResponse:
    """Pass a validated request to a remote model as the client sent it; relay the answer."""
    raw = await request.json()
    if stream:
        events = await model.stream(path, raw)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return JSONResponse(await model.complete(path, raw))


def _logprob_content(tokenizer: Any, item: TokenLogprob) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        piece = tokenizer.token_bytes[token] if token < len(tokenizer.token_bytes) else None
        raw = piece if piece is not None else (tokenizer.id_to_token(token) or "").encode()
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return dict(entry(item.token, item.logprob), top_logprobs=[entry(t, lp) for t, lp in item.top])


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    model = pick_model(request, body.model)
    if isinstance(model, RemoteModel):
        return await forward(model, "/chat/completions", request, body.stream)
    try:
        stream = await model.submit_chat(body.template_messages(), body.to_sampling())
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_chat_events(stream, model, completion_id, created, body, include_usage))
    reply = await until_disconnected(request, _chat_response(stream, model, completion_id, created, body))
    return JSONResponse(reply) if reply is not None else Response(status_code=CLIENT_CLOSED)


async def _chat_response(
    stream: RequestStream, model: ServedModel, completion_id: str, created: int, body: ChatCompletionRequest
) -> dict[str, Any]:
    logprobs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(body.n)}
    tokenizer = model.provider.model.tokenizer
    try:
        async for out in stream:
            if out.logprob is not None:
                logprobs[out.sequence.index].append(_logprob_content(tokenizer, out.logprob))
    finally:
        stream.cancel()
    choices = [
        {
            "index": seq.index,
            "message": {"role": "assistant", "content": seq.text, "refusal": None},
            "logprobs": {"content": logprobs[seq.index], "refusal": None} if body.logprobs else None,
            "finish_reason": finish_reason(seq.finish_reason),
        }
        for seq in stream.sequences
    ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": fingerprint(model),
        "choices": choices,
        "usage": _usage(stream),
    }


def fingerprint(model: ServedModel) -> str:
    """Changes when what decides the tokens changes (version, quantization): see OpenAI's `seed` docs."""
    return f"tertulia-{__version__}-{model.provider.engine.quantization}"


def finish_reason(reason: str | None) -> str:
    # "abort" happens only when the server shuts down mid-request; OpenAI has no such reason.
    return reason if reason in ("stop", "length") else "stop"


def _usage(stream: RequestStream) -> dict[str, int]:
    prompt_tokens = len(stream.prompt)
    completion_tokens = sum(len(s.output) for s in stream.sequences)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


HEARTBEAT_SECONDS = 10.0


async def with_heartbeat(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`, opened with an SSE comment (so headers and a first byte leave at once) and with
    another whenever nothing was sent for HEARTBEAT_SECONDS: a request waiting in a long queue keeps
    its client's read timeout from firing. Clients ignore comment lines.

    `events` is started before the first byte is sent, so that its own cleanup (cancelling the
    request, saving a reply cut short) runs whenever this generator is closed.
    """
    iterator = events.__aiter__()
    pending = asyncio.ensure_future(iterator.__anext__())
    try:
        yield ": waiting for the model\n\n"
        while True:
            done, _ = await asyncio.wait({pending}, timeout=HEARTBEAT_SECONDS)
            if not done:
                yield ": still waiting\n\n"
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(iterator.__anext__())
    finally:
        # Reached when the client leaves too, inside a cancelled scope: shielded, so that `events`
        # is closed for certain and its own cleanup runs now.
        pending.cancel()
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(asyncio.CancelledError, Exception):  # raised already, if at all
                await pending
            await iterator.aclose()  # type: ignore[attr-defined]


class _EventStream(StreamingResponse):
    """A streaming response that closes its events when the client leaves, not when the garbage
    collector gets to them: Starlette stops iterating on a failed send and leaves the generator
    suspended, and a reply cut short must be saved now."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events as every streaming route sends them."""
    return _EventStream(
        with_heartbeat(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _chat_events(
    stream: RequestStream,
    model: ServedModel,
    completion_id: str,
    created: int,
    body: ChatCompletionRequest,
    include_usage: bool,
) -> AsyncIterator[str]:
    tokenizer = model.provider.model.tokenizer

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "system_fingerprint": fingerprint(model),
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        return sse(data)

    def choice(
        index: int, delta: dict[str, Any], finish: str | None = None, out: StepOutput | None = None
    ) -> dict:
        logprobs = None
        if body.logprobs and out is not None and out.logprob is not None:
            logprobs = {"content": [_logprob_content(tokenizer, out.logprob)], "refusal": None}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    try:
        for index in range(body.n):
            yield chunk([choice(index, {"role": "assistant", "content": ""})])
        async for out in stream:
            seq = out.sequence
            if out.text or (body.logprobs and out.logprob is not None):
                yield chunk([choice(seq.index, {"content": out.text}, out=out)])
            if out.finished:
                yield chunk([choice(seq.index, {}, finish_reason(seq.finish_reason))])
        if include_usage:
            yield chunk([], _usage(stream))
        yield "data: [DONE]\n\n"
    finally:
        # A client that disconnects lands here too (the generator is closed): free its KV slots.
        stream.cancel()
