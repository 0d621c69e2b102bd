"""A stored conversation as a model sees it: the system prompt, then the shown branch.

The persona's instructions come first (that is the assistant's identity), then the conversation's own
system prompt; the messages are the path from the root to the message being answered. Sampling
settings layer the same way: persona defaults, then the conversation's, then the request's (see
`planner.chat_options`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tertulia.chat.planner import join_system, with_system
from tertulia.store.conversations import Turn
from tertulia.store.schema import Conversation, Persona


def system_prompt(conversation: Conversation, persona: Persona | None) -> str | None:
    return join_system(persona.instructions if persona else None, conversation.system_prompt)


def prompt_messages(
    turns: Sequence[Turn], conversation: Conversation, persona: Persona | None
) -> list[dict[str, Any]]:
    history = [{"role": t.message.role, "content": t.message.content} for t in turns if t.message.content]
    return with_system(system_prompt(conversation, persona), history)
