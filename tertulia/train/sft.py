"""`tertulia train sft`: chat tuning of a pretrained base, so that it answers in turns and stops.

This is fine-tuning (`finetune.py`) with every weight trained and the loss on the assistant's tokens
only, plus what a model trained from scratch needs around it: a check that the base can hold a chat
(its tokenizer has the ChatML tokens and matches its embedding), conversations from a corpus cut into
examples that fit the base's context (a long chitchat conversation becomes several), the same
held-out conversations as pretraining kept out, and a report that carries the base's stages on.

This module knows nothing of serving or of the command line.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tertulia import config
from tertulia.errors import TertuliaError
from tertulia.models import hf
from tertulia.models.registry import TextSide, load_text_side
from tertulia.train import finetune
from tertulia.train.corpora import Conversation, corpus
from tertulia.train.pretrain import load_tokenizer
from tertulia.train.run_report import Stage, environment, plot_curves, stages_of, write_report

DEFAULT_LR = 1e-3  # a small model trained from scratch takes a far larger step than a released one
SAMPLES = 3
CORPUS_EXAMPLES = 2000  # from a corpus unless told: a few minutes of chat tuning at depth 4 on 2 cores


@dataclass
class Result:
    out: Path
    history: Any
    examples: int
    samples: list[tuple[str, str]]


def check_base(base: Path) -> TextSide:
    if not (base / "config.json").exists():
        raise TertuliaError(
            f"{base} is not a model directory (no config.json).", "Pass a pretraining's --out."
        )
    load_tokenizer(base)  # the ChatML tokens are there
    text = load_text_side(str(base))
    vocab = hf.read_config(base).vocab_size
    if text.tokenizer.vocab_size > vocab:
        raise TertuliaError(
            f"The tokenizer in {base} has {text.tokenizer.vocab_size} tokens and the model's embedding "
            f"{vocab}: they do not belong together.",
            "Use the tokenizer the model was pretrained with.",
        )
    return text


def examples_from(
    conversations: Iterator[Conversation], text: TextSide, limit: int | None
) -> list[Conversation]:
    """Conversations cut at user turns into pieces that fit the context; a turn too long is dropped."""
    kept: list[Conversation] = []
    for conversation in conversations:
        turns = conversation[1:] if conversation and conversation[0]["role"] == "system" else conversation
        piece: Conversation = []
        for start in range(0, len(turns) - 1, 2):
            pair = turns[start : start + 2]
            if [m["role"] for m in pair] != ["user", "assistant"]:
                break
            if text.count_chat(piece + pair) <= text.context:
                piece += pair
                continue
            if piece:
                kept.append(piece)
            piece = pair if text.count_chat(pair) <= text.context else []
        if piece:
            kept.append(piece)
    if limit is not None and len(kept) > limit:
        kept = random.Random(0).sample(kept, limit)
    return kept


def chat_data(spec: str, text: TextSide, limit: int | None) -> tuple[Path, Path | None]:
    """(training, validation) JSONL for `spec`: a chat JSONL file as it is (or `limit` of its lines,
    drawn at random), or a corpus of conversations cut to fit (`CORPUS_EXAMPLES` of them unless told),
    written to the cache."""
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        if limit is None:
            return path, None
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = random.Random(0).sample(lines, min(limit, len(lines)))
        return _cached([spec, limit], {"train.jsonl": kept})[0], None
    source = corpus(spec)
    limit = CORPUS_EXAMPLES if limit is None else limit
    held_in = (d.conversation for d in source.documents(held_out=False) if d.conversation)
    held_out = (d.conversation for d in source.documents(held_out=True) if d.conversation)
    train = examples_from(held_in, text, limit)
    validation = examples_from(held_out, text, None)[: max(20, len(train) // 20)]
    if not train:
        raise TertuliaError(
            f"{spec} holds no conversation (user and assistant turns) that fits the context of "
            f"{text.context} tokens."
        )
    rows = {
        "train.jsonl": [json.dumps({"messages": r}, ensure_ascii=False) for r in train],
        "validation.jsonl": [json.dumps({"messages": r}, ensure_ascii=False) for r in validation],
    }
    files = _cached([spec, text.context, limit, str(path.resolve())], rows)
    return files[0], files[1] if validation else None


def _cached(key: list[Any], files: dict[str, list[str]]) -> list[Path]:
    """JSONL files written under the cache, in a folder named after what made them."""
    folder = config.cache_dir() / "sft" / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return [folder / name for name in files]


def sft(
    base: Path,
    data: str,
    out: Path,
    settings: finetune.Settings,
    *,
    max_examples: int | None = None,
    resume: bool = False,
    force: bool = False,
    on_start: Callable[..., None] | None = None,
    on_step: Callable[..., None] | None = None,
    on_epoch: Callable[..., None] | None = None,
) -> Result:
    started = time.monotonic()
    text = check_base(base)
    settings.model, settings.method = str(base), "full"
    if settings.lr is None:
        settings.lr = DEFAULT_LR
    train_file, validation_file = chat_data(data, text, max_examples)
    result = finetune.finetune(
        train_file,
        out,
        settings,
        validation_file=validation_file,
        resume=resume,
        force=force,
        on_start=on_start,
        on_step=on_step,
        on_epoch=on_epoch,
    )
    if not finetune.parallel_processes().main:
        return Result(out, result.history, 0, [])
    examples = sum(1 for line in train_file.read_text().splitlines() if line.strip())
    prompts = _prompts(validation_file or train_file)
    samples = list(zip(prompts, chat_samples(out, prompts), strict=True))
    last = result.history.epochs[-1] if result.history.epochs else {}
    stage = Stage(
        name="chat tuning",
        command=f"tertulia train sft --base {base} --data {data} --out {out}",
        data={
            "conversations": data,
            "training examples": examples,
            "validation examples": len(validation_file.read_text().splitlines()) if validation_file else 0,
        },
        model={},
        hyperparameters={
            "epochs": settings.epochs,
            "learning rate": f"{settings.learning_rate:g} (warmup {settings.warmup:.0%}, cosine decay to 0)",
            "tokens per micro-batch": settings.batch_tokens,
            "loss": "the assistant's tokens only",
        },
        history=result.history,
        flops_per_token=_flops_per_token(base),
        wall_seconds=time.monotonic() - started,
        metrics={
            "validation loss (nats per assistant token)": last.get("val_loss", math.nan),
            "validation token accuracy": last.get("val_accuracy", math.nan),
        },
        evaluations=[],
    )
    stages = [*stages_of(base), stage]
    plotted = plot_curves(result.history, [], out / "curves.png")
    write_report(out, stages, environment(), plotted)
    with (out / "report.md").open("a", encoding="utf-8") as report:
        report.write("\n### Chat samples\n\n")
        for prompt, reply in samples:
            report.write(f"**user:** {prompt}\n\n**model:** {reply}\n\n")
    return Result(out, result.history, examples, samples)


def _flops_per_token(base: Path) -> int | None:
    stages = stages_of(base)
    return stages[0].flops_per_token if stages else None


def _prompts(path: Path) -> list[str]:
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            first = json.loads(line)["messages"][0]
            if first["role"] == "user":
                prompts.append(first["content"])
        if len(prompts) == SAMPLES:
            break
    return prompts


@torch.inference_mode()
def chat_samples(directory: Path, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies of the model in `directory` to single user turns, through its chat template."""
    from transformers import AutoModelForCausalLM

    text = load_text_side(str(directory))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    stops = sorted(text.tokenizer.end_of_turn_ids())
    replies = []
    for prompt in prompts:
        ids = text.template.encode([{"role": "user", "content": prompt}], add_generation_prompt=True)
        output = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
        replies.append(text.tokenizer.decode(output[0, len(ids) :].tolist()).strip())
    return replies
