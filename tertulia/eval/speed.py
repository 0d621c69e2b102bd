"""How fast a model answers: time to first token, prefill and decode speed, at 1 and N streams.

Every stream sends its own prompt (so no stream's prefill is served from another's cache) of about
`prompt_tokens` tokens, as a chat message, and generates `max_tokens` tokens whatever the model would
say (end-of-text ignored where the provider allows). One warm-up round runs first and is not counted.
Figures are medians over streams and rounds. Timings are the provider's own, taken where the reply is
read, so a remote model's include the network.

Peak memory is the process's resident high-water mark (Linux: VmHWM, reset when a model starts): the
model's weights, its KV cache and the interpreter, the figure `top` would have shown at worst.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tertulia.providers.base import Provider, ReplyRequest, Usage
from tertulia.providers.options import Options

METHOD = (
    "each stream its own chat prompt of ~{prompt} tokens, {tokens} tokens generated (end ignored); "
    "medians over streams and {rounds} round(s) after a warm-up; prefill = prompt tokens / time to "
    "first token at 1 stream; decode = tokens after the first / time after the first, per stream; "
    "aggregate = all streams' tokens / wall time"
)
# Distinct sentences, so that prompts differ from their first tokens and are not served from cache.
_WORDS = [
    *("river", "window", "garden", "lantern", "harbor", "meadow", "copper", "violin", "orchard"),
    *("thunder", "canyon", "pepper", "saddle", "marble", "compass", "feather", "ribbon", "glacier"),
    *("tablet", "cedar", "anchor", "velvet", "prism", "walnut", "beacon"),
]


def prompt_text(index: int, words: int) -> str:
    """A prompt of about `words` words, different for every `index` from its first word on."""
    picked = [_WORDS[(index * 7 + i * (index % 5 + 1)) % len(_WORDS)] for i in range(words)]
    return f"Text {index}: " + " ".join(picked) + "\nRepeat the text above."


@dataclass
class SpeedLevel:
    streams: int
    prompt_tokens: int | None
    completion_tokens: int
    first_token_seconds: float
    first_token_seconds_max: float
    prefill_tokens_per_second: float | None
    decode_tokens_per_second: float | None
    aggregate_tokens_per_second: float


@dataclass
class SpeedResult:
    levels: list[SpeedLevel]
    peak_memory_mb: float | None
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "levels": [asdict(level) for level in self.levels],
            "peak_memory_mb": self.peak_memory_mb,
            "method": self.method,
        }


def reset_peak_memory() -> None:
    """Start the resident high-water mark afresh (Linux; elsewhere nothing happens)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def _round(
    provider: Provider, streams: int, first_index: int, words: int, tokens: int
) -> tuple[list[Usage], float]:
    options = Options(temperature=0, max_tokens=tokens)

    async def one(index: int) -> Usage:
        messages = [{"role": "user", "content": prompt_text(index, words)}]
        reply = await provider.reply(ReplyRequest(messages=messages, options=options, ignore_eos=True))
        async for event in reply:
            if event.finish_reason == "error":
                raise RuntimeError(event.error or "the model failed")
        return reply.usage

    started = time.perf_counter()
    usages = await asyncio.gather(*(one(first_index + i) for i in range(streams)))
    return list(usages), time.perf_counter() - started


async def speed(
    provider: Provider,
    streams: tuple[int, ...] = (1, 8),
    prompt_tokens: int = 256,
    max_tokens: int = 64,
    rounds: int = 3,
    advance: Callable[[int], None] | None = None,
) -> SpeedResult:
    """Measure at each stream count in `streams`; `advance(1)` after each round."""
    words = max(1, prompt_tokens * 3 // 4)  # about four tokens for every three of these words
    index = 0
    await _round(provider, 1, index, words, max_tokens)  # warm-up: first calls, caches, threads
    index += 1
    levels = []
    for count in streams:
        usages: list[Usage] = []
        aggregates = []
        for _ in range(rounds):
            done, wall = await _round(provider, count, index, words, max_tokens)
            index += count
            usages += done
            aggregates.append(sum(u.completion_tokens for u in done) / wall)
            if advance is not None:
                advance(1)
        firsts = [u.first_token_seconds for u in usages if u.first_token_seconds is not None]
        decodes = [u.tokens_per_second for u in usages if u.tokens_per_second is not None]
        prompts = [u.prompt_tokens for u in usages if u.prompt_tokens]
        first = statistics.median(firsts) if firsts else float("nan")
        prompt = round(statistics.median(prompts)) if prompts else None
        levels.append(
            SpeedLevel(
                streams=count,
                prompt_tokens=prompt,
                completion_tokens=round(statistics.median(u.completion_tokens for u in usages)),
                first_token_seconds=first,
                first_token_seconds_max=max(firsts) if firsts else float("nan"),
                prefill_tokens_per_second=prompt / first if prompt and count == 1 and first > 0 else None,
                decode_tokens_per_second=statistics.median(decodes) if decodes else None,
                aggregate_tokens_per_second=statistics.median(aggregates),
            )
        )
    return SpeedResult(
        levels,
        peak_memory_mb() if provider.local else None,
        METHOD.format(prompt=prompt_tokens, tokens=max_tokens, rounds=rounds),
    )
