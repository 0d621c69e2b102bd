"""The local provider: the in-process engine serving a model loaded by `models.registry`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from tertulia.engine.engine import Engine
from tertulia.engine.runner import EngineRunner, RequestStream
from tertulia.engine.sampling import SamplingParams
from tertulia.models import registry
from tertulia.models.gguf import Progress
from tertulia.providers.base import Chunk, Usage


class LocalProvider:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.model
        self.name = engine.model.name
        self.context_length = engine.context

    @classmethod
    def load(
        cls,
        spec: str | None = None,
        *,
        quantization: str = "auto",
        max_batch: int = 8,
        kv_memory: int | None = None,
        progress: Progress | None = None,
    ) -> LocalProvider:
        model = registry.load(spec, progress)
        quantization = registry.pick_quantization(model, quantization)
        return cls(Engine(model, quantization=quantization, max_batch=max_batch, kv_memory=kv_memory))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.model.template.encode(messages, add_generation_prompt=True)

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        return len(self.encode_chat(messages))

    def stream_chat(
        self, messages: list[dict[str, Any]], params: SamplingParams, usage: Usage
    ) -> Iterator[Chunk]:
        prompt = self.encode_chat(messages)
        started = time.perf_counter()
        usage.prompt_tokens = len(prompt)
        for out in self.engine.generate(prompt, params):
            usage.completion_tokens += 1
            usage.seconds = time.perf_counter() - started
            if usage.first_token_seconds is None:
                usage.first_token_seconds = usage.seconds
            if out.text or out.finished:
                yield Chunk(
                    out.sequence.index, out.text, out.sequence.finish_reason if out.finished else None
                )


class ServedModel:
    """A local model as the server uses it: the engine runs in its own thread (see engine.runner)."""

    def __init__(self, provider: LocalProvider) -> None:
        self.provider = provider
        self.name = provider.name
        self.runner = EngineRunner(provider.engine)
        # When True, the caller runs the engine loop itself (runner.run_here), on the main thread.
        self.external_loop = False

    def start(self) -> None:
        if not self.external_loop:
            self.runner.start()

    def stop(self) -> None:
        self.runner.stop()

    async def submit_chat(self, messages: list[dict[str, Any]], params: SamplingParams) -> RequestStream:
        """Template and tokenize in a worker thread (a long prompt takes a while), then submit."""
        prompt = await asyncio.to_thread(self.provider.encode_chat, messages)
        return self.runner.submit(prompt, params)

    def encode_text(self, prompt: str | list[int]) -> list[int]:
        """A raw prompt's ids: the caller writes the format, so control tokens in it are honoured."""
        if isinstance(prompt, list):
            vocab = self.provider.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
            return prompt
        tokenizer = self.provider.model.tokenizer
        ids = tokenizer.encode(prompt, allow_special=True)
        if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
            ids = [tokenizer.bos_id, *ids]
        return ids

    def submit_ids(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        return self.runner.submit(prompt, params)
