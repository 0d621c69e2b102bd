"""One reply planner for every interface: what a model is sent to answer a conversation.

Given a provider, the conversation's messages (system prompts first) and the layered options, it
fits the history into the context (`context.fit`), reserves room for the reply, caps `max_tokens` to
what is left, and reports the numbers the context meter shows. The terminal chat, the web app's
replies and every later interface plan with it, so they agree to the token.

A provider that cannot count tokens (a remote server) gets the whole conversation and the options as
chosen: the upstream judges its own context. This module knows no HTTP, terminal or store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tertulia.chat.context import FittedPrompt, fit
from tertulia.providers import options
from tertulia.providers.base import Capability, Message, Provider, ReplyRequest
from tertulia.providers.options import Options

# What a reply uses when nothing above says otherwise, for a model run here: small models loop
# without a little repetition penalty. A server with its own defaults keeps them.
CHAT_DEFAULTS = Options(temperature=0.3, top_p=0.9, repetition_penalty=1.1)
# Room kept for the reply when max_tokens is not set: enough for a long answer, never most of the context.
DEFAULT_REPLY_RESERVE = 512


def join_system(*parts: str | None) -> str | None:
    """System prompts layered in order (a persona's instructions, then the conversation's own)."""
    text = "\n\n".join(p.strip() for p in parts if p and p.strip())
    return text or None


def with_system(system: str | None, history: Sequence[Message]) -> list[Message]:
    return ([{"role": "system", "content": system}] if system else []) + list(history)


def chat_options(provider: Provider, *layers: dict[str, Any] | Options | None) -> Options:
    """The layers (later wins), over the chat defaults unless the provider keeps its own.
    Raises OptionsError for a value no entry point accepts (settings stored by an older version)."""
    return options.merged(*layers) if provider.own_defaults else options.merged(CHAT_DEFAULTS, *layers)


def default_options(provider: Provider) -> Options:
    """What a reply from `provider` uses when no layer sets anything (the web app shows it)."""
    return chat_options(provider)


def reserve_for(provider: Provider, chosen: Options) -> int | None:
    """Tokens kept for the reply: max_tokens when set, else a share of the context."""
    if provider.context_length is None:
        return None
    return chosen.max_tokens or min(DEFAULT_REPLY_RESERVE, provider.context_length // 4)


@dataclass
class ReplyPlan:
    """What goes to the provider, and what the context meter shows (None where not counted)."""

    messages: list[Message]
    options: Options
    prompt_tokens: int | None = None
    context: int | None = None
    reserve: int | None = None
    dropped: int = 0

    @property
    def notice(self) -> str | None:
        return FittedPrompt(self.messages, self.prompt_tokens or 0, self.dropped).notice

    def request(self) -> ReplyRequest:
        return ReplyRequest(messages=self.messages, options=self.options)


async def plan_reply(provider: Provider, messages: list[Message], chosen: Options) -> ReplyPlan:
    """Fit `messages` (raises PromptError when the latest one cannot fit) and cap the reply."""
    context, reserve = provider.context_length, reserve_for(provider, chosen)
    if Capability.TOKENS not in provider.capabilities or context is None or reserve is None:
        return ReplyPlan(list(messages), chosen)
    fitted = await fit(messages, provider.count_tokens, context, reserve)
    capped = chosen.model_copy(update={"max_tokens": min(reserve, context - fitted.prompt_tokens)})
    return ReplyPlan(fitted.messages, capped, fitted.prompt_tokens, context, reserve, fitted.dropped)
