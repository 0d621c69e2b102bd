"""The engine driven from asyncio: requests go in as calls, outputs come back as `async for`.

Two ways to drive it, chosen when it is made. Served (`start()` or `run_here()`): the engine steps
in a thread of its own, so the event loop never blocks on a forward pass; requests and aborts reach
that thread through an inbox, outputs go back to each request's asyncio queue, all of a step's in one
`call_soon_threadsafe` per event loop (one wake-up of the loop per step, not one per token), and new
requests join the running batch at the next step (continuous
batching). Inline: whoever reads a stream steps the engine, in its own thread, as a one-user terminal
or an evaluation does; streams read together (`asyncio.gather`) still share each step's batch. That
thread is usually the main one, where torch's OpenMP workers run at full speed.

This module knows nothing of HTTP, chat messages or sampling options as users write them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from tertulia.engine.engine import Engine
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.sequence import Sequence, StepOutput

log = logging.getLogger(__name__)

_DONE = object()


class EngineObserver(Protocol):
    """Receives timings from the engine thread (the server turns them into Prometheus metrics)."""

    def first_token(self, seconds: float) -> None: ...

    def next_token(self, seconds: float) -> None: ...

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None: ...


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for target, item in items:
        target.put_nowait(item)


@dataclass(eq=False)
class RequestStream:
    """One request's outputs, consumed with `async for` on the loop that submitted it."""

    owner: AsyncEngine
    loop: asyncio.AbstractEventLoop
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sequences: list[Sequence] = field(default_factory=list)
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    last_token: dict[int, float] = field(default_factory=dict)

    def push(self, item: object) -> None:
        if self.owner.inline:
            self.queue.put_nowait(item)
        else:  # in the engine thread: handed over with the rest of this round's outputs
            self.owner._outbox.append((self, item))

    async def __aiter__(self) -> AsyncIterator[StepOutput]:
        while True:
            if self.owner.inline:
                while self.queue.empty():
                    self.owner.step_inline()
                await asyncio.sleep(0)  # streams read together take turns (and submit before a step)
            item = await self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def cancel(self) -> None:
        """Stop generating (client went away): frees the KV slots at the engine's next step."""
        if not self.finished:
            self.owner.abort(self)


class AsyncEngine:
    def __init__(
        self, engine: Engine, observer: EngineObserver | None = None, *, inline: bool = False
    ) -> None:
        self.engine = engine
        self.inline = inline
        self.observer = observer
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, RequestStream] = {}
        self._outbox: list[tuple[RequestStream, object]] = []  # engine thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tertulia-engine", daemon=True)

    def start(self) -> None:
        assert not self.inline, "an inline engine is stepped by its readers"
        self._thread.start()

    def run_here(self) -> None:
        """Run the engine loop in the calling thread until `stop()`.

        Prefer this from the main thread: OpenMP gives a second thread's team of workers only a
        throttled spin-wait (more threads than cores once the main thread has used torch), which
        halved decode speed when the engine ran in a background thread.
        """
        assert not self.inline, "an inline engine is stepped by its readers"
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish nothing new: end running requests (finish_reason 'abort') and join the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Requests accepted and not finished (waiting or running)."""
        return len(self._streams) + self._inbox.qsize()

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Validate now (errors raise in the caller), generate in the engine thread."""
        self.engine.check_prompt(prompt, params)
        stream = RequestStream(self, asyncio.get_running_loop(), prompt, params)
        self._send(lambda: self._add(stream))
        return stream

    def abort(self, stream: RequestStream) -> None:
        self._send(lambda: self._abort(stream))

    def _send(self, command: Callable[[], None]) -> None:
        if self.inline:  # the caller's thread is the engine's
            command()
            return
        self._inbox.put(command)
        self._wake.set()

    # --- engine thread ------------------------------------------------------------------------
    def _add(self, stream: RequestStream) -> None:
        if stream.finished:
            return
        try:
            stream.sequences = self.engine.add(stream.prompt, stream.params)
        except Exception as exc:  # noqa: BLE001 - this request fails, the loop goes on
            log.exception("request refused by the engine")
            stream.finished = True
            stream.push(exc)
            return
        self._streams[stream.sequences[0].group] = stream

    def _abort(self, stream: RequestStream) -> None:
        if stream.sequences and not stream.finished:
            self.engine.abort(stream.sequences)
            self._finish(stream)
        stream.finished = True

    def _observe(self, stream: RequestStream, out: StepOutput, now: float) -> None:
        if self.observer is None:
            return
        index = out.sequence.index
        previous = stream.last_token.get(index)
        if previous is None:
            self.observer.first_token(now - stream.submitted)
        else:
            self.observer.next_token(now - previous)
        stream.last_token[index] = now

    def _finish(self, stream: RequestStream) -> None:
        if self.observer is not None and not stream.finished and stream.sequences:
            self.observer.finished(len(stream.prompt), sum(len(s.output) for s in stream.sequences))
        stream.finished = True
        if stream.sequences:
            self._streams.pop(stream.sequences[0].group, None)
        stream.push(_DONE)

    def step_inline(self) -> None:
        """One step of the engine in the caller's thread (inline mode)."""
        if self.engine.has_work:
            self._step()
        elif self._streams:  # nothing can end them now: a bug, not a wait
            raise RuntimeError("requests are open but the engine has no work")

    def _take_commands(self) -> None:
        while not self._inbox.empty():
            command = self._inbox.get()
            try:
                command()
            except Exception:  # a bug in one command must not stop the engine for everyone
                log.exception("engine command failed")

    def _run(self) -> None:
        while True:
            self._take_commands()
            if self._stopping:
                for stream in list(self._streams.values()):
                    self.engine.abort(stream.sequences)
                    for seq in stream.sequences:
                        stream.push(StepOutput(seq, "", None))
                    self._finish(stream)
                self._deliver()
                return
            if not self.engine.has_work:
                self._deliver()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._step()
            self._deliver()

    def _deliver(self) -> None:
        """Hand the outputs pushed since the last call to their event loops, one call per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for stream, item in self._outbox:
            by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is left to read its streams
                log.warning("dropped %d outputs for a closed event loop", len(items))

    def _step(self) -> None:
        """Step the engine once and hand each output to its request's stream."""
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug in a step must not kill the server: fail those requests
            log.exception("engine step failed")
            for stream in list(self._streams.values()):
                self.engine.abort(stream.sequences)
                stream.push(exc)
                self._finish(stream)
            return
        touched: set[int] = set()
        now = time.perf_counter()
        for out in outputs:
            stream = self._streams.get(out.sequence.group)
            if stream is None:
                continue
            if out.sequence.error is not None:  # this request alone failed: end all its choices
                self.engine.abort(stream.sequences)
                stream.push(out.sequence.error)
                self._finish(stream)
                continue
            self._observe(stream, out, now)
            stream.push(out)
            touched.add(out.sequence.group)
        for group in touched:
            stream = self._streams.get(group)
            if stream is not None and all(s.finish_reason is not None for s in stream.sequences):
                self._finish(stream)
