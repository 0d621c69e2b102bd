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


async def open_chat(model: RemoteModel, body: dict[str, Any]) -> AsyncIterator[Delta]:
    """Start a streamed chat completion upstream (errors before its first byte raise here) and read
    it back as text pieces of choice 0.

    Usage is asked for (`include_usage`) so the token count is the upstream's own. An error event
    mid-stream ends the reply with finish_reason "error"; the text so far is kept.
    """
    events = await model.stream(
        "/chat/completions", dict(body, stream=True, stream_options={"include_usage": True})
    )
    return _deltas(events)


async def _deltas(events: AsyncIterator[bytes]) -> AsyncIterator[Delta]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = ""
    async for raw in events:
        buffer += decoder.decode(raw)
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            for line in block.splitlines():
                data = line[5:].strip() if line.startswith("data:") else None
                if data == "[DONE]":
                    return
                if not data:
                    continue
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if "error" in event:
                    log.warning("upstream error mid-stream: %s", event["error"])
                    yield Delta(finish_reason="error")
                    return
                for choice in event.get("choices") or []:
                    if choice.get("index", 0) == 0:
                        text = (choice.get("delta") or {}).get("content") or ""
                        yield Delta(text, 1 if text else 0, choice.get("finish_reason"))
                usage = event.get("usage") or {}
                if isinstance(usage.get("completion_tokens"), int):
                    yield Delta(completion_tokens=usage["completion_tokens"])
