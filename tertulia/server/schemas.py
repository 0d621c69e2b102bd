"""Request bodies of the OpenAI-compatible API: the pydantic models *are* the contract.

Field names, defaults and ranges follow OpenAI's published spec; extensions common in vLLM and
llama.cpp (top_k, min_p, repetition_penalty) are accepted too. Unknown fields are ignored, as
OpenAI's own server does, so newer clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tertulia.providers.base import ReplyRequest
from tertulia.providers.options import MaxTokens, Options

MAX_N = 16
# Each prompt of a list becomes a request of its own: a list is bounded like a burst of requests.
MAX_PROMPTS = 64
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for the legacy route


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"] = "text"


class SamplingFields(Options):
    """Fields shared by /v1/chat/completions and /v1/completions: the sampling options (their one table
    is `providers.options`) and what both routes add."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def chosen(self, **override: Any) -> Options:
        """The sampling options of this body (checked already, as it was read)."""
        values = {name: getattr(self, name) for name in Options.model_fields}
        return Options.model_construct(**(values | override))


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if all(not m.text().strip() for m in self.messages):
            raise ValueError("messages are all empty")
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates expect them (plain-text content; developer = system)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    def reply_request(self) -> ReplyRequest:
        return ReplyRequest(
            messages=self.template_messages(),
            options=self.chosen(max_tokens=self.max_completion_tokens or self.max_tokens),
            n=self.n,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            json_object=self.response_format is not None and self.response_format.type == "json_object",
        )


class CompletionRequest(SamplingFields):
    """Legacy /v1/completions: raw prompts (no chat template)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (candidates are not ranked server-side)")
        prompts = self.prompts()
        if not prompts or any(p == "" or p == [] for p in prompts):
            raise ValueError("prompt must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request; send more in several requests")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def reply_requests(self) -> list[ReplyRequest]:
        """One request per prompt (each is a reply of its own, `n` choices each)."""
        max_tokens = DEFAULT_COMPLETION_TOKENS if self.max_tokens is None else self.max_tokens
        chosen = self.chosen(max_tokens=max_tokens)
        return [
            ReplyRequest(prompt=p, options=chosen, n=self.n, logprobs=self.logprobs) for p in self.prompts()
        ]
