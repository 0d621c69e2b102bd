"""Perplexity of a model on token sequences, from the log-likelihoods its provider scores."""

from __future__ import annotations

import math
from collections.abc import Iterable

from tertulia.providers.base import Provider


async def perplexity(
    provider: Provider,
    sequences: Iterable[list[int]],
    window: int = 1024,
    scored: Iterable[list[bool]] | None = None,
) -> float:
    """exp(mean next-token negative log-likelihood) over all tokens of all sequences.

    Each sequence is scored in windows of `window` tokens (no overlap), so arbitrarily long texts fit.
    With `scored`, only the tokens marked True count (e.g. the assistant's turns of a conversation);
    the others are context.
    """
    marks = iter(scored) if scored is not None else None
    total_nll, total_tokens = 0.0, 0
    for ids in sequences:
        keep = next(marks) if marks is not None else [True] * len(ids)
        logprobs = await provider.score(ids, window)
        counted = [lp for lp, kept in zip(logprobs, keep[1:], strict=True) if kept]
        total_nll -= sum(counted)
        total_tokens += len(counted)
    if not total_tokens:
        raise ValueError("no tokens to score")
    return math.exp(total_nll / total_tokens)
