"""Fit a conversation into the model's context: system prompt + as much recent history as fits.

When the prompt plus the room reserved for the reply does not fit, the oldest turns go first (a turn
is a user message and the replies that follow it); system messages are never dropped, and neither is
the latest user message. The caller is told how many messages were left out, so it can say so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tertulia.errors import PromptError

Message = dict[str, Any]


@dataclass
class FittedPrompt:
    messages: list[Message]
    prompt_tokens: int
    dropped: int

    @property
    def notice(self) -> str | None:
        if not self.dropped:
            return None
        plural = "s" if self.dropped != 1 else ""
        return f"{self.dropped} earlier message{plural} left out to fit the model's context."


def _turn_starts(history: list[Message]) -> list[int]:
    """Indexes where a turn may start (each user message); dropping keeps whole turns."""
    starts = [i for i, m in enumerate(history) if m["role"] == "user"]
    return starts or [0]


async def fit(
    messages: list[Message],
    count_tokens: Callable[[list[Message]], Awaitable[int]],
    context: int,
    reserve: int,
) -> FittedPrompt:
    """Keep system messages and the longest recent history with count + reserve <= context."""
    system = [m for m in messages if m["role"] == "system"]
    history = [m for m in messages if m["role"] != "system"]
    budget = context - reserve
    starts = _turn_starts(history)

    async def attempt(start: int) -> tuple[list[Message], int]:
        kept = system + history[start:]
        return kept, await count_tokens(kept)

    kept, tokens = await attempt(0)
    if tokens <= budget:
        return FittedPrompt(kept, tokens, 0)
    # Fitting is monotonic in how many turns are dropped: binary search the first turn to keep.
    low, high = 0, len(starts) - 1
    best: tuple[list[Message], int, int] | None = None
    while low <= high:
        mid = (low + high) // 2
        kept, tokens = await attempt(starts[mid])
        if tokens <= budget:
            best = (kept, tokens, starts[mid])
            high = mid - 1
        else:
            low = mid + 1
    if best is None:
        last = starts[-1]
        _, tokens = await attempt(last)
        raise PromptError(
            f"The latest message does not fit: the prompt needs {tokens} tokens and {reserve} are "
            f"reserved for the reply, but the model's context is {context} tokens.",
            "Shorten the message or the system prompt, or lower max tokens.",
            code="context_length_exceeded",
        )
    kept, tokens, start = best
    return FittedPrompt(kept, tokens, start)
