"""A conversation held in memory with one provider: history, system prompt, options.

The terminal chat keeps one; the web app keeps its conversations in the store and plans each reply
the same way (`planner.plan_reply`). A reply cut short (Ctrl-C, a closed generator) keeps what was
said so far in the history.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tertulia.chat.planner import ReplyPlan, chat_options, plan_reply, with_system
from tertulia.errors import PromptError
from tertulia.providers.base import Provider, Usage
from tertulia.providers.options import Options


@dataclass
class ChatSession:
    provider: Provider
    system: str | None = None
    options: Options = field(default_factory=Options)  # what the user chose; defaults fill the rest
    history: list[dict[str, Any]] = field(default_factory=list)
    last_usage: Usage | None = None
    last_plan: ReplyPlan | None = None
    last_finish_reason: str | None = None
    last_error: str | None = None

    def reset(self) -> None:
        self.history.clear()

    def messages(self) -> list[dict[str, Any]]:
        return with_system(self.system, self.history)

    async def send(self, text: str) -> AsyncIterator[str]:
        """Stream the reply to `text`. The reply (even a partial one, if interrupted) joins the history."""
        if not text.strip():
            raise PromptError("The message is empty.", "Type something to send.")
        messages = self.messages() + [{"role": "user", "content": text}]
        plan = await plan_reply(self.provider, messages, chat_options(self.provider, self.options))
        reply = await self.provider.reply(plan.request())
        self.history.append({"role": "user", "content": text})
        self.last_plan, self.last_usage = plan, reply.usage
        self.last_finish_reason = self.last_error = None
        said: list[str] = []
        try:
            async for event in reply:
                if event.text:
                    said.append(event.text)
                    yield event.text
                if event.finish_reason:
                    self.last_finish_reason, self.last_error = event.finish_reason, event.error
        finally:
            reply.cancel()
            self.history.append({"role": "assistant", "content": "".join(said)})
