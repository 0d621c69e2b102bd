"""/api: the web app's conversations, personas and replies, kept in the store.

A reply streams as server-sent events (`start`, `delta`..., `done`) and is saved while it streams: a
reload mid-reply finds what was generated so far, and a reply whose client went away (Stop, a closed
tab) stops generating at the engine's next step and is kept, marked incomplete.

Without --auth every request acts as the store's local user; with it, as the logged-in account
(see auth_api.py), which never reaches another account's rows.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from tertulia.errors import TertuliaError
from tertulia.providers import options
from tertulia.server.auth_api import UserId
from tertulia.server.errors import APIError
from tertulia.server.state import StoreDep, in_thread
from tertulia.store import transfer
from tertulia.store.conversations import Turn
from tertulia.store.schema import Conversation, Message, Persona

router = APIRouter(prefix="/api")

MAX_MESSAGE_CHARS = 100_000  # a long paste is fine; a file's worth of text is an upload, not a message
ModelName = Annotated[str, Field(min_length=1, max_length=transfer.MAX_NAME)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConversationFields(_Body):
    title: Annotated[str, Field(min_length=1, max_length=300)] | None = None
    system_prompt: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | None = None
    persona_id: str | None = None
    model: ModelName | None = None
    settings: dict[str, Any] | None = None


class PersonaFields(_Body):
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    instructions: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | None = None
    model: ModelName | None = None
    settings: dict[str, Any] | None = None


class ReplyRequest(_Body):
    """Send `content` under `parent_id` (default: the shown leaf; an edit names the edited message's
    parent), or with `regenerate`, answer the user message `parent_id` again."""

    content: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | None = None
    parent_id: str | None = None
    regenerate: bool = False
    settings: dict[str, Any] | None = None


class BranchRequest(_Body):
    message_id: str


class RatingRequest(_Body):
    rating: Annotated[int, Field(ge=-1, le=1)]
    comment: Annotated[str, Field(max_length=2000)] | None = None


def check_request_settings(settings: dict[str, Any] | None) -> None:
    try:
        options.parse(settings)
    except options.OptionsError as exc:
        raise settings_error(exc) from None


def settings_error(error: options.OptionsError) -> APIError:
    param = "settings" + (f".{error.param}" if error.param else "")
    return APIError(400, f"settings: {error}" if error.param else str(error), param=param)


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "title": conversation.title,
        "persona_id": conversation.persona_id,
        "system_prompt": conversation.system_prompt,
        "model": conversation.model,
        "settings": conversation.settings,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
    }


def message_json(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "parent_id": message.parent_id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "model": message.model,
        "completion_tokens": message.completion_tokens,
        "tokens_per_second": message.tokens_per_second,
        "created_at": message.created_at.isoformat(),
    }


def turn_json(turn: Turn) -> dict[str, Any]:
    return dict(
        message_json(turn.message), branch={"index": turn.index, "count": turn.count, "ids": turn.sibling_ids}
    )


def persona_json(persona: Persona) -> dict[str, Any]:
    return {
        "id": persona.id,
        "name": persona.name,
        "instructions": persona.instructions,
        "model": persona.model,
        "settings": persona.settings,
    }


# --- conversations ---------------------------------------------------------------------------------


@router.get("/conversations")
async def list_conversations(
    user: UserId,
    store: StoreDep,
    search: Annotated[str, Query(max_length=1000)] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> list[dict[str, Any]]:
    rows = await in_thread(
        store.conversations,
        user,
        search=search,
        limit=limit,
        offset=offset,
    )
    return [conversation_json(c) for c in rows]


@router.post("/conversations", status_code=201)
async def create_conversation(body: ConversationFields, user: UserId, store: StoreDep) -> dict[str, Any]:
    check_request_settings(body.settings)
    fields = body.model_dump(exclude_none=True)
    return conversation_json(await in_thread(store.create_conversation, user, **fields))


@router.get("/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, user: UserId, store: StoreDep) -> dict[str, Any]:
    conversation = await in_thread(store.conversation, user, conversation_id)
    turns = await in_thread(store.path, user, conversation_id)
    ratings = await in_thread(store.ratings, user, conversation_id)
    return dict(conversation_json(conversation), messages=[turn_json(t) for t in turns], ratings=ratings)


@router.patch("/conversations/{conversation_id}")
async def update_conversation(
    conversation_id: str, body: ConversationFields, user: UserId, store: StoreDep
) -> dict[str, Any]:
    check_request_settings(body.settings)
    fields = body.model_dump(exclude_unset=True)
    if "title" in fields and fields["title"] is None:
        raise APIError(400, "title cannot be empty", param="title")
    return conversation_json(await in_thread(store.update_conversation, user, conversation_id, **fields))


@router.delete("/conversations/{conversation_id}", status_code=204)
async def delete_conversation(conversation_id: str, user: UserId, store: StoreDep) -> Response:
    await in_thread(store.delete_conversation, user, conversation_id)
    return Response(status_code=204)


@router.get("/conversations/{conversation_id}/export", response_model=None)
async def export(
    conversation_id: str, user: UserId, store: StoreDep, format: Literal["json", "markdown"] = "json"
) -> JSONResponse | PlainTextResponse:
    exporter = transfer.export_json if format == "json" else transfer.export_markdown
    data = await in_thread(exporter, store, user, conversation_id)
    name = f"conversation-{conversation_id}.{'json' if format == 'json' else 'md'}"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if format == "json":
        return JSONResponse(data, headers=headers)
    return PlainTextResponse(data, media_type="text/markdown; charset=utf-8", headers=headers)


@router.post("/conversations/import", status_code=201)
async def import_conversation(user: UserId, store: StoreDep, data: Annotated[Any, Body()]) -> dict[str, Any]:
    if isinstance(data, dict):
        check_request_settings(data.get("settings"))
    try:
        conversation = await asyncio.to_thread(transfer.import_json, store, user, data)
    except TertuliaError as exc:
        raise APIError(400, str(exc)) from None
    return conversation_json(conversation)


@router.post("/conversations/{conversation_id}/branch")
async def show_branch(
    conversation_id: str, body: BranchRequest, user: UserId, store: StoreDep
) -> list[dict[str, Any]]:
    turns = await in_thread(store.show_branch, user, conversation_id, body.message_id)
    return [turn_json(t) for t in turns]


@router.post("/messages/{message_id}/rating", status_code=204)
async def rate(message_id: str, body: RatingRequest, user: UserId, store: StoreDep) -> Response:
    await in_thread(store.rate, user, message_id, body.rating, body.comment)
    return Response(status_code=204)


# --- personas --------------------------------------------------------------------------------------


@router.get("/personas")
async def list_personas(user: UserId, store: StoreDep) -> list[dict[str, Any]]:
    return [persona_json(p) for p in await in_thread(store.personas, user)]


@router.post("/personas", status_code=201)
async def create_persona(body: PersonaFields, user: UserId, store: StoreDep) -> dict[str, Any]:
    if not body.name:
        raise APIError(400, "A persona needs a name.", param="name")
    check_request_settings(body.settings)
    fields = body.model_dump(exclude_none=True)
    return persona_json(await in_thread(store.create_persona, user, **fields))


@router.patch("/personas/{persona_id}")
async def update_persona(
    persona_id: str, body: PersonaFields, user: UserId, store: StoreDep
) -> dict[str, Any]:
    check_request_settings(body.settings)
    fields = body.model_dump(exclude_none=True)
    return persona_json(await in_thread(store.update_persona, user, persona_id, **fields))


@router.delete("/personas/{persona_id}", status_code=204)
async def delete_persona(persona_id: str, user: UserId, store: StoreDep) -> Response:
    await in_thread(store.delete_persona, user, persona_id)
    return Response(status_code=204)
