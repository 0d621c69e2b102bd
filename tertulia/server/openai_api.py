"""/v1 routes: chat completions (streaming and not) and the model list, shaped as OpenAI's.

Every model is a provider (`providers.base`): its reply events become OpenAI's chunks here. A
provider that forwards /v1 requests as they are (PASSTHROUGH: a remote server) gets the client's own
body, so fields this server does not model still reach it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tertulia.providers.base import Capability, Provider, Reply, TokenLogprob
from tertulia.server.errors import APIError
from tertulia.server.limits import check_queue
from tertulia.server.schemas import ChatCompletionRequest
from tertulia.server.state import ServerState, State
from tertulia.server.streaming import CLIENT_CLOSED, event_stream, sse, until_disconnected

router = APIRouter(prefix="/v1")


def pick_model(
    state: ServerState, request: Request, name: str, *, admit: bool = True, count: int = 1
) -> Provider:
    """The served model called `name` (404 otherwise). With `admit` (a request that will generate
    `count` replies): counted in the metrics, and 429 when its queue is full."""
    if name not in state.models:
        raise APIError(
            404,
            f"The model '{name}' does not exist. Available: {', '.join(state.models)}.",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    model = state.models[name]
    if admit:
        # Labelled by the route's template, so ids in paths do not make a series per conversation.
        route = getattr(request.scope.get("route"), "path", request.url.path)
        state.metrics.requests.labels(name, route).inc()
        check_queue(model.pending + count - 1, state.max_queue)
    return model


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tertulia"}


@router.get("/models")
async def list_models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, state.started) for name in state.models]}


@router.get("/models/{name:path}")
async def get_model(request: Request, name: str, state: State) -> dict[str, Any]:
    pick_model(state, request, name, admit=False)
    return model_card(name, state.started)


async def forward(
    model: Provider, path: str, request: Request, stream: bool
) -> JSONResponse | StreamingResponse:
    """Pass a validated request to a provider that forwards it as the client sent it; relay the answer."""
    answer = await model.forward(path, await request.json(), stream)
    if stream:
        return StreamingResponse(
            answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return JSONResponse(answer)


def logprob_json(item: TokenLogprob) -> dict[str, Any]:
    top = [{"token": t.text, "logprob": t.logprob, "bytes": list(t.raw)} for t in item.top]
    return {"token": item.text, "logprob": item.logprob, "bytes": list(item.raw), "top_logprobs": top}


def finish_reason(reason: str | None) -> str:
    # "abort" happens only when the server shuts down mid-request; OpenAI has no such reason.
    return reason if reason in ("stop", "length") else "stop"


def usage_json(replies: list[Reply]) -> dict[str, int]:
    prompt = sum(r.usage.prompt_tokens or 0 for r in replies)
    completion = sum(r.usage.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def failure(error: str | None) -> APIError:
    """A reply the model could not finish: the server's fault, said as OpenAI says it."""
    return APIError(500, error or "The model failed while generating.", type="server_error")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: State
) -> JSONResponse | StreamingResponse | Response:
    model = pick_model(state, request, body.model)
    if Capability.PASSTHROUGH in model.capabilities:
        return await forward(model, "/chat/completions", request, body.stream)
    reply = await model.reply(body.reply_request())
    header = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": model.fingerprint,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_chat_events(reply, header, body, include_usage))
    answer = await until_disconnected(request, _chat_response(reply, header, body))
    return JSONResponse(answer) if answer is not None else Response(status_code=CLIENT_CLOSED)


async def _chat_response(reply: Reply, header: dict[str, Any], body: ChatCompletionRequest) -> dict[str, Any]:
    texts: dict[int, list[str]] = {i: [] for i in range(body.n)}
    logprobs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(body.n)}
    finishes: dict[int, str | None] = {}
    try:
        async for event in reply:
            texts[event.index].append(event.text)
            if event.logprob is not None:
                logprobs[event.index].append(logprob_json(event.logprob))
            if event.finish_reason == "error":
                raise failure(event.error)
            if event.finish_reason:
                finishes[event.index] = event.finish_reason
    finally:
        reply.cancel()
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": "".join(texts[i]), "refusal": None},
            "logprobs": {"content": logprobs[i], "refusal": None} if body.logprobs else None,
            "finish_reason": finish_reason(finishes.get(i)),
        }
        for i in range(body.n)
    ]
    return dict(header, object="chat.completion", choices=choices, usage=usage_json([reply]))


def error_event(message: str | None) -> str:
    """A failure after the first byte: OpenAI's error object as an event (the status is sent)."""
    error = {"message": message or "The model failed while generating.", "type": "server_error"}
    return sse({"error": dict(error, param=None, code=None)})


async def _chat_events(
    reply: Reply, header: dict[str, Any], body: ChatCompletionRequest, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data = dict(header, object="chat.completion.chunk", choices=choices)
        if include_usage:
            data["usage"] = usage
        return sse(data)

    def choice(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    try:
        for index in range(body.n):
            yield chunk([choice(index, {"role": "assistant", "content": ""})])
        async for event in reply:
            if event.finish_reason == "error":
                yield error_event(event.error)
                break
            logprobs = None
            if body.logprobs and event.logprob is not None:
                logprobs = {"content": [logprob_json(event.logprob)], "refusal": None}
            if event.text or logprobs:
                yield chunk([choice(event.index, {"content": event.text}, logprobs=logprobs)])
            if event.finish_reason:
                yield chunk([choice(event.index, {}, finish_reason(event.finish_reason))])
        else:
            if include_usage:
                yield chunk([], usage_json([reply]))
        yield "data: [DONE]\n\n"
    finally:
        # A client that disconnects lands here too (the generator is closed): free its KV slots.
        reply.cancel()
