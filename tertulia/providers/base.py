"""The reply contract: what every interface and the chat layer ask of a model, whoever runs it.

A provider streams a reply (`ReplyEvent`s, with one `Usage`) for chat messages or a raw prompt, and
may count tokens, decode them, score a text's log-likelihood or forward an OpenAI request as it is.
What it can do is listed in `capabilities`; asking for something else raises `Unsupported`, which
interfaces turn into a clear 400. Interfaces never look at a provider's kind, only at these.

This module knows no engine, no HTTP and no store: those sit on either side of it.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tertulia.errors import TertuliaError
from tertulia.providers.options import Options

Message = dict[str, Any]


class Capability(enum.StrEnum):
    TOKENS = "tokens"  # counts and decodes tokens with the model's own tokenizer; knows its context
    RAW_PROMPT = "raw_prompt"  # takes a prompt as text or token ids (no chat template)
    LOGPROBS = "logprobs"  # reports each sampled token's log-probability and alternatives
    SCORE = "score"  # the log-likelihood of given continuations of given contexts
    PASSTHROUGH = "passthrough"  # forwards an OpenAI /v1 request as the client wrote it


class Unsupported(TertuliaError):
    """Asked of a provider that lacks the capability."""

    def __init__(self, provider: str, capability: Capability) -> None:
        super().__init__(f"The model '{provider}' cannot do this: it lacks '{capability}'.")
        self.capability = capability


class ProviderError(TertuliaError):
    """A request refused before its first token, with the HTTP status an interface should answer
    (a remote server's own 4xx stays the client's fault; an unreachable one is a 502)."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        error = {"message": message, "type": "upstream_error", "param": None, "code": f"upstream_{status}"}
        self.body = body or {"error": error}


@dataclass(frozen=True)
class TokenAlternative:
    token: int
    raw: bytes  # the token's bytes as the tokenizer writes them (may be part of a character)
    logprob: float

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class TokenLogprob(TokenAlternative):
    """A sampled token's log-probability and the likeliest tokens at its place."""

    top: tuple[TokenAlternative, ...] = ()


@dataclass(frozen=True)
class ReplyEvent:
    """What a reply yields: new text of choice `index` (maybe empty), the tokens it came from when the
    provider knows them, and at the end of a choice its finish reason ("stop", "length", "abort",
    "error" with `error` saying why)."""

    index: int = 0
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Usage:
    """Tokens in and out, and timing. `prompt_tokens` is None when the provider cannot count them."""

    prompt_tokens: int | None = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    first_token_seconds: float | None = None

    def produced(self, tokens: int) -> None:
        """`tokens` more were generated, now."""
        if tokens <= 0:
            return
        self.completion_tokens += tokens
        self.seconds = time.perf_counter() - self.started
        if self.first_token_seconds is None:
            self.first_token_seconds = self.seconds

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + self.completion_tokens

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        if self.first_token_seconds is None or self.completion_tokens < 2:
            return None
        elapsed = self.seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / elapsed if elapsed > 0 else None


@dataclass(frozen=True)
class ReplyRequest:
    """One reply to generate: chat `messages` (templated by the provider) or a raw `prompt`."""

    messages: list[Message] | None = None
    prompt: str | list[int] | None = None
    options: Options = field(default_factory=Options)
    n: int = 1
    logprobs: int | None = None  # how many alternatives per token; None: no log-probabilities
    json_object: bool = False
    ignore_eos: bool = False  # go on to max_tokens (measurements)


class Reply(ABC):
    """A reply being generated: read it with `async for`, end it early with `cancel()`.

    Reading it to the end (or cancelling) frees what it holds; `cancel()` may be called any number of
    times, from a task being cancelled too.
    """

    usage: Usage
    prompt_ids: list[int] | None = None  # the prompt as the model saw it, when the provider knows it

    @abstractmethod
    def events(self) -> AsyncIterator[ReplyEvent]: ...

    @abstractmethod
    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[ReplyEvent]:
        return self.events()


