"""What the chat layer and the interfaces need from any source of completions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from tertulia.engine.sampling import SamplingParams


@dataclass
class Chunk:
    """A piece of a streamed reply for choice `index`; the last one has a finish_reason."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class Delta:
    """A piece of one streamed reply as the chat layer reads it, whichever provider wrote it."""

    text: str = ""
    tokens: int = 0  # tokens this piece adds (0 for a piece that only ends the reply)
    finish_reason: str | None = None
    completion_tokens: int | None = None  # the provider's own total, when it reports one
    error: str | None = None  # why the reply ended early (finish_reason "error")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        if self.first_token_seconds is None or self.completion_tokens < 2:
            return None
        elapsed = self.seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / elapsed if elapsed > 0 else None


class Provider(Protocol):
    name: str
    context_length: int

    def count_tokens(self, messages: list[dict[str, Any]]) -> int: ...

    def stream_chat(
        self, messages: list[dict[str, Any]], params: SamplingParams, usage: Usage
    ) -> Iterator[Chunk]: ...
