"""Export a conversation (JSON with its whole tree, or Markdown of the shown branch) and import it back.

An import is checked whole before anything is written (known format, roles, parents that exist and
come first, sizes; its sampling settings are the caller's to check, against the options' one table),
then written in one transaction with fresh ids: importing the same file twice
gives two conversations, and a bad file changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from tertulia.errors import TertuliaError
from tertulia.store.conversations import ROLES, Store
from tertulia.store.schema import Conversation, Message, new_id

FORMAT = "tertulia.conversation"
VERSION = 1
MAX_MESSAGES = 10_000
MAX_CONTENT = 1_000_000
MAX_NAME = 300  # a model's name, as the store's columns hold it


def _short_text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME


def export_json(store: Store, user_id: str, conversation_id: str) -> dict[str, Any]:
    conversation = store.conversation(user_id, conversation_id)
    with store.db.session() as s:
        messages = s.scalars(
            select(Message)
            .where(Message.conversation_id == conversation.id)
            .order_by(Message.created_at, Message.id)
        ).all()
    return {
        "format": FORMAT,
        "version": VERSION,
        "title": conversation.title,
        "system_prompt": conversation.system_prompt,
        "model": conversation.model,
        "settings": conversation.settings,
        "created_at": conversation.created_at.isoformat(),
        "current_leaf_id": conversation.current_leaf_id,
        "messages": [
            {
                "id": m.id,
                "parent_id": m.parent_id,
                "role": m.role,
                "content": m.content,
                "status": m.status,
                "model": m.model,
                "created_at": m.created_at.isoformat(),
            }
            for m in messages
        ],
    }


def export_markdown(store: Store, user_id: str, conversation_id: str) -> str:
    """The shown branch, as a reader would want it: a title, the system prompt, then each turn."""
    conversation = store.conversation(user_id, conversation_id)
    lines = [f"# {conversation.title}", ""]
    if conversation.system_prompt:
        lines += ["> " + line for line in conversation.system_prompt.splitlines()] + [""]
    names = {"user": "You", "assistant": "Assistant", "system": "System"}
    for turn in store.path(user_id, conversation_id):
        message = turn.message
        suffix = " *(incomplete)*" if message.status != "complete" else ""
        lines += [f"**{names[message.role]}**{suffix}", "", message.content, ""]
    return "\n".join(lines)


def _check(data: Any) -> list[dict[str, Any]]:
    def fail(problem: str) -> TertuliaError:
        return TertuliaError(
            f"Not a conversation export: {problem}.", "Import a JSON file exported by Tertulia."
        )

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail(f"'format' must be {FORMAT!r}")
    if data.get("version") != VERSION:
        raise fail(f"version {data.get('version')!r} is not supported (this Tertulia reads {VERSION})")
    messages = data.get("messages")
    if not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
        raise fail(f"'messages' must be a list of at most {MAX_MESSAGES}")
    seen: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise fail(f"message {i} is not an object")
        if not isinstance(message.get("id"), str) or message["id"] in seen:
            raise fail(f"message {i} has a missing or repeated id")
        if message.get("role") not in ROLES:
            raise fail(f"message {i} has an unknown role {message.get('role')!r}")
        content = message.get("content")
        if not isinstance(content, str) or len(content) > MAX_CONTENT:
            raise fail(f"message {i} has no text content, or too much")
        parent = message.get("parent_id")
        if parent is not None and not isinstance(parent, str):
            raise fail(f"message {i} has a parent_id that is not text")
        if message.get("model") is not None and not _short_text(message["model"]):
            raise fail(f"message {i} has a model that is not text of at most {MAX_NAME} characters")
        if parent is not None and parent not in seen:  # parents first: no cycles, no dangling links
            raise fail(f"message {i} answers a message that does not come before it")
        seen.add(message["id"])
    for key in ("title", "system_prompt"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise fail(f"'{key}' must be text")
    if data.get("model") is not None and not _short_text(data["model"]):
        raise fail(f"'model' must be text of at most {MAX_NAME} characters")
    if data.get("settings") is not None and not isinstance(data["settings"], dict):
        raise fail("'settings' must be an object")
    return messages


def import_json(store: Store, user_id: str, data: Any) -> Conversation:
    messages = _check(data)
    ids = {m["id"]: new_id() for m in messages}
    with store.db.session() as s:
        conversation = Conversation(
            user_id=user_id,
            title=(data.get("title") or "Imported chat")[:300],
            system_prompt=data.get("system_prompt"),
            model=data.get("model"),
            settings=data.get("settings") or {},
            current_leaf_id=ids.get(data.get("current_leaf_id") or "")
            or (ids[messages[-1]["id"]] if messages else None),
        )
        s.add(conversation)
        s.flush()
        for message in messages:
            when = _when(message.get("created_at"))
            status = message.get("status")
            s.add(
                Message(
                    id=ids[message["id"]],
                    conversation_id=conversation.id,
                    parent_id=ids[message["parent_id"]] if message.get("parent_id") else None,
                    role=message["role"],
                    content=message["content"],
                    # A reply that was streaming when exported is not streaming here.
                    status="incomplete" if status in ("streaming", "incomplete") else "complete",
                    model=message.get("model"),
                    **({"created_at": when} if when is not None else {}),
                )
            )
            s.flush()  # parents before children, for the foreign key
        return conversation


def _when(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None
