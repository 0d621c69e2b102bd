"""A stored conversation as a model sees it: the system prompt, then the shown branch.

The persona's instructions come first (that is the assistant's identity), then the conversation's own
system prompt; the messages are the path from the root to the message being answered. Sampling
settings layer the same way: persona defaults, then the conversation's, then the request's (see
`providers.options.merged`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tertulia.store.conversations import Turn
from tertulia.store.schema import Conversation, Persona


def system_prompt(conversation: Conversation, persona: Persona | None) -> str | None:
    parts = [persona.instructions if persona else None, conversation.system_prompt]
    text = "\n\n".join(p.strip() for p in parts if p and p.strip())
    return text or None


def prompt_messages(
    turns: Sequence[Turn], conversation: Conversation, persona: Persona | None
) -> list[dict[str, Any]]:
    system = system_prompt(conversation, persona)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": t.message.role, "content": t.message.content} for t in turns if t.message.content]
    return messages
