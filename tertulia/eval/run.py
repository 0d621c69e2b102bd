"""Running evaluation tasks on models: one task on one provider, or a whole suite on several models.

A task asks its provider only what the reply contract offers: to generate (references, speed, side by
side) or to score (perplexity, multiple choice). A provider without scoring (a remote endpoint) skips
the scoring tasks with the reason, and runs the others. Models are loaded one at a time, each freed
before the next, so comparing three models needs the memory of one.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tertulia.errors import TertuliaError
from tertulia.eval import files
from tertulia.eval.answers import greedy_answers
from tertulia.eval.multiple_choice import multiple_choice
from tertulia.eval.perplexity import chat_perplexity, document_perplexity
from tertulia.eval.speed import peak_memory_mb, reset_peak_memory, speed
from tertulia.eval.suite import SCORING_KINDS, Suite, Task, require
from tertulia.eval.text_metrics import reference_scores
from tertulia.models import registry
from tertulia.providers.base import Capability, Provider
from tertulia.providers.local import QUANTIZATIONS, check_quantization
from tertulia.providers.remote import parse_spec
from tertulia.providers.spec import open_provider

Advance = Callable[[int], None]


class Tracker(Protocol):
    """Where progress goes: `start` returns what to call as work gets done."""

    def start(self, label: str, total: int | None, unit: str) -> Advance: ...

    def finish(self) -> None: ...


class Silent:
    def start(self, label: str, total: int | None, unit: str) -> Advance:
        return lambda _: None

    def finish(self) -> None:
        pass


@dataclass(frozen=True)
class ModelChoice:
    """A --model value, optionally with the precision to load it at: `smollm2-135m@int4`."""

    spec: str
    quantization: str = "auto"

    @classmethod
    def parse(cls, value: str, quantization: str = "auto") -> ModelChoice:
        base, sep, tail = value.rpartition("@")
        if sep and base and tail in QUANTIZATIONS:
            return cls(base, tail)
        return cls(value, quantization)

    @property
    def label(self) -> str:
        return self.spec if self.quantization == "auto" else f"{self.spec}@{self.quantization}"


def open_model(choice: ModelChoice) -> Provider:
    provider = open_provider(choice.spec, quantization=choice.quantization, max_batch=16, inline=True)
    provider.start()
    return provider


def can_run(provider: Provider, task: Task) -> str | None:
    """Why `provider` cannot run `task`, or None when it can."""
    if task.kind in SCORING_KINDS and not {Capability.SCORE, Capability.TOKENS} <= provider.capabilities:
        return (
            f"{provider.name} cannot score texts (log-likelihoods of given tokens), which {task.kind} "
            "needs; an OpenAI-compatible endpoint does not offer that"
        )
    return None


def task_data(task: Task) -> Any:
    """What a task's file holds, read and checked (TaskFileError otherwise); None for tasks without one."""
    settings = task.settings
    if task.kind == "perplexity":
        if settings["assistant_only"]:
            return files.read_conversations(settings["file"])
        return files.read_documents(settings["file"])
    if task.kind == "multiple_choice":
        return files.read_choices(settings["file"])[: settings["limit"]]
    if task.kind == "references":
        require("sacrebleu", "rouge_score")  # before the answers are generated, not after
        return files.read_conversations(settings["file"], reference=True)[: settings["limit"]]
    return None


async def run_task(provider: Provider, task: Task, tracker: Tracker, data: Any) -> dict[str, Any]:
    """One task's results (JSON-ready), with the method stated; `data` is what `task_data` read."""
    settings = task.settings
    label = f"{provider.name} · {task.name}"
    if task.kind == "perplexity":
        advance = _counting(tracker.start(label, len(data), "texts"))
        if settings["assistant_only"]:
            result = await chat_perplexity(provider, data, settings["window"], advance)
        else:
            result = await document_perplexity(provider, data, settings["window"], advance)
        return result.as_dict()
    if task.kind == "multiple_choice":
        advance = tracker.start(label, len(data), "items")
        return (await multiple_choice(provider, data, advance=advance)).as_dict()
    if task.kind == "references":
        conversations = data
        advance = tracker.start(label, len(conversations), "answers")
        prompts = [c[:-1] for c in conversations]
        references = [c[-1]["content"] for c in conversations]
        answers = await greedy_answers(provider, prompts, settings["max_tokens"], advance=advance)
        scores = reference_scores(answers, references)
        records = [
            {"messages": p, "reference": r, "answer": a}
            for p, r, a in zip(prompts, references, answers, strict=True)
        ]
        return {**scores, "records": records}
    if task.kind == "speed":
        streams = tuple(settings["streams"])
        advance = tracker.start(label, len(streams) * settings["rounds"], "rounds")
        measured = await speed(
            provider,
            streams,
            settings["prompt_tokens"],
            settings["max_tokens"],
            settings["rounds"],
            advance,
        )
        return measured.as_dict()
    if task.kind == "side_by_side":
        prompts = settings["prompts"]
        advance = tracker.start(label, len(prompts), "answers")
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        answers = await greedy_answers(provider, conversations, settings["max_tokens"], advance=advance)
        return {"prompts": prompts, "answers": answers, "method": "greedy, no system prompt"}
    raise TertuliaError(f"Unknown task kind {task.kind!r}.")


def _counting(advance: Advance) -> Advance:
    """Document tasks report tokens; their bars count documents."""
    return lambda _tokens: advance(1)


@dataclass
class TaskOutcome:
    task: Task
    result: dict[str, Any] | None = None
    skipped: str | None = None  # the provider cannot run it
    failed: str | None = None  # it ran and failed
    seconds: float = 0.0


@dataclass
class ModelOutcome:
    choice: ModelChoice
    name: str
    summary: str
    local: bool
    load_seconds: float
    outcomes: list[TaskOutcome] = field(default_factory=list)
    peak_memory_mb: float | None = None


async def run_model(
    choice: ModelChoice, suite: Suite, tracker: Tracker, data: dict[str, Any]
) -> ModelOutcome:
    reset_peak_memory()
    started = time.perf_counter()
    provider = open_model(choice)
    outcome = ModelOutcome(
        choice, provider.name, provider.summary, provider.local, time.perf_counter() - started
    )
    try:
        for task in suite.tasks:
            done = TaskOutcome(task, skipped=can_run(provider, task))
            if done.skipped is None:
                began = time.perf_counter()
                try:
                    done.result = await run_task(provider, task, tracker, data[task.name])
                except TertuliaError as exc:
                    done.failed = str(exc)
                finally:
                    tracker.finish()
                done.seconds = time.perf_counter() - began
            outcome.outcomes.append(done)
    finally:
        provider.stop()
    outcome.peak_memory_mb = peak_memory_mb() if provider.local else None
    del provider
    gc.collect()
    return outcome


def check_model(choice: ModelChoice) -> None:
    """Refuse a model that cannot be found, or an unknown precision, before anything runs."""
    check_quantization(choice.quantization)
    if choice.spec.startswith("remote:"):
        parse_spec(choice.spec)
    else:
        registry.resolve(choice.spec)


async def run_suite(choices: list[ModelChoice], suite: Suite, tracker: Tracker) -> list[ModelOutcome]:
    """Every task of `suite` on every model, one model loaded at a time."""
    # Every file read and checked once, before any model loads.
    data = {task.name: task_data(task) for task in suite.tasks}
    for choice in choices:
        check_model(choice)
    return [await run_model(choice, suite, tracker, data) for choice in choices]