@dataclass(frozen=True)
class EngineLoad:
    """What a provider running its own engine reports for metrics."""

    waiting: int
    running: int
    kv_used: float  # fraction of the KV memory budget in use
    prefix_hit_tokens: int
    preemptions: int


class ReplyObserver(ABC):
    """Receives timings as a provider generates (the server makes Prometheus metrics of them)."""

    @abstractmethod
    def first_token(self, seconds: float) -> None: ...

    @abstractmethod
    def next_token(self, seconds: float) -> None: ...

    @abstractmethod
    def finished(self, prompt_tokens: int, completion_tokens: int) -> None: ...


class Provider(ABC):
    """A model, wherever it runs. Subclasses implement `reply` and what their capabilities promise."""

    name: str
    capabilities: frozenset[Capability] = frozenset()
    context_length: int | None = None  # None: not known here
    fingerprint: str | None = None  # changes when what decides the tokens changes (OpenAI's seed docs)
    local: bool = False  # runs in this process (the model picker says so)
    summary: str = ""  # a few words for people: precision and context, or where it runs
    own_defaults: bool = False  # applies its own default options (a remote server): send only chosen ones

    def start(self) -> None:  # noqa: B027 - optional hook
        """Get ready to answer (threads, connections); called once the event loop runs."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """End what `start` began; requests in flight end with finish_reason "abort"."""

    def take_loop(self) -> Callable[[], None] | None:
        """The provider's engine loop, for the caller to run in a thread of its choice until `stop()`
        (the main thread: torch's workers run faster there); `start()` then starts no thread of its
        own. None when the provider has no loop."""
        return None

    @property
    def pending(self) -> int:
        """Requests accepted and not finished (the server's queue limit counts them)."""
        return 0

    def engine_load(self) -> EngineLoad | None:
        """How busy its engine is, for providers that run one."""
        return None

    def observe(self, observer: ReplyObserver) -> None:  # noqa: B027 - optional hook
        """Report timings to `observer` from now on (providers without an engine ignore it)."""

    @abstractmethod
    async def reply(self, request: ReplyRequest) -> Reply:
        """Start generating. A request refused (options, context, upstream) raises before any event."""

    def _require(self, capability: Capability) -> None:
        if capability not in self.capabilities:
            raise Unsupported(self.name, capability)

    async def count_tokens(self, messages: list[Message]) -> int:
        """Tokens the prompt for `messages` takes, generation prompt included."""
        self._require(Capability.TOKENS)
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        self._require(Capability.TOKENS)
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, control tokens written out (what `echo` shows)."""
        self._require(Capability.TOKENS)
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """`text` as the model's tokens, as plain text: nothing added, control strings not honoured."""
        self._require(Capability.TOKENS)
        raise NotImplementedError

    def encode_conversation(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        """A whole conversation as the model sees it, and which tokens are the assistant's replies."""
        self._require(Capability.TOKENS)
        raise NotImplementedError

    @property
    def document_start(self) -> int:
        """The token a document is scored after, so its first token has a context: the model's
        beginning-of-text token, else its end-of-text one (lm-evaluation-harness's rule)."""
        self._require(Capability.TOKENS)
        raise NotImplementedError

    async def loglikelihoods(
        self, requests: list[tuple[list[int], list[int]]], max_length: int | None = None
    ) -> list[list[float]]:
        """For each (context ids, continuation ids): the log-probability of every continuation token
        given all that precedes it, the oldest context dropped so that at most `max_length` tokens (the
        model's context by default) go in at once."""
        self._require(Capability.SCORE)
        raise NotImplementedError

    async def forward(self, path: str, body: dict[str, Any], stream: bool) -> Any:
        """Pass an OpenAI request to the upstream as it is: its JSON answer, or its SSE bytes."""
        self._require(Capability.PASSTHROUGH)
        raise NotImplementedError
