"""A stored conversation as a model sees it: the system prompt, then the shown branch.

The persona's instructions come first (that is the assistant's identity), then the conversation's own
system prompt; the messages are the path from the root to the message being answered. Sampling
settings layer the same way: persona defaults, then the conversation's, then the request's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tertulia.store.conversations import Turn
from tertulia.store.schema import Conversation, Persona

# Settings a conversation, persona or request may set, and the ranges the API accepts.
SETTINGS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "max_tokens": (1, 32768),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.01, 100.0),
    "seed": (-(2**63), 2**63 - 1),
}
KEYS = {*SETTINGS, "stop"}
# What an OpenAI-compatible server accepts (repetition_penalty is this engine's, and vLLM's, extra).
OPENAI_SETTINGS = KEYS - {"repetition_penalty"}


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


def merged_settings(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers win; unknown keys and None values are ignored."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key in KEYS and value is not None:
                merged[key] = value
    return merged


def check_settings(settings: dict[str, Any]) -> None:
    """Raise ValueError naming the first setting that is unknown or out of range."""
    for key, value in settings.items():
        if key == "stop":
            if (
                not isinstance(value, list)
                or len(value) > 4
                or not all(isinstance(s, str) and s for s in value)
            ):
                raise ValueError("stop must be a list of at most 4 non-empty strings")
            continue
        if key not in SETTINGS:
            raise ValueError(f"unknown setting {key!r}")
        if value is None:
            continue
        low, high = SETTINGS[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ValueError(f"{key} must be a number in [{low}, {high}]")
