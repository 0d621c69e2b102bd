"""Server-sent events as every streaming route sends them, and whole answers that stop when the
client leaves. Knows nothing of models or of what the events say."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's status for "the client left before the answer": nobody reads it


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work` (a whole, non-streamed answer) unless the client leaves first: then it is cancelled,
    which frees its engine slots, and None is returned. Streamed answers stop when their generator is
    closed instead.

    The body has been read, so the next message the server sends the app is the disconnect.
    """
    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        task.cancel()
        left.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


HEARTBEAT_SECONDS = 10.0


_END = object()


async def with_heartbeat(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`, opened with an SSE comment (so headers and a first byte leave at once) and with
    another whenever nothing was sent for HEARTBEAT_SECONDS: a request waiting in a long queue keeps
    its client's read timeout from firing. Clients ignore comment lines.

    `events` runs in a task of its own from before the first byte is sent, feeding a queue, so that
    its own cleanup (cancelling the request, saving a reply cut short) runs whenever this generator is
    closed. One timer per stream watches for silence: an event costs a queue hand-over, not a new
    task and a new timeout as a timed wait per event would.
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Queue[Any] = asyncio.Queue()
    last_sent = loop.time()

    async def pump() -> None:
        try:
            async for item in events:
                ready.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - raised again where the stream is read
            ready.put_nowait(exc)
        finally:
            ready.put_nowait(_END)

    def watch() -> None:
        nonlocal last_sent, timer
        if loop.time() - last_sent >= HEARTBEAT_SECONDS:
            ready.put_nowait(": still waiting\n\n")
            last_sent = loop.time()
        timer = loop.call_at(last_sent + HEARTBEAT_SECONDS, watch)

    feeding = asyncio.ensure_future(pump())
    timer = loop.call_at(last_sent + HEARTBEAT_SECONDS, watch)
    try:
        yield ": waiting for the model\n\n"
        while (item := await ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            last_sent = loop.time()
            yield item
    finally:
        # Reached when the client leaves too, inside a cancelled scope: shielded, so that `events`
        # is closed for certain and its own cleanup runs now.
        timer.cancel()
        feeding.cancel()
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(asyncio.CancelledError, Exception):  # raised already, if at all
                await feeding
            await events.aclose()  # type: ignore[attr-defined]


class _EventStream(StreamingResponse):
    """A streaming response that closes its events when the client leaves, not when the garbage
    collector gets to them: Starlette stops iterating on a failed send and leaves the generator
    suspended, and a reply cut short must be saved now."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events as every streaming route sends them."""
    return _EventStream(
        with_heartbeat(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
