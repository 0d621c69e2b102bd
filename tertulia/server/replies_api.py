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
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tertulia.chat.conversation import prompt_messages
from tertulia.chat.planner import ReplyPlan, chat_options, default_options, plan_reply
from tertulia.providers import options
from tertulia.providers.base import Provider, ProviderError, Reply
from tertulia.providers.options import Options
from tertulia.server.auth_api import request_user
from tertulia.server.conversations_api import (
    ReplyRequest,
    check_request_settings,
    message_json,
    settings_error,
)
from tertulia.server.errors import APIError
from tertulia.server.openai_api import pick_model
from tertulia.server.state import ServerState, State, StoreDep, in_thread
from tertulia.server.streaming import event_stream, sse
from tertulia.store.conversations import Store
from tertulia.store.schema import Conversation, Persona

router = APIRouter(prefix="/api")

SAVE_EVERY_SECONDS = 0.25  # how often a streaming reply is written to the store
# The periodic saves run here rather than in asyncio's executor: a save in flight when the client
# leaves must be waited for (or taken back) before the last one, and only a concurrent future says
# which of the two happened.
_SAVES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="reply-save")


def default_model(state: ServerState) -> str:
    """What a conversation without a model uses: the first local model, else the first served one
    (the page's model picker shows the same choice)."""
    local = [name for name, m in state.models.items() if m.local]
    return (local or list(state.models))[0]


@dataclass
class ReplySetup:
    """What a reply in a conversation is made with: its persona, options and model.

    `chosen` holds what the persona, the conversation and the request set, over the chat defaults
    unless the model keeps its own (see `planner.chat_options`).
    """

    conversation: Conversation
    persona: Persona | None
    chosen: Options
    model: Provider

    async def plan(self, messages: list[dict[str, Any]]) -> ReplyPlan:
        return await plan_reply(self.model, messages, self.chosen)

    async def start(self, plan: ReplyPlan) -> Reply:
        """Start generating; any refusal (context, options, upstream) raises before anything is stored."""
        try:
            return await self.model.reply(plan.request())
        except ProviderError as exc:
            if exc.status not in (401, 403):
                raise
            # The upstream refused *our* key: not something the page's user can log in to fix.
            message = f"The server behind '{self.model.name}' refused this server's API key."
            raise APIError(502, message, type="upstream_error") from None


async def reply_setup(
    state: ServerState,
    store: Store,
    request: Request,
    user: str,
    conversation_id: str,
    overrides: dict[str, Any] | None = None,
    *,
    admit: bool = True,
) -> ReplySetup:
    """`admit`: this will generate (counted, and refused with 429 when the model's queue is full)."""
    conversation = await in_thread(store.conversation, user, conversation_id)
    persona = (
        await in_thread(store.persona, user, conversation.persona_id) if conversation.persona_id else None
    )
    check_request_settings(overrides)
    name = conversation.model or (persona.model if persona else None) or default_model(state)
    model = pick_model(state, request, name, admit=admit)
    layers = (persona.settings if persona else None, conversation.settings, overrides)
    try:
        chosen = chat_options(model, *layers)
    except options.OptionsError as exc:  # stored by an older version, before it was refused
        raise settings_error(exc) from None
    return ReplySetup(conversation, persona, chosen, model)


@router.get("/models")
async def list_models(state: State) -> list[dict[str, Any]]:
    """What the model picker offers, the default first, with their context size (null when not known
    here) and the settings a reply uses unless told otherwise (a remote server's own apply)."""
    default = default_model(state)
    models = sorted(state.models.items(), key=lambda item: item[0] != default)
    return [
        {
            "id": name,
            "local": model.local,
            "context_length": model.context_length,
            "default_settings": default_options(model).set_values(),
        }
        for name, model in models
    ]


