"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it.

Each item becomes the context "Question: {question}\\nAnswer:" and one continuation per choice,
" {choice}". The model picks the choice it finds likeliest: `acc` compares the summed log-likelihoods,
`acc_norm` divides each by the choice's length in characters (so long answers are not penalised for
having more tokens). Contexts and continuations are tokenized as the harness does: the continuation's
tokens are those the whole text has after the context's. Nothing is generated, so the model's chat
template plays no part: this measures what the model knows, not how it chats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tertulia.eval.files import ChoiceItem
from tertulia.providers.base import Provider

METHOD = (
    'context "Question: <question>\\nAnswer:", each choice scored as " <choice>"; acc = the choice with '
    "the highest summed log-likelihood, acc_norm = the highest log-likelihood per character "
    "(lm-evaluation-harness's multiple_choice)"
)
ITEMS_PER_CALL = 64  # items scored per provider call: progress shows, memory stays small


def context(item: ChoiceItem) -> str:
    return f"Question: {item.question}\nAnswer:"


def encode_pair(provider: Provider, context_text: str, continuation: str) -> tuple[list[int], list[int]]:
    """Trailing spaces of the context move to the continuation; the continuation's tokens are those the
    whole text has after the context's (how the harness splits a pair)."""
    spaces = len(context_text) - len(context_text.rstrip())
    if spaces:
        continuation = context_text[-spaces:] + continuation
        context_text = context_text[:-spaces]
    whole = provider.encode(context_text + continuation)
    head = provider.encode(context_text)
    if not head:
        head = [provider.document_start]
        return head, whole
    return head, whole[len(head) :]


@dataclass
class ItemResult:
    item: ChoiceItem
    loglikelihoods: list[float]

    @property
    def choice(self) -> int:
        return max(range(len(self.loglikelihoods)), key=self.loglikelihoods.__getitem__)

    @property
    def choice_norm(self) -> int:
        per_char = [ll / len(c) for ll, c in zip(self.loglikelihoods, self.item.choices, strict=True)]
        return max(range(len(per_char)), key=per_char.__getitem__)


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n)), as the harness reports."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


@dataclass
class ChoiceResult:
    items: list[ItemResult] = field(default_factory=list)
    method: str = METHOD

    def as_dict(self) -> dict[str, Any]:
        acc, acc_stderr = _mean_and_stderr([float(r.choice == r.item.answer) for r in self.items])
        norm, norm_stderr = _mean_and_stderr([float(r.choice_norm == r.item.answer) for r in self.items])
        return {
            "acc": acc,
            "acc_stderr": acc_stderr,
            "acc_norm": norm,
            "acc_norm_stderr": norm_stderr,
            "random_baseline": sum(1 / len(r.item.choices) for r in self.items) / len(self.items),
            "items": len(self.items),
            "method": self.method,
        }


async def multiple_choice(
    provider: Provider,
    items: list[ChoiceItem],
    max_length: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> ChoiceResult:
    """Score every choice of every item; `advance(n)` is told as n more items are done."""
    result = ChoiceResult()
    for first in range(0, len(items), ITEMS_PER_CALL):
        batch = items[first : first + ITEMS_PER_CALL]
        pairs = [
            encode_pair(provider, context(item), f" {choice}") for item in batch for choice in item.choices
        ]
        scores = await provider.loglikelihoods(pairs, max_length)
        cursor = 0
        for item in batch:
            totals = [sum(s) for s in scores[cursor : cursor + len(item.choices)]]
            cursor += len(item.choices)
            result.items.append(ItemResult(item, totals))
        if advance is not None:
            advance(len(batch))
    return result
