"""The remote provider: a model on another OpenAI-compatible server (vLLM, Ollama, OpenAI, Tertulia).

`remote:NAME@URL` names the upstream model NAME at the base URL (e.g.
`remote:llama3@http://gpu-box:8000/v1`). Replies stream from its /chat/completions and are read into
the contract's events; /v1 requests can also pass through as the client wrote them (PASSTHROUGH).
Before the first byte, connection errors, timeouts, 429 and 5xx are retried with exponential backoff;
upstream errors keep OpenAI's envelope (or are wrapped in it) and their status.

Its tokenizer is not here: it cannot count tokens, score text or take token ids, and the context
length is unknown, so the chat layer sends the whole conversation and lets the upstream judge.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tertulia.errors import TertuliaError
from tertulia.providers.base import (
    Capability,
    Provider,
    ProviderError,
    Reply,
    ReplyEvent,
    ReplyRequest,
    Unsupported,
    Usage,
)
from tertulia.providers.options import OPENAI_NAMES

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


def parse_spec(spec: str) -> tuple[str, str]:
    """`remote:NAME@URL` -> (NAME, URL without a trailing slash)."""
    rest = spec.removeprefix("remote:")
    name, sep, url = rest.partition("@")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise TertuliaError(f"'{spec}' is not a remote model.", "Write remote:NAME@http://host:port/v1")
    return name, url.rstrip("/")


def _envelope(status: int, message: str, kind: str = "upstream_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": f"upstream_{status}"}}


def _error_body(response: httpx.Response, text: bytes) -> dict[str, Any]:
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return data
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    snippet = text[:200].decode(errors="replace").strip()
    return _envelope(response.status_code, f"The upstream server answered {response.status_code}: {snippet}")


@dataclass(eq=False)
class RemoteProvider(Provider):
    name: str
    base_url: str
    api_key: str | None = None
    timeout: float = 600.0
    retries: int = 3
    backoff: float = 0.5
    _client: httpx.AsyncClient | None = field(default=None, repr=False)

    capabilities = frozenset({Capability.PASSTHROUGH})
    own_defaults = True

    @property
    def summary(self) -> str:  # type: ignore[override]
        return f"remote at {self.base_url}"

    @classmethod
    def from_spec(cls, spec: str, api_key: str | None = None) -> RemoteProvider:
        name, url = parse_spec(spec)
        return cls(name, url, api_key)

    def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.timeout, connect=10.0)
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: the process is ending anyway
                asyncio.get_running_loop().create_task(client.aclose())

    async def _send(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST with retries; returns a response whose body is still unread (streamable)."""
        if self._client is None:
            self.start()
        assert self._client is not None
        last: ProviderError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = self._client.build_request("POST", path, json=body)
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                last = _error(502, _envelope(502, f"The upstream server is unreachable ({exc!r})."))
                continue
            if response.status_code < 400:
                return response
            text = await response.aread()
            await response.aclose()
            last = _error(response.status_code, _error_body(response, text))
            if response.status_code not in RETRY_STATUS:
                break
        assert last is not None
        raise last

    async def forward(self, path: str, body: dict[str, Any], stream: bool) -> Any:
        """The upstream's JSON answer, or its server-sent events byte for byte (errors before the
        first byte raise ProviderError)."""
        response = await self._send(path, dict(body, model=self.name, stream=stream))
        if not stream:
            try:
                return json.loads(await response.aread())
            finally:
                await response.aclose()

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for piece in response.aiter_raw():
                    yield piece
            except httpx.TransportError as exc:
                error = _envelope(502, f"The upstream stream broke off ({exc!r}).")
                yield f"data: {json.dumps(error)}\n\n".encode()
            finally:
                await response.aclose()

        return relay()

    async def reply(self, request: ReplyRequest) -> Reply:
        if request.messages is None:
            raise Unsupported(self.name, Capability.RAW_PROMPT)
        if request.logprobs is not None:
            raise Unsupported(self.name, Capability.LOGPROBS)
        body: dict[str, Any] = {k: v for k, v in request.options.set_values().items() if k in OPENAI_NAMES}
        body |= {"messages": request.messages, "n": request.n}
        if request.json_object:
            body["response_format"] = {"type": "json_object"}
        stream_body = dict(body, model=self.name, stream=True, stream_options={"include_usage": True})
        return RemoteReply(await self._send("/chat/completions", stream_body))


def _error(status: int, body: dict[str, Any]) -> ProviderError:
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return ProviderError(status, str(message or f"The upstream server answered {status}."), body)


class RemoteReply(Reply):
    """A chat completion streaming from the upstream, read into events as it arrives.

    Usage is asked for (`include_usage`) so the token counts are the upstream's own; until it comes,
    each text piece counts as a token. An error event or a broken connection mid-stream ends the
    reply with finish_reason "error" and the upstream's message; the text so far is kept.
    `cancel()` ends the upstream request at once (Stop, a closed tab).
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.usage = Usage(prompt_tokens=None)

    def cancel(self) -> None:
        # A task of its own: the caller may be a cancelled task, where an await would be cut short
        # and the connection left open (the upstream would go on generating for nobody).
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self.response.aclose())

    async def events(self) -> AsyncIterator[ReplyEvent]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffer = ""
        try:
            async for raw in self.response.aiter_raw():
                buffer += decoder.decode(raw).replace("\r\n", "\n").replace("\r", "\n")
                *blocks, buffer = buffer.split("\n\n")
                for block in blocks:
                    for event in self._read(block):
                        yield event
                        if event.finish_reason == "error":
                            return
            for event in self._read(buffer + decoder.decode(b"", final=True)):
                yield event
        except httpx.TransportError as exc:
            yield ReplyEvent(finish_reason="error", error=f"The upstream stream broke off ({exc!r}).")
        except _Done:
            return
        finally:
            await self.response.aclose()

    def _read(self, block: str) -> list[ReplyEvent]:
        events, usage = _block_events(block)
        for event in events:
            self.usage.produced(1 if event.text else 0)
        if usage is not None:
            if isinstance(usage.get("prompt_tokens"), int):
                self.usage.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                self.usage.completion_tokens = usage["completion_tokens"]
        return events


class _Done(Exception):
    """The upstream sent `data: [DONE]`."""


def _block_events(block: str) -> tuple[list[ReplyEvent], dict[str, Any] | None]:
    """The events in one server-sent event (its `data:` lines joined, as the SSE format says), and
    the usage it reports, if any."""
    data = "\n".join(line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:"))
    if not data.strip():
        return [], None
    if data.strip() == "[DONE]":
        raise _Done
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        return [], None
    if not isinstance(event, dict):
        return [], None
    if event.get("error"):
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else None
        return [ReplyEvent(finish_reason="error", error=str(message or error))], None
    events = []
    for choice in event.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        text = delta.get("content") if isinstance(delta.get("content"), str) else ""
        finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
        events.append(ReplyEvent(index if isinstance(index, int) else 0, text, finish_reason=finish))
    usage = event.get("usage")
    return events, usage if isinstance(usage, dict) else None
