"""A conversation with one provider: history, system prompt, sampling settings, context fitting.

The terminal chat uses it directly; the web app and Telegram will persist the same turns in the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from tertulia.chat.context import FittedPrompt, fit
from tertulia.engine.sampling import SamplingParams
from tertulia.errors import PromptError
from tertulia.providers.base import Provider, Usage

# Room kept for the reply when max_tokens is not set: enough for a long answer, never most of the context.
DEFAULT_REPLY_RESERVE = 512


@dataclass
class ChatSession:
    provider: Provider
    system: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    history: list[dict[str, Any]] = field(default_factory=list)
    last_usage: Usage | None = None
    last_fit: FittedPrompt | None = None
    last_finish_reason: str | None = None

    def reset(self) -> None:
        self.history.clear()

    def messages(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text`. The reply (even a partial one, if interrupted) joins the history."""
        if not text.strip():
            raise PromptError("The message is empty.", "Type something to send.")
        context = self.provider.context_length
        reserve = self.params.max_tokens or min(DEFAULT_REPLY_RESERVE, context // 4)
        fitted = fit(
            self.messages() + [{"role": "user", "content": text}],
            self.provider.count_tokens,
            context,
            reserve,
        )
        params = replace(self.params, n=1, max_tokens=min(reserve, context - fitted.prompt_tokens))
        self.history.append({"role": "user", "content": text})
        self.last_fit, self.last_usage, self.last_finish_reason = fitted, Usage(), None
        reply: list[str] = []
        try:
            for chunk in self.provider.stream_chat(fitted.messages, params, self.last_usage):
                if chunk.text:
                    reply.append(chunk.text)
                    yield chunk.text
                if chunk.finish_reason:
                    self.last_finish_reason = chunk.finish_reason
        finally:
            self.history.append({"role": "assistant", "content": "".join(reply)})
