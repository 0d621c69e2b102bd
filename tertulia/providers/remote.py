"""Remote models: another OpenAI-compatible server (vLLM, Ollama, OpenAI, another Tertulia).

`--model remote:NAME@URL` serves the upstream model NAME from the base URL (e.g.
`remote:llama3@http://gpu-box:8000/v1`). Requests pass through as they are; responses stream back
as they arrive. Before the first byte reaches the client, connection errors, timeouts, 429 and 5xx
are retried with exponential backoff; upstream errors keep OpenAI's envelope (or are wrapped in it).
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
from tertulia.providers.base import Delta

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class UpstreamError(Exception):
    status: int
    body: dict[str, Any]


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


@dataclass
class RemoteModel:
    name: str
    base_url: str
    api_key: str | None = None
    timeout: float = 600.0
    retries: int = 3
    backoff: float = 0.5
    _client: httpx.AsyncClient | None = field(default=None, repr=False)

    @classmethod
    def from_spec(cls, spec: str, api_key: str | None = None) -> RemoteModel:
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
        assert self._client is not None, "RemoteModel.start() was not called"
        last: UpstreamError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = self._client.build_request("POST", path, json=body)
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                last = UpstreamError(502, _envelope(502, f"The upstream server is unreachable ({exc!r})."))
                continue
            if response.status_code < 400:
                return response
            text = await response.aread()
            await response.aclose()
            last = UpstreamError(response.status_code, _error_body(response, text))
            if response.status_code not in RETRY_STATUS:
                break
        assert last is not None
        raise last

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._send(path, dict(body, model=self.name, stream=False))
        try:
            return json.loads(await response.aread())
        finally:
            await response.aclose()

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """The upstream's server-sent events, byte for byte (errors before the first byte raise)."""
        response = await self._send(path, dict(body, model=self.name, stream=True))

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


class RemoteChat:
    """A chat completion streaming from the upstream, read back as text pieces of choice 0.

    Usage is asked for (`include_usage`) so the token count is the upstream's own. An error event or
    a broken connection mid-stream ends the reply with finish_reason "error" and the upstream's
    message; the text so far is kept. `close()` ends the upstream request at once (Stop, a closed tab).
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    @classmethod
    async def open(cls, model: RemoteModel, body: dict[str, Any]) -> RemoteChat:
        """Start the request; errors before its first byte raise UpstreamError here."""
        stream_body = dict(body, model=model.name, stream=True, stream_options={"include_usage": True})
        return cls(await model._send("/chat/completions", stream_body))

    def close(self) -> None:
        # A task of its own: the caller may be a cancelled task, where an await would be cut short
        # and the connection left open (the upstream would go on generating for nobody).
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self.response.aclose())

    async def pieces(self) -> AsyncIterator[Delta]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffer = ""
        try:
            async for raw in self.response.aiter_raw():
                buffer += decoder.decode(raw).replace("\r\n", "\n").replace("\r", "\n")
                *blocks, buffer = buffer.split("\n\n")
                for block in blocks:
                    for delta in _block_deltas(block):
                        yield delta
                        if delta.finish_reason == "error":
                            return
            for delta in _block_deltas(buffer + decoder.decode(b"", final=True)):
                yield delta
        except httpx.TransportError as exc:
            yield Delta(finish_reason="error", error=f"The upstream stream broke off ({exc!r}).")
        except _Done:
            return
        finally:
            await self.response.aclose()


class _Done(Exception):
    """The upstream sent `data: [DONE]`."""


def _block_deltas(block: str) -> list[Delta]:
    """The pieces in one server-sent event (its `data:` lines joined, as the SSE format says)."""
    data = "\n".join(line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:"))
    if not data.strip():
        return []
    if data.strip() == "[DONE]":
        raise _Done
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        return []
    if not isinstance(event, dict):
        return []
    if event.get("error"):
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else None
        return [Delta(finish_reason="error", error=str(message or error))]
    deltas = []
    for choice in event.get("choices") or []:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            text = delta.get("content") if isinstance(delta.get("content"), str) else ""
            deltas.append(Delta(text, 1 if text else 0, choice.get("finish_reason")))
    usage = event.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        deltas.append(Delta(completion_tokens=usage["completion_tokens"]))
    return deltas
