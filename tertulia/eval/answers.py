"""Answers of a model to a set of questions, decoded greedily by Tertulia's own engine, in one batch.

This is how a fine-tune is judged: the weights as they will be served (same engine, same template),
not the training framework's idea of them.
"""

from __future__ import annotations

from typing import Any

from tertulia.engine.engine import Engine
from tertulia.engine.sampling import SamplingParams
from tertulia.models.registry import LoadedModel


def greedy_answers(
    model: LoadedModel, conversations: list[list[dict[str, Any]]], max_tokens: int = 40, max_batch: int = 16
) -> list[str]:
    engine = Engine(model, max_batch=max_batch)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    sequences = [
        engine.add(model.template.encode(c, add_generation_prompt=True), params)[0] for c in conversations
    ]
    while engine.has_work:
        engine.step()
    return [s.text.strip() for s in sequences]


def ask(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question}]
