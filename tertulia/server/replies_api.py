"""POST /api/conversations/{id}/reply: send a message (or regenerate) and stream the saved reply.

Events, one JSON object per `data:` line:
- `start`: the user message (unless regenerating), the reply's id, prompt tokens, context size and how
  many earlier messages were left out to fit it (the UI's context meter);
- `delta`: more reply text;
- `done`: the reply's final status (`complete`, or `incomplete` if stopped or cut off), its token count
  and speed, and `error` when a remote server broke the reply off.
The prompt is fitted to the context before anything is stored, so a message that cannot fit is
refused (400 `context_length_exceeded`) without leaving a question with no answer behind.

A conversation may use a remote model (`remote:NAME@URL`): the reply streams from that server and is
stored the same way; its tokens are not counted here (prompt tokens and context are null).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tertulia.chat.context import FittedPrompt, fit
from tertulia.chat.conversation import prompt_messages
from tertulia.chat.session import DEFAULT_REPLY_RESERVE
from tertulia.engine.runner import RequestStream
from tertulia.providers import options
from tertulia.providers.base import Delta
from tertulia.providers.local import ServedModel
from tertulia.providers.options import Options
from tertulia.providers.remote import RemoteChat, RemoteModel, UpstreamError
from tertulia.server.auth_api import request_store, request_user
from tertulia.server.conversations_api import (
    ReplyRequest,
    check_request_settings,
    message_json,
    settings_error,
    store_call,
)
from tertulia.server.errors import APIError
from tertulia.server.openai_api import event_stream, pick_model, served_models, sse
from tertulia.store.conversations import Store
from tertulia.store.schema import Conversation, Persona

router = APIRouter(prefix="/api")

SAVE_EVERY_SECONDS = 0.25  # how often a streaming reply is written to the store

# What a reply uses when neither the persona, the conversation nor the request says otherwise: the
# terminal chat's defaults (small models loop without a little repetition penalty).
DEFAULT_SETTINGS = {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1}


def default_model(request: Request) -> str:
    """What a conversation without a model uses: the first local model, else the first served one
    (the page's model picker shows the same choice)."""
    models = served_models(request)
    local = [name for name, m in models.items() if isinstance(m, ServedModel)]
    return (local or list(models))[0]


def context_of(model: ServedModel | RemoteModel) -> int | None:
    """The model's context size; None for a remote model (its tokenizer is not here)."""
    return model.provider.context_length if isinstance(model, ServedModel) else None


@dataclass
class ReplySource:
    """A reply being generated, read the same way from the local engine or a remote server."""

    pieces: AsyncIterator[Delta]
    cancel: Callable[[], None]
    prompt_tokens: int | None
    context: int | None
    dropped: int = 0
    notice: str | None = None


async def _local_pieces(stream: RequestStream) -> AsyncIterator[Delta]:
    async for out in stream:
        finish = out.sequence.finish_reason if out.finished else None
        yield Delta(out.text, 1 if out.token is not None else 0, finish)


@dataclass
class ReplySetup:
    """What a reply in a conversation is made with: its persona, settings and model.

    `settings` has the server's defaults under what the persona, conversation and request set;
    `chosen` only the latter, which is what a remote server gets (its own defaults stand otherwise).
    """

    conversation: Conversation
    persona: Persona | None
    settings: Options
    chosen: Options
    model: ServedModel | RemoteModel

    @property
    def context(self) -> int | None:
        return context_of(self.model)

    def reserve(self) -> int:
        """Room kept for the reply: max_tokens when set, else the terminal chat's default share."""
        context = self.context or 0
        return self.settings.max_tokens or min(DEFAULT_REPLY_RESERVE, context // 4)

    async def fit(self, messages: list[dict[str, Any]]) -> FittedPrompt:
        assert isinstance(self.model, ServedModel)
        provider = self.model.provider
        return await asyncio.to_thread(
            fit, messages, provider.count_tokens, provider.context_length, self.reserve()
        )

    async def start(self, messages: list[dict[str, Any]]) -> ReplySource:
        """Start generating; any refusal (context, sampling, upstream) raises before anything is stored."""
        if isinstance(self.model, RemoteModel):
            body = {k: v for k, v in self.chosen.set_values().items() if k in options.OPENAI_NAMES}
            try:
                chat = await RemoteChat.open(self.model, dict(body, messages=messages))
            except UpstreamError as exc:
                if exc.status not in (401, 403):
                    raise
                # The upstream refused *our* key: not something the page's user can log in to fix.
                message = f"The server behind '{self.model.name}' refused this server's API key."
                raise APIError(502, message, type="upstream_error") from None
            return ReplySource(chat.pieces(), chat.close, None, None)
        fitted = await self.fit(messages)
        context = self.model.provider.context_length
        params = self.settings.sampling(max_tokens=min(self.reserve(), context - fitted.prompt_tokens))
        stream = await self.model.submit_chat(fitted.messages, params)
        pieces = _local_pieces(stream)
        return ReplySource(
            pieces, stream.cancel, fitted.prompt_tokens, context, fitted.dropped, fitted.notice
        )


async def reply_setup(
    request: Request,
    user: str,
    conversation_id: str,
    overrides: dict[str, Any] | None = None,
    *,
    admit: bool = True,
) -> ReplySetup:
    """`admit`: this will generate (counted, and refused with 429 when the model's queue is full)."""
    conversation = await store_call(request, "conversation", user, conversation_id)
    persona = (
        await store_call(request, "persona", user, conversation.persona_id)
        if conversation.persona_id
        else None
    )
    check_request_settings(overrides)
    layers = (persona.settings if persona else None, conversation.settings, overrides)
    name = conversation.model or (persona.model if persona else None) or default_model(request)
    model = pick_model(request, name, admit=admit)
    try:
        settings, chosen = options.merged(DEFAULT_SETTINGS, *layers), options.merged(*layers)
    except options.OptionsError as exc:  # stored by an older version, before it was refused
        raise settings_error(exc) from None
    return ReplySetup(conversation, persona, settings, chosen, model)


@router.get("/models")
async def list_models(request: Request) -> list[dict[str, Any]]:
    """What the model picker offers, the default first: local models with their context size and
    the settings a reply uses unless told otherwise; remote ones (their server's defaults apply)."""
    default = default_model(request)
    models = sorted(served_models(request).items(), key=lambda item: item[0] != default)
    return [
        {
            "id": name,
            "local": isinstance(model, ServedModel),
            "context_length": context_of(model),
            "default_settings": DEFAULT_SETTINGS if isinstance(model, ServedModel) else {},
        }
        for name, model in models
    ]


@router.get("/conversations/{conversation_id}/context")
async def context_use(conversation_id: str, request: Request) -> dict[str, Any]:
    """The context meter: tokens the shown branch sends to the model, and what would be left out.
    For a remote model nothing is counted here (`context` is null)."""
    user = await request_user(request)
    setup = await reply_setup(request, user, conversation_id, admit=False)
    if setup.context is None:
        return {"model": setup.model.name, "prompt_tokens": None, "context": None, "dropped": 0}
    turns = await store_call(request, "path", user, conversation_id)
    fitted = await setup.fit(prompt_messages(turns, setup.conversation, setup.persona))
    return {
        "model": setup.model.name,
        "prompt_tokens": fitted.prompt_tokens,
        "context": setup.context,
        "reserve": setup.reserve(),
        "dropped": fitted.dropped,
        "notice": fitted.notice,
    }


@router.post("/conversations/{conversation_id}/reply", response_model=None)
async def reply(conversation_id: str, body: ReplyRequest, request: Request) -> StreamingResponse:
    user = await request_user(request)
    setup = await reply_setup(request, user, conversation_id, body.settings)
    conversation = setup.conversation

    if body.regenerate:
        if body.content is not None or not body.parent_id:
            raise APIError(
                400, "To regenerate, give the user message to answer as parent_id, and no content."
            )
        turns = await store_call(request, "path", user, conversation_id, body.parent_id)
        if turns[-1].message.role != "user":
            raise APIError(400, "Only an answer to a user message can be regenerated.", param="parent_id")
        new_text = None
    else:
        if body.content is None or not body.content.strip():
            raise APIError(400, "The message is empty.", param="content")
        parent = body.parent_id if "parent_id" in body.model_fields_set else conversation.current_leaf_id
        turns = await store_call(request, "path", user, conversation_id, parent) if parent else []
        new_text = body.content

    messages = prompt_messages(turns, conversation, setup.persona)
    if new_text is not None:
        messages.append({"role": "user", "content": new_text})
    source = await setup.start(messages)

    try:
        question = None
        if new_text is not None:
            question = await store_call(
                request, "add_message", user, conversation_id, "user", new_text, parent_id=parent
            )
        parent_id = question.id if question is not None else turns[-1].message.id
        answer = await store_call(
            request,
            "add_message",
            user,
            conversation_id,
            "assistant",
            "",
            parent_id=parent_id,
            status="streaming",
            model=setup.model.name,
        )
    except BaseException:
        source.cancel()  # nothing will read it: free its place in the engine now
        raise
    start = {
        "type": "start",
        "user_message": message_json(question) if question is not None else None,
        "assistant_message_id": answer.id,
        "prompt_tokens": source.prompt_tokens,
        "context": source.context,
        "dropped": source.dropped,
        "notice": source.notice,
    }
    return event_stream(_events(request_store(request), source, answer.id, start))


async def _events(
    store: Store, source: ReplySource, message_id: str, start: dict[str, Any]
) -> AsyncIterator[str]:
    yield sse(start)
    pending: list[str] = []
    last_save = time.perf_counter()
    tokens, reported, first, last = 0, None, None, None
    finish, error = None, None
    try:
        async for piece in source.pieces:
            now = time.perf_counter()
            if piece.tokens:
                tokens += piece.tokens
                first = first if first is not None else now
                last = now
            if piece.completion_tokens is not None:
                reported = piece.completion_tokens
            if piece.text:
                pending.append(piece.text)
                yield sse({"type": "delta", "text": piece.text})
            if pending and now - last_save >= SAVE_EVERY_SECONDS:
                # Taken from `pending` before the await: if the client leaves meanwhile, the save
                # still completes and the final one below must not repeat it.
                chunk, pending, last_save = "".join(pending), [], now
                await asyncio.to_thread(store.append, message_id, chunk)
            if piece.finish_reason:
                finish = piece.finish_reason
                error = piece.error
    finally:
        # Also reached when the client goes away (Stop, a closed tab): the generator is closed. Saving
        # here is synchronous because the task may be cancelled; it is one short transaction.
        source.cancel()
        if pending:
            store.append(message_id, "".join(pending))
        status = "complete" if finish in ("stop", "length") else "incomplete"
        speed = (
            (tokens - 1) / (last - first) if first is not None and last is not None and last > first else None
        )
        tokens = reported if reported is not None else tokens
        store.finish(message_id, status, completion_tokens=tokens, tokens_per_second=speed)
    yield sse(
        {
            "type": "done",
            "status": status,
            "finish_reason": finish,
            "completion_tokens": tokens,
            "tokens_per_second": speed,
            "error": error,
        }
    )