@router.get("/conversations/{conversation_id}/context")
async def context_use(
    conversation_id: str, request: Request, state: State, store: StoreDep
) -> dict[str, Any]:
    """The context meter: tokens the shown branch sends to the model, and what would be left out.
    For a model whose tokens are not counted here (a remote one) `context` is null."""
    user = await request_user(request)
    setup = await reply_setup(state, store, request, user, conversation_id, admit=False)
    turns = await in_thread(store.path, user, conversation_id)
    plan = await setup.plan(prompt_messages(turns, setup.conversation, setup.persona))
    return {
        "model": setup.model.name,
        "prompt_tokens": plan.prompt_tokens,
        "context": plan.context,
        "reserve": plan.reserve,
        "dropped": plan.dropped,
        "notice": plan.notice,
    }


@router.post("/conversations/{conversation_id}/reply", response_model=None)
async def reply(
    conversation_id: str, body: ReplyRequest, request: Request, state: State, store: StoreDep
) -> StreamingResponse:
    user = await request_user(request)
    setup = await reply_setup(state, store, request, user, conversation_id, body.settings)
    conversation = setup.conversation

    if body.regenerate:
        if body.content is not None or not body.parent_id:
            raise APIError(
                400, "To regenerate, give the user message to answer as parent_id, and no content."
            )
        turns = await in_thread(store.path, user, conversation_id, body.parent_id)
        if turns[-1].message.role != "user":
            raise APIError(400, "Only an answer to a user message can be regenerated.", param="parent_id")
        new_text = None
    else:
        if body.content is None or not body.content.strip():
            raise APIError(400, "The message is empty.", param="content")
        parent = body.parent_id if "parent_id" in body.model_fields_set else conversation.current_leaf_id
        turns = await in_thread(store.path, user, conversation_id, parent) if parent else []
        new_text = body.content

    messages = prompt_messages(turns, conversation, setup.persona)
    if new_text is not None:
        messages.append({"role": "user", "content": new_text})
    plan = await setup.plan(messages)
    source = await setup.start(plan)

    try:
        question = None
        if new_text is not None:
            question = await in_thread(
                store.add_message, user, conversation_id, "user", new_text, parent_id=parent
            )
        parent_id = question.id if question is not None else turns[-1].message.id
        answer = await in_thread(
            store.add_message,
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
        "prompt_tokens": plan.prompt_tokens,
        "context": plan.context,
        "dropped": plan.dropped,
        "notice": plan.notice,
    }
    return event_stream(_events(store, source, answer.id, start))


async def _events(store: Store, source: Reply, message_id: str, start: dict[str, Any]) -> AsyncIterator[str]:
    yield sse(start)
    pending: list[str] = []
    last_save = time.perf_counter()
    finish, error = None, None
    in_flight: tuple[Future[None], str] | None = None
    try:
        async for event in source:
            now = time.perf_counter()
            if event.text:
                pending.append(event.text)
                yield sse({"type": "delta", "text": event.text})
            if pending and now - last_save >= SAVE_EVERY_SECONDS:
                chunk, pending, last_save = "".join(pending), [], now
                in_flight = (_SAVES.submit(store.append, message_id, chunk), chunk)
                await asyncio.wrap_future(in_flight[0])
                in_flight = None
            if event.finish_reason:
                finish, error = event.finish_reason, event.error
    finally:
        # Also reached when the client goes away (Stop, a closed tab): the generator is closed. Saving
        # here is synchronous because the task may be cancelled; it is one short transaction. A save
        # the client's leaving interrupted lands first, or, if it never started, its text goes with
        # the rest: the reply keeps every token in order (`append` writes only while streaming, so a
        # save landing after `finish` would be lost).
        source.cancel()
        rest = "".join(pending)
        if in_flight is not None:
            saving, chunk = in_flight
            if saving.cancel():
                rest = chunk + rest
            else:
                wait_for([saving])
        if rest:
            store.append(message_id, rest)
        status = "complete" if finish in ("stop", "length") else "incomplete"
        usage = source.usage
        speed = usage.tokens_per_second
        store.finish(message_id, status, completion_tokens=usage.completion_tokens, tokens_per_second=speed)
    yield sse(
        {
            "type": "done",
            "status": status,
            "finish_reason": finish,
            "completion_tokens": usage.completion_tokens,
            "tokens_per_second": speed,
            "error": error,
        }
    )
