"""`tertulia finetune`: from a JSONL file to a model directory Tertulia serves, checked before it starts.

Everything that can make a run fail is checked first, before a minute of compute is spent: the data
(every problem, with line numbers), the context (no example longer than the model's), the memory the
run needs against what the machine has, and the output directory (never overwritten without --force).
The training loop itself (`loop.py`) uses transformers' Llama and peft's LoRA for the model; the
result is merged and written as a plain HF directory (`output.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tertulia.config import DEFAULT_MODEL
from tertulia.errors import TertuliaError
from tertulia.train.batches import TokenizedExample, tokenize
from tertulia.train.loop import Distributed, History, Loop, Schedule, StepReport
from tertulia.train.output import RunFacts, check_output, write_model

Method = Literal["lora", "full"]
# LoRA's small adapters take a much larger step than full training. On the default model and the
# identity data, 2e-3 learns the name in two epochs (held-out questions 6/6) where 1e-3 needed three.
DEFAULT_LR = {"lora": 2e-3, "full": 5e-5}
SHOWN_PROBLEMS = 12


@dataclass
class Settings:
    model: str = DEFAULT_MODEL
    method: Method = "lora"
    epochs: int = 3
    lr: float | None = None  # None: DEFAULT_LR of the method
    batch_tokens: int = 512  # tokens per micro-batch, padding included
    grad_accum: int = 1
    warmup: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    validation_share: float = 0.1  # split off the training file when no validation file is given
    patience: int = 2
    seed: int = 0
    save_every_minutes: float = 5.0
    dedupe: bool = False  # drop repeated examples (kept by default: repeating weighs an example)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def check(self) -> None:
        if self.method not in DEFAULT_LR:
            raise TertuliaError(f"--method must be lora or full, not {self.method!r}.")
        problems = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.learning_rate > 0, "--lr must be positive"),
            (self.max_grad_norm > 0, "--max-grad-norm must be positive"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be at least 0"),
            (self.batch_tokens >= 16, "--batch-tokens must be at least 16"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (0 <= self.warmup < 1, "--warmup is a share of the steps, in [0, 1)"),
            (self.lora_r >= 1, "--lora-r must be at least 1"),
            (0 < self.validation_share < 1, "the validation share must be in (0, 1)"),
            (self.patience >= 1, "--patience must be at least 1"),
        ]
        wrong = [message for ok, message in problems if not ok]
        if wrong:
            raise TertuliaError("; ".join(wrong) + ".")


@dataclass
class Prepared:
    """A run that passed every check, ready to train."""

    base_name: str
    base_dir: Path
    chat_template: str
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    pad_id: int
    data_key: str


@dataclass
class Result:
    out: Path
    history: History
    stopped_early: bool


def prepare(train_file: Path, settings: Settings, validation_file: Path | None = None) -> Prepared:
    """Read, check and tokenize the data; raise with every problem before anything is trained."""
    from tertulia.models import hf, registry
    from tertulia.train.data import validate

    settings.check()
    name, directory = registry.model_directory(settings.model)
    text = registry.load_text_side(settings.model)
    report = validate(train_file, text.count_chat, text.context, dedupe=settings.dedupe)
    _raise_on_errors(train_file, report)
    examples = [e.messages for e in report.examples]
    if validation_file is not None:
        held_report = validate(validation_file, text.count_chat, text.context, dedupe=settings.dedupe)
        _raise_on_errors(validation_file, held_report)
        held = [e.messages for e in held_report.examples]
    elif len(examples) >= 20:
        random.Random(settings.seed).shuffle(examples)
        cut = max(1, round(len(examples) * settings.validation_share))
        held, examples = examples[:cut], examples[cut:]
    else:
        held = []  # too few to spare any: no validation, no early stopping
    # Where a turn ends, as the engine sees it: the model learns to stop where serving stops.
    eos_ids = sorted(text.tokenizer.end_of_turn_ids() | set(hf.read_config(directory).eos_ids))
    train = [tokenize(m, text.template, eos_ids) for m in examples]
    validation = [tokenize(m, text.template, eos_ids) for m in held]
    if not any(e.target_count for e in train):
        raise TertuliaError(f"{train_file} has no assistant turn to learn from (all have weight 0).")
    digest = hashlib.sha256()
    for example in train + validation:
        digest.update(json.dumps(example.ids).encode())
    pad = (
        text.tokenizer.pad_token_id
        if getattr(text.tokenizer, "pad_token_id", None) is not None
        else eos_ids[0]
    )
    return Prepared(name, directory, text.template.source, train, validation, pad, digest.hexdigest()[:16])


def _raise_on_errors(path: Path, report: Any) -> None:
    if report.ok:
        return
    shown = [f"  line {p.line}: {p.kind}: {p.message}" for p in report.errors[:SHOWN_PROBLEMS]]
    more = len(report.errors) - len(shown)
    if more > 0:
        shown.append(f"  … and {more} more")
    raise TertuliaError(
        f"{path} has {len(report.errors)} problem(s); nothing was trained:\n" + "\n".join(shown),
        f"\nSee them all with: tertulia data validate {path}",
    )


def memory_needed(
    parameters: int, trainable: int, batch_tokens: int, vocab: int, layers: int, hidden: int
) -> int:
    """Bytes a run holds at its peak: the weights; for what is trained, gradients, AdamW's two moments
    and two copies (the best epoch's, and the one being saved); the activations kept for the backward
    pass of one micro-batch, and the trained positions' logits."""
    weights = 4 * parameters + 20 * trainable
    activations = batch_tokens * layers * hidden * 4 * 24
    logits = batch_tokens * vocab * 4 * 3
    return weights + activations + logits + 512 * 2**20  # interpreter, libraries, allocator slack


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parallel_processes() -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))  # processes share the cores
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def build_model(directory: Path, settings: Settings) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(settings.seed)  # the same LoRA initialisation in every process
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.config.use_cache = False
    if settings.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question while wrapping; the user can do nothing about it.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def finetune(
    train_file: Path,
    out: Path,
    settings: Settings,
    *,
    validation_file: Path | None = None,
    resume: bool = False,
    force: bool = False,
    on_start: Callable[[Loop, Prepared], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> Result:
    """Train and write `out`; raises loop.Interrupted (state saved, `resume=True` continues)."""
    parallel = parallel_processes()
    check_output(out, force=force, resume=resume)
    run_file = out / "checkpoint" / "run.json"
    if resume:
        try:
            recorded = json.loads(run_file.read_text())
            settings = Settings(**recorded["settings"])
            validation_file = Path(recorded["validation_file"]) if recorded["validation_file"] else None
        except (OSError, ValueError, TypeError, KeyError):
            raise TertuliaError(
                f"{run_file} is missing or unreadable: the interrupted run cannot be resumed.",
                "Start it again with --force.",
            ) from None
    prepared = prepare(train_file, settings, validation_file)
    if out.resolve() == prepared.base_dir.resolve():
        raise TertuliaError(f"--out {out} is the model being fine-tuned.", "Write the result elsewhere.")
    if resume and recorded.get("data_key") != prepared.data_key:
        raise TertuliaError(f"{train_file} is not the data the interrupted run in {out} started with.")
    if resume and recorded.get("processes", 1) != parallel.world:
        raise TertuliaError(
            f"The interrupted run used {recorded.get('processes', 1)} process(es), not {parallel.world}.",
            "Resume it with the same torchrun --nproc_per_node (or without torchrun for one).",
        )
    free = available_memory()  # before this process loads anything
    model = build_model(prepared.base_dir, settings).to(parallel.device)
    longest = max(len(e) for e in prepared.train + prepared.validation)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    needed = memory_needed(
        parameters,
        trainable,
        max(settings.batch_tokens, longest),
        config.vocab_size,
        config.num_hidden_layers,
        config.hidden_size,
    )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world))  # processes sharing this machine's RAM
    too_big = parallel.device.type == "cpu" and free is not None and needed * local > free
    if parallel.sum(float(too_big))[0]:  # every process stops, or the others would wait for it forever
        raise TertuliaError(
            f"This run needs about {needed * local / 2**30:.1f} GiB of memory"
            + (f" and {free / 2**30:.1f} GiB is free." if free is not None else "."),
            "Lower --batch-tokens (and raise --grad-accum to keep the step size), or use --method lora.",
        )
    schedule = Schedule(
        epochs=settings.epochs,
        lr=settings.learning_rate,
        batch_tokens=max(settings.batch_tokens, longest),  # a batch holds at least one example
        grad_accum=settings.grad_accum,
        warmup=settings.warmup,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        patience=settings.patience,
        seed=settings.seed,
        save_every=settings.save_every_minutes * 60,
    )
    loop = Loop(
        model,
        prepared.train,
        prepared.validation,
        schedule,
        prepared.pad_id,
        out / "checkpoint" / "state.pt",
        parallel,
        on_step,
        on_epoch,
    )
    parallel.barrier()  # every process has checked `out` before the first one writes there
    if parallel.main and not resume:
        if out.exists():
            shutil.rmtree(out)
        run_file.parent.mkdir(parents=True)
        record = {
            "settings": asdict(settings),
            "data_key": prepared.data_key,
            "validation_file": str(validation_file) if validation_file else None,
            "processes": parallel.world,
        }
        run_file.write_text(json.dumps(record, indent=2))
    if resume:
        loop.restore()
    if on_start:
        on_start(loop, prepared)
    history = loop.run()
    if parallel.main:
        facts = RunFacts(
            base_model=prepared.base_name,
            method=settings.method,
            train_file=str(train_file),
            train_examples=len(prepared.train),
            validation_examples=len(prepared.validation),
            train_tokens=sum(len(e) for e in prepared.train),
            trained_tokens_per_epoch=sum(e.target_count for e in prepared.train),
            hyperparameters=_hyperparameters(settings, schedule),
            processes=parallel.world,
            command="tertulia " + " ".join(sys.argv[1:]) if sys.argv[1:] else "tertulia finetune",
        )
        write_model(model, prepared.base_dir, prepared.chat_template, out, facts, history)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    parallel.barrier()
    return Result(out, history, loop.stopped_early)


def _hyperparameters(settings: Settings, schedule: Schedule) -> dict[str, Any]:
    values: dict[str, Any] = {
        "epochs": settings.epochs,
        "learning rate": f"{settings.learning_rate:g} (warmup {settings.warmup:.0%}, cosine decay)",
        "tokens per micro-batch": schedule.batch_tokens,
        "gradient accumulation": settings.grad_accum,
        "weight decay": settings.weight_decay,
        "gradient clipping": settings.max_grad_norm,
        "early stopping patience": f"{settings.patience} epoch(s)",
        "seed": settings.seed,
    }
    if settings.method == "lora":
        values["LoRA"] = (
            f"r={settings.lora_r}, alpha={settings.lora_alpha}, dropout={settings.lora_dropout}, "
            "all linear layers"
        )
    return values
