"""Perplexity: how surprised a model is by a text, as lm-evaluation-harness measures it.

A document is scored whole, in rolling windows: the first window predicts its first `max_length`
tokens after the model's beginning-of-text token; each later window predicts the next `max_length`
tokens after the token before them, and the last, shorter window keeps a full window of context
(EleutherAI's `loglikelihood_rolling` with `context_len=1`). Documents are scored separately, and the
totals give the harness's aggregates: word and byte perplexity, bits per byte, plus token perplexity
(which depends on the tokenizer, so compare it only between models that share one).

A conversation is scored on its assistant replies given everything before them (what a fine-tune is
trained on): token perplexity, and word and byte figures over the replies' text.

This module knows nothing of files or reports: it turns texts into scoring requests and sums them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tertulia.providers.base import Message, Provider

DOCUMENT_METHOD = (
    "rolling log-likelihood over each whole document in windows of {window} tokens, every token "
    "scored once with the longest context the window allows (lm-evaluation-harness's "
    "loglikelihood_rolling); words = whitespace-separated pieces, bytes = UTF-8 bytes"
)
CHAT_METHOD = (
    "log-likelihood of each assistant reply (up to its end-of-turn token) given the conversation "
    "before it, in the model's chat template; words and bytes of the replies' text"
)
LN2 = math.log(2)

Advance = Callable[[int], None]


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that together predict every token of `tokens` exactly once."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, max_length)
        end = predicted + count
        window = tokens[max(0, end - max_length - 1) : end - 1]
        # The window's inputs minus those predicted here are its context (at least one token).
        windows.append((window[: len(window) - (count - 1)], tokens[end - count : end]))
        predicted = end
    return windows


@dataclass
class Perplexity:
    """Totals over the scored texts; the perplexities are derived from them."""

    loglikelihood: float  # natural log, summed over every scored token
    tokens: int
    words: int
    bytes: int
    documents: int
    method: str

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / LN2

    def as_dict(self) -> dict[str, Any]:
        return {
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
            "token_perplexity": self.token_perplexity,
            **asdict(self),
        }


def count_words(text: str) -> int:
    """lm-evaluation-harness's word count: the pieces `re.split(r"\\s+", text)` gives."""
    return len(re.split(r"\s+", text))


async def document_perplexity(
    provider: Provider,
    documents: list[str],
    max_length: int | None = None,
    advance: Advance | None = None,
) -> Perplexity:
    """Perplexity over `documents`, each scored whole in rolling windows of `max_length` tokens
    (the model's context by default). `advance(n)` is told of each document's n tokens scored."""
    window = max_length or provider.context_length or 2048
    prefix = provider.document_start
    total, tokens = 0.0, 0
    for text in documents:
        ids = provider.encode(text)
        windows = rolling_windows(ids, prefix, window)
        if windows:
            total += sum(sum(scores) for scores in await provider.loglikelihoods(windows, window))
        tokens += len(ids)
        if advance is not None:
            advance(len(ids))
    return Perplexity(
        total,
        tokens,
        sum(count_words(d) for d in documents),
        sum(len(d.encode("utf-8")) for d in documents),
        len(documents),
        DOCUMENT_METHOD.format(window=window),
    )


async def chat_perplexity(
    provider: Provider,
    conversations: list[list[Message]],
    max_length: int | None = None,
    advance: Advance | None = None,
) -> Perplexity:
    """Perplexity of the assistant replies of `conversations`, each given the conversation before it."""
    window = max_length or provider.context_length or 2048
    total, tokens, words, size = 0.0, 0, 0, 0
    for messages in conversations:
        ids, marked = provider.encode_conversation(messages)
        if len(ids) > 1:
            scores = await token_logprobs(provider, ids[1:], ids[0], window)
            total += sum(s for s, keep in zip(scores, marked[1:], strict=True) if keep)
            tokens += sum(marked[1:])
        replies = [m["content"] for m in messages if m["role"] == "assistant" and m.get("weight", 1)]
        words += sum(count_words(r) for r in replies)
        size += sum(len(r.encode("utf-8")) for r in replies)
        if advance is not None:
            advance(len(ids))
    return Perplexity(total, tokens, words, size, len(conversations), CHAT_METHOD)


async def token_logprobs(provider: Provider, tokens: list[int], prefix: int, window: int) -> list[float]:
    """log p(tokens[i] | prefix, tokens[:i]) for every i, in rolling windows."""
    windows = rolling_windows(tokens, prefix, window)
    scores = await provider.loglikelihoods(windows, window)
    return [s for part in scores for s in part]
