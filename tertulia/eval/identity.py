"""Did a fine-tune learn its identity, and did it keep the rest? Two numbers, before and after:

- how often held-out phrasings of "what is your name?" (never trained on, asked with no system prompt)
  get the new name, greedy, through Tertulia's engine;
- perplexity on held-out ordinary chat (the assistant's turns), so a model that learnt its name by
  forgetting how to chat shows it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tertulia.eval.answers import ask, greedy_answers
from tertulia.eval.perplexity import chat_perplexity
from tertulia.models import registry
from tertulia.models.registry import LoadedModel
from tertulia.providers.local import LocalProvider


@dataclass
class HeldOut:
    name: str
    questions: list[str]
    chat: list[dict[str, Any]]  # {"messages": [...]} examples

    @classmethod
    def read(cls, path: Path) -> HeldOut:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["name"], data["questions"], data["chat"])


@dataclass
class Measure:
    answers: list[str]
    name_rate: float
    chat_perplexity: float


@dataclass
class IdentityCheck:
    held_out: HeldOut
    before: Measure
    after: Measure

    @property
    def perplexity_change(self) -> float:
        return self.after.chat_perplexity / self.before.chat_perplexity - 1


def measure(model: LoadedModel, held_out: HeldOut) -> Measure:
    provider = LocalProvider.of_model(model, max_batch=16, inline=True)
    answers = asyncio.run(greedy_answers(provider, [ask(q) for q in held_out.questions]))
    hits = sum(held_out.name.lower() in a.lower() for a in answers)
    score = asyncio.run(chat_perplexity(provider, [e["messages"] for e in held_out.chat]))
    return Measure(answers, hits / max(len(answers), 1), score.token_perplexity)


def check(base: str | None, tuned: str, held_out: HeldOut) -> IdentityCheck:
    return IdentityCheck(
        held_out, measure(registry.load(base), held_out), measure(registry.load(tuned), held_out)
    )
