"""A request's journey through the engine: waiting -> running -> finished."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from tertulia.engine.detokenize import IncrementalDetokenizer, StopMatcher
from tertulia.engine.json_mode import JsonConstraint
from tertulia.engine.sampling import SamplingParams, TokenHistory, make_generator


class SequenceFailed(RuntimeError):
    """One sequence could not go on; the engine and the other sequences are unaffected."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepOutput:
    """What one engine step produced for one sequence: new text (may be empty) and maybe the end."""

    sequence: Sequence
    text: str
    token: int | None
    logprob: TokenLogprob | None = None

    @property
    def finished(self) -> bool:
        return self.sequence.status is Status.FINISHED


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    token_bytes: list[bytes | None]
    vocab_size: int
    index: int = 0
    group: int = 0
    blocks: list[int] = field(default_factory=list)  # the KV-cache block table
    admitted: int = -1  # admission order: the newest is preempted first
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    constraint: JsonConstraint | None = None  # JSON mode: where the output is in the grammar
    error: Exception | None = None  # why it ended with finish_reason "error"

    def __post_init__(self) -> None:
        # n > 1 with a seed: each choice gets its own stream, derived from the seed and its index.
        seed = None if self.params.seed is None else self.params.seed + self.index
        self.generator: torch.Generator = make_generator(seed)
        self.history = TokenHistory(self.prompt, self.vocab_size, self.params)
        self.detokenizer = IncrementalDetokenizer(self.token_bytes)
        self.stopper = StopMatcher(self.params.stop)

    @property
    def length(self) -> int:
        """Tokens whose keys/values are (or will be, after this step) in the cache."""
        return len(self.prompt) + len(self.output)

    @property
    def cached_tokens(self) -> list[int]:
        """Tokens to prefill: the prompt, or for a preempted sequence all but its last sampled token."""
        return self.prompt + self.output[:-1] if self.output else self.prompt

    def tokens_left(self, context: int) -> int:
        """How many tokens this sequence may still generate, the next one included."""
        return min(self.max_tokens - len(self.output), context - self.length)

    def append(self, token: int, stop_ids: set[int], context: int) -> str:
        """Record a sampled token; decide whether the sequence ends; return the text to emit."""
        self.output.append(token)
        self.history.add(token)
        # ignore_eos skips the model's own end tokens; explicit stop_token_ids always stop.
        if (token in stop_ids and not self.params.ignore_eos) or token in self.params.stop_token_ids:
            return self._finish("stop")
        piece = self.stopper.push(self.detokenizer.add(token))
        self.text += piece
        if self.stopper.stopped:
            return piece + self._finish("stop")
        if self.constraint is not None:
            self.constraint.accept(token)
            if self.constraint.complete:  # the JSON object is closed: nothing may follow it
                return piece + self._finish("length" if self.constraint.cut_short else "stop")
        if len(self.output) >= self.max_tokens or self.length >= context:
            return piece + self._finish("length")
        return piece

    def abort(self) -> None:
        if self.status is not Status.FINISHED:
            self._finish("abort")

    def fail(self, error: Exception) -> None:
        """End this sequence alone because of `error` (the rest of its batch goes on)."""
        self.status = Status.FINISHED
        self.finish_reason = "error"
        self.error = SequenceFailed(f"Generation failed: {error}")

    def _finish(self, reason: str) -> str:
        self.status = Status.FINISHED
        self.finish_reason = reason
        tail = (
            "" if self.stopper.stopped else self.stopper.push(self.detokenizer.flush()) + self.stopper.flush()
        )
        self.text += tail
        return tail
