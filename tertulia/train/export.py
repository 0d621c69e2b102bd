"""Training data from the store: the replies people liked, as fine-tuning examples.

An example is the conversation up to and including a reply rated thumbs-up, as the model saw it
(persona instructions and system prompt first, then the branch that led to that reply). Replies rated
down, cut short or still streaming are never exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tertulia.chat.conversation import prompt_messages
from tertulia.store.conversations import NotFound, Store
from tertulia.store.schema import Conversation, Persona

PAGE = 200


def _persona(store: Store, user_id: str, conversation: Conversation) -> Persona | None:
    if not conversation.persona_id:
        return None
    try:
        return store.persona(user_id, conversation.persona_id)
    except NotFound:
        return None


def _conversations(store: Store, user_id: str) -> Iterator[Conversation]:
    offset = 0
    while batch := store.conversations(user_id, limit=PAGE, offset=offset):
        yield from batch
        offset += len(batch)


def examples(store: Store, user_id: str, *, shown: bool = False) -> Iterator[dict[str, Any]]:
    """One `{"messages": [...]}` per liked reply; with `shown`, each conversation's shown branch up
    to its last reply instead (unless that reply is rated down)."""
    for conversation in _conversations(store, user_id):
        ratings = store.ratings(user_id, conversation.id)
        persona = _persona(store, user_id, conversation)
        if shown:
            path = store.path(user_id, conversation.id)
            replies = [t.message.id for t in path if t.message.role == "assistant"]
            chosen = replies[-1:] if replies and ratings.get(replies[-1], 0) >= 0 else []
        else:
            chosen = sorted(m for m, rating in ratings.items() if rating > 0)
        for message_id in chosen:
            turns = store.path(user_id, conversation.id, message_id)
            if any(t.message.status != "complete" for t in turns):
                continue
            yield {"messages": prompt_messages(turns, conversation, persona)}
