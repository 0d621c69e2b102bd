"""`tertulia train pretrain`: a small Llama-family GPT learnt from nothing, sized by one `--depth` dial.

The depth sets everything else (in the spirit of nanochat): `depth` layers of width 64·depth, heads
of 64 dimensions, a SwiGLU block 8/3 as wide, the input and output embeddings tied. What the run
trains on is the corpus's training split, tokenized once into a file of token ids that is read as a
memory map, packed end to end with `<|endoftext|>` between documents and cut into windows of the
context length. The schedule (AdamW, warmup then cosine decay, gradient clipping, checkpoints,
resume, torchrun) is fine-tuning's loop (`loop.py`); a `--time-budget` is turned into a step count by
timing a few steps and one validation pass first, so the run ends on time with its learning rate
fully decayed. Validation reports bits per byte on held-out windows (the separators not scored), and
a few samples, at regular intervals.

The output is an HF-format directory (config, safetensors, the tokenizer, a ChatML template) that
the engine serves as it is. This module knows nothing of serving or of the command line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tertulia.errors import TertuliaError
from tertulia.models.tokenizer import Tokenizer
from tertulia.train.baseline import char_bigram_bits_per_byte
from tertulia.train.batches import TokenizedExample, collate
from tertulia.train.corpora import Corpus, documents
from tertulia.train.finetune import available_memory, memory_needed, parallel_processes
from tertulia.train.loop import AssistantLoss, Distributed, History, Loop, Schedule, StepReport
from tertulia.train.output import check_output, publish
from tertulia.train.run_report import Stage, environment, plot_curves, write_report
from tertulia.train.tokenizer_train import CHAT_TEMPLATE, DOCUMENT_SEPARATOR, SPECIAL_TOKENS

HEAD_DIM = 64
VALIDATION_TOKENS = 32_768  # held-out tokens each periodic validation scores
SAMPLE_TOKENS = 40
WRITING_SECONDS = 15.0  # writing the model, scoring the held-out text, the report
FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "report.md",
    "metrics.json",
    "curves.png",
}


@dataclass(frozen=True)
class Shape:
    """The model one depth makes."""

    depth: int
    vocab: int
    context: int

    @property
    def hidden(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def heads(self) -> int:
        return self.depth

    @property
    def intermediate(self) -> int:
        return round(self.hidden * 8 / 3 / HEAD_DIM) * HEAD_DIM

    @property
    def parameters(self) -> int:
        per_layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.depth * per_layer + self.vocab * self.hidden + self.hidden

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward): 6 per weight used in a matmul (the tied
        embedding counts once, as the output layer), plus attention's scores and mixing."""
        matmul = self.parameters - self.depth * 2 * self.hidden - self.hidden
        attention = 12 * self.depth * self.hidden * self.context // 2  # causal: half the pairs
        return 6 * matmul + attention

    def hf_config(self, tokenizer: Tokenizer) -> Any:
        from transformers import LlamaConfig

        separator, end_of_turn = (tokenizer.token_to_id(t) for t in (SPECIAL_TOKENS[0], SPECIAL_TOKENS[2]))
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.depth,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            rms_norm_eps=1e-5,
            rope_theta=10_000.0,
            tie_word_embeddings=True,
            bos_token_id=separator,
            eos_token_id=[separator, end_of_turn],
            pad_token_id=separator,
            attn_implementation="sdpa",
        )


@dataclass
class Settings:
    depth: int = 4
    context: int = 512
    time_budget: float | None = 15 * 60  # seconds; None with `tokens`
    tokens: int | None = None  # tokens to train on, instead of a time budget
    batch_tokens: int = 2048  # per optimizer step and process: more, smaller steps learn more per token here
    lr: float = 1.5e-3
    beta2: float = (
        0.95  # AdamW's second moment: shorter memory than the default 0.999, steadier at small batches
    )
    warmup: float = 0.05
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    evaluations: int = 10  # validations (with samples) over the run
    seed: int = 0
    save_every_minutes: float = 5.0

    def check(self) -> None:
        problems = [
            (1 <= self.depth <= 48, "--depth must be between 1 and 48"),
            (16 <= self.context <= 8192, "--context must be between 16 and 8192"),
            (self.time_budget is None or self.time_budget > 0, "--time-budget must be positive"),
            (self.tokens is None or self.tokens > 0, "--tokens must be positive"),
            (self.batch_tokens >= self.context, "--batch-tokens must hold at least one --context window"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.warmup < 1, "--warmup is a share of the steps, in [0, 1)"),
            (self.evaluations >= 1, "--evaluations must be at least 1"),
        ]
        wrong = [message for ok, message in problems if not ok]
        if wrong:
            raise TertuliaError("; ".join(wrong) + ".")

    @property
    def rows(self) -> int:
        return self.batch_tokens // self.context


@dataclass
class Evaluation:
    step: int
    tokens: int
    seconds: float
    val_loss: float
    bits_per_byte: float
    samples: list[str] = field(default_factory=list)


@dataclass
class Result:
    out: Path
    shape: Shape
    history: History
    evaluations: list[Evaluation]
    steps: int


class Windows(Sequence[TokenizedExample]):
    """Windows of `context` tokens over a token file, each overlapping the next by one token so that
    every token but the first is a target once; read from the memory map when asked for."""

    def __init__(self, tokens: np.ndarray, context: int, scored: Callable[[np.ndarray], np.ndarray]) -> None:
        self.tokens, self.context, self.scored = tokens, context, scored
        self.count = max(0, (len(tokens) - 1) // (context - 1))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> TokenizedExample:  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        start = index * (self.context - 1)
        ids = self.tokens[start : start + self.context]
        return TokenizedExample(ids.tolist(), self.scored(ids).tolist())


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `1h30m` or a number of seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for char in text.strip().lower():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total += float(number) * units[char]
            number = ""
        else:
            raise TertuliaError(f"Cannot read the duration {text!r}.", "Write it like 90s, 15m or 1h30m.")
    if number:
        total += float(number)
    if total <= 0:
        raise TertuliaError(f"The duration {text!r} is not positive.")
    return total


def load_tokenizer(directory: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(directory)
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise TertuliaError(
            f"The tokenizer in {directory} lacks {', '.join(missing)}.",
            "Make one with `tertulia train tokenizer` (it reserves the chat tokens).",
        )
    return tokenizer


def tokenize_corpus(tokenizer: Tokenizer, sources: list[Corpus], held_out: bool, path: Path) -> int:
    """Write the split's documents as token ids, each after a separator; return the token count."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    separator = tokenizer.token_to_id(DOCUMENT_SEPARATOR)
    count = 0
    with path.open("wb") as file:
        for document in documents(sources, held_out=held_out):
            ids = np.asarray([separator, *tokenizer.encode(document.text)], dtype=dtype)
            ids.tofile(file)
            count += len(ids)
    return count


def _tokenize(tokenizer: Tokenizer, sources: list[Corpus], out: Path, context: int) -> TertuliaError | None:
    """Both splits into `out/checkpoint`; on a problem, `out` is removed again (nothing half-made stays)."""
    if out.exists():
        shutil.rmtree(out)
    data_dir = out / "checkpoint"
    data_dir.mkdir(parents=True)
    try:
        train = tokenize_corpus(tokenizer, sources, False, data_dir / "train.bin")
        tokenize_corpus(tokenizer, sources, True, data_dir / "held-out.bin")
        if train <= context:
            raise TertuliaError(
                f"The corpus gives {train} training tokens, not enough for one window of {context}.",
                "Add text, or lower --context.",
            )
    except TertuliaError as exc:
        shutil.rmtree(out, ignore_errors=True)
        return exc
    return None


def _token_file(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r")


def pretrain(
    sources: list[Corpus],
    tokenizer_dir: Path,
    out: Path,
    settings: Settings,
    *,
    resume: bool = False,
    force: bool = False,
    on_start: Callable[[Loop, Shape, dict[str, Any]], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_eval: Callable[[Evaluation], None] | None = None,
    final_metrics: Callable[[Path], dict[str, Any]] | None = None,
) -> Result:
    """Train and write `out`; raises loop.Interrupted (state saved, `resume=True` continues)."""
    started = time.monotonic()
    parallel = parallel_processes()
    check_output(out, force=force, resume=resume, files=FILES, what="a pretraining run")
    run_file = out / "checkpoint" / "run.json"
    recorded: dict[str, Any] = {}
    if resume:
        recorded = _recorded(run_file)
        settings = Settings(**recorded["settings"])
    settings.check()
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer_key = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]
    if resume and recorded["tokenizer_key"] != tokenizer_key:
        raise TertuliaError(
            f"The tokenizer in {tokenizer_dir} is not the one the interrupted run in {out} started with."
        )
    shape = Shape(settings.depth, tokenizer.vocab_size, settings.context)
    _check_memory(shape, settings, parallel)

    parallel.barrier()  # every process has checked `out` before the first one writes there
    data_dir = out / "checkpoint"
    problem: TertuliaError | None = None
    if parallel.main and not resume:
        problem = _tokenize(tokenizer, sources, out, settings.context)
    if parallel.sum(float(problem is not None))[0]:  # every process stops, or the others would wait
        raise problem or TertuliaError("The corpus could not be read (see the first process's message).")
    train_tokens = _token_file(data_dir / "train.bin", tokenizer)
    held_tokens = _token_file(data_dir / "held-out.bin", tokenizer)
    separator = tokenizer.token_to_id(DOCUMENT_SEPARATOR)
    every = np.ones  # a training window learns every next token, separators included
    train = Windows(train_tokens, settings.context, lambda ids: every(len(ids), dtype=bool))
    validated_on = "the held-out split"
    if len(held_tokens) <= settings.context:  # too little held out: validate on the end of training data
        held_tokens = train_tokens[-min(len(train_tokens), VALIDATION_TOKENS) :]
        validated_on = "the end of the training data (too little text was held out)"
    validation_all = Windows(held_tokens, settings.context, lambda ids: ids != separator)
    validation = [
        validation_all[i] for i in range(min(len(validation_all), VALIDATION_TOKENS // settings.context + 1))
    ]
    byte_lengths = np.array([len(b) if b is not None else 0 for b in tokenizer.token_bytes])
    validation_bytes = sum(
        int(byte_lengths[np.asarray(w.ids[1:])][np.asarray(w.trained[1:])].sum()) for w in validation
    )

    torch.manual_seed(settings.seed)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(shape.hf_config(tokenizer)).to(parallel.device)
    model.config.use_cache = False
    tokens_per_step = settings.rows * settings.context * parallel.world
    evaluate_seconds = 0.0
    if resume:
        steps = recorded["steps"]
    else:
        speed = _tokens_per_second(model, train, settings, separator, parallel)
        probe = time.perf_counter()
        _validation_loss(model, validation, separator)
        evaluate_seconds = time.perf_counter() - probe
        steps = _steps(settings, speed * parallel.world, tokens_per_step, evaluate_seconds, started)
        steps = int(parallel.sum(float(steps))[0] / parallel.world)  # every process takes every step
    schedule = Schedule(
        epochs=max(1, math.ceil(steps / max(1, len(train) // (settings.rows * parallel.world)))),
        lr=settings.lr,
        batch_tokens=settings.rows * settings.context,
        grad_accum=1,
        warmup=settings.warmup,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        patience=10**9,  # pretraining runs its budget; the best validation's weights are kept
        seed=settings.seed,
        save_every=settings.save_every_minutes * 60,
        max_steps=steps,
        eval_every=max(1, steps // settings.evaluations),
        betas=(0.9, settings.beta2),
    )
    evaluations: list[Evaluation] = []
    prompts = _sample_prompts(validation, separator)

    def evaluated(record: dict[str, float]) -> None:
        loop_history = loop.history
        evaluation = Evaluation(
            step=int(record["step"]),
            tokens=loop_history.tokens,
            seconds=loop_history.seconds,
            val_loss=record["val_loss"],
            bits_per_byte=_bits_per_byte(record["val_loss"], validation, validation_bytes),
            samples=_samples(model, tokenizer, prompts, settings.seed) if parallel.main else [],
        )
        evaluations.append(evaluation)
        if on_eval and parallel.main:
            on_eval(evaluation)

    loop = Loop(
        model,
        train,  # type: ignore[arg-type]  # a lazy sequence of examples
        validation,
        schedule,
        separator,
        out / "checkpoint" / "state.pt",
        parallel,
        on_step,
        on_epoch=lambda record: evaluated(record) if "val_loss" in record else None,
        on_eval=evaluated,
    )
    if parallel.main and not resume:
        record = {
            "settings": asdict(settings),
            "command": "tertulia " + " ".join(sys.argv[1:]) if sys.argv[1:] else "tertulia train pretrain",
            "corpora": [s.name for s in sources],
            "tokenizer": str(tokenizer_dir),
            "tokenizer_key": tokenizer_key,
            "steps": steps,
            "processes": parallel.world,
            "tokens": {"train": len(train_tokens), "held-out": len(held_tokens)},
            "validated on": validated_on,
        }
        run_file.write_text(json.dumps(record, indent=2))
    if resume:
        loop.restore()
        evaluations[:] = [Evaluation(**e) for e in json.loads((data_dir / "evaluations.json").read_text())]
    facts = {
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "train_tokens": len(train_tokens),
        "held_out_tokens": len(held_tokens),
        "evaluate_seconds": evaluate_seconds,
    }
    if on_start:
        on_start(loop, shape, facts)
    step_reports = on_step
    if settings.tokens is None and not resume:
        reserve = WRITING_SECONDS + settings.evaluations * (evaluate_seconds + 1.0)
        step_reports = _on_time(
            loop, parallel, started + (settings.time_budget or 0) - reserve, run_file, on_step
        )
    loop.on_step = step_reports
    try:
        history = loop.run()
    finally:
        if parallel.main:
            (data_dir / "evaluations.json").write_text(json.dumps([asdict(e) for e in evaluations]))
    if parallel.main:
        wall = time.monotonic() - started
        run = json.loads(run_file.read_text())
        _write(
            out,
            sources,
            model,
            tokenizer_dir,
            shape,
            settings,
            run,
            history,
            evaluations,
            wall,
            final_metrics,
        )
    parallel.barrier()
    return Result(out, shape, history, evaluations, loop.total_steps)


def _on_time(
    loop: Loop,
    parallel: Distributed,
    deadline: float,
    run_file: Path,
    on_step: Callable[[StepReport], None] | None,
) -> Callable[[StepReport], None]:
    """Step reports that, a tenth into the run, check the pace against the deadline (what must follow
    the last step already taken off) and cut the run, and its learning-rate decay, to end on time if
    the steps turned out slower than timed."""
    check_at = max(10, loop.total_steps // 10)
    began = time.monotonic()

    def report(step: StepReport) -> None:
        if step.step == check_at:
            now = time.monotonic()
            per_step = (now - began) / check_at  # validations so far included
            fits = check_at + int((deadline - now) / per_step)
            fits = int(parallel.sum(float(fits))[0] / parallel.world)  # every process, the same cut
            if fits < loop.total_steps:
                loop.retarget(fits)
                if parallel.main:
                    run = json.loads(run_file.read_text())
                    run["steps"] = loop.total_steps
                    run_file.write_text(json.dumps(run, indent=2))
        if on_step:
            on_step(step)

    return report


def _recorded(run_file: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(run_file.read_text())
        Settings(**recorded["settings"])
        recorded["steps"], recorded["tokenizer_key"]  # noqa: B018  # present, or the run is not resumable
        return recorded
    except (OSError, ValueError, TypeError, KeyError):
        raise TertuliaError(
            f"{run_file} is missing or unreadable: the interrupted run cannot be resumed.",
            "Start it again with --force.",
        ) from None


def _check_memory(shape: Shape, settings: Settings, parallel: Distributed) -> None:
    needed = memory_needed(
        shape.parameters, shape.parameters, settings.batch_tokens, shape.vocab, shape.depth, shape.hidden
    )
    free = available_memory()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world))
    too_big = parallel.device.type == "cpu" and free is not None and needed * local > free
    if parallel.sum(float(too_big))[0]:
        raise TertuliaError(
            f"--depth {shape.depth} ({shape.parameters / 1e6:.1f} M parameters) with --batch-tokens "
            f"{settings.batch_tokens} needs about {needed * local / 2**30:.1f} GiB of memory and "
            f"{(free or 0) / 2**30:.1f} GiB is free.",
            "Lower --depth or --batch-tokens.",
        )


def _tokens_per_second(
    model: torch.nn.Module,
    train: Windows,
    settings: Settings,
    pad: int,
    parallel: Distributed,
    steps: int = 8,
) -> float:
    """Training speed of this model on this machine, timed on a copy (the run's weights stay untouched)."""
    probe = copy.deepcopy(model)
    loss = AssistantLoss(probe)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr)
    rows = [train[i % len(train)] for i in range(settings.rows)]
    batch = collate(rows, pad)
    seconds = []
    for _ in range(steps):
        begun = time.perf_counter()
        nll, _ = loss(*batch.to(parallel.device))
        (nll / batch.target_count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - begun)
    return batch.computed_tokens / statistics.median(seconds[2:])  # the first steps warm the allocator


def _steps(
    settings: Settings, speed: float, tokens_per_step: int, evaluate_seconds: float, started: float
) -> int:
    if settings.tokens is not None:
        return max(1, settings.tokens // tokens_per_step)
    assert settings.time_budget is not None
    left = settings.time_budget - (time.monotonic() - started)
    left -= (settings.evaluations + 1) * (evaluate_seconds + 1.0)  # validations and their samples
    left -= WRITING_SECONDS
    if left <= 0:
        raise TertuliaError(
            f"--time-budget {settings.time_budget:.0f}s leaves no time to train once the data is ready.",
            "Give it more time.",
        )
    return max(1, int(left * speed / tokens_per_step))


@torch.inference_mode()
def _validation_loss(model: torch.nn.Module, validation: list[TokenizedExample], pad: int) -> float:
    loss = AssistantLoss(model)
    nll = count = 0.0
    for start in range(0, len(validation), 8):
        batch = collate(validation[start : start + 8], pad)
        batch_nll, _ = loss(*batch.to(torch.device("cpu")))
        nll, count = nll + float(batch_nll), count + batch.target_count
    return nll / max(count, 1)


def _bits_per_byte(val_loss: float, validation: list[TokenizedExample], size: int) -> float:
    scored = sum(e.target_count for e in validation)
    return val_loss * scored / math.log(2) / max(size, 1)


def _sample_prompts(validation: list[TokenizedExample], separator: int) -> list[list[int]]:
    """The first few tokens of held-out documents: prompts in the corpus's own voice."""
    prompts = []
    for window in validation:
        ids = window.ids
        for start in (i for i, t in enumerate(ids[:-6]) if t == separator):
            prompts.append(ids[start : start + 5])
            if len(prompts) == 3:
                return prompts
    return prompts or [[separator]]


@torch.inference_mode()
def _samples(model: Any, tokenizer: Tokenizer, prompts: list[list[int]], seed: int) -> list[str]:
    was_training = model.training
    model.eval()
    texts = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for prompt in prompts:
            output = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=SAMPLE_TOKENS,
                do_sample=True,
                temperature=0.8,
                top_k=40,
                use_cache=True,
                pad_token_id=prompt[0],
            )
            texts.append(tokenizer.decode(output[0].tolist(), skip_special=True).strip())
    model.train(was_training)
    return texts


def _write(
    out: Path,
    sources: list[Corpus],
    model: Any,
    tokenizer_dir: Path,
    shape: Shape,
    settings: Settings,
    run: dict[str, Any],
    history: History,
    evaluations: list[Evaluation],
    wall: float,
    final_metrics: Callable[[Path], dict[str, Any]] | None,
) -> None:
    def write(staging: Path) -> None:
        model.config.use_cache = True
        model.save_pretrained(staging)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tokenizer_dir / name, staging / name)
        (staging / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")

    publish(out, write)
    extra = final_metrics(out) if final_metrics else {}
    texts = [d.text for d in documents(sources, held_out=True)]
    if texts:
        extra["a character bigram on the same held-out text (bits per byte)"] = char_bigram_bits_per_byte(
            (d.text for d in documents(sources, held_out=False)), texts
        )
    stage = Stage(
        name="pretraining",
        command=run.get("command", "tertulia train pretrain"),
        data={
            "corpora": ", ".join(run["corpora"]),
            "tokenizer": f"{run['tokenizer']} ({shape.vocab} tokens)",
            "training tokens (one pass)": f"{run['tokens']['train']:,}",
            "held-out tokens": f"{run['tokens']['held-out']:,}",
            "validation": run["validated on"],
        },
        model={
            "depth": shape.depth,
            "layers × width": f"{shape.depth} × {shape.hidden}",
            "heads": f"{shape.heads} of {HEAD_DIM}",
            "MLP width": shape.intermediate,
            "context": shape.context,
            "parameters": f"{shape.parameters / 1e6:.2f} M ({shape.vocab * shape.hidden / 1e6:.2f} M of them "
            "the tied embedding)",
        },
        hyperparameters={
            "steps": run["steps"],
            "tokens per step": f"{settings.rows * settings.context * run['processes']:,}",
            "learning rate": f"{settings.lr:g} (warmup {settings.warmup:.0%}, cosine decay to 0)",
            "weight decay": settings.weight_decay,
            "gradient clipping": settings.max_grad_norm,
            "processes": run["processes"],
            "time budget": f"{settings.time_budget:.0f} s" if settings.tokens is None else "—",
        },
        history=history,
        flops_per_token=shape.flops_per_token,
        wall_seconds=wall,
        metrics={
            "validation loss (nats/token)": evaluations[-1].val_loss if evaluations else math.nan,
            "validation bits per byte": evaluations[-1].bits_per_byte if evaluations else math.nan,
            **extra,
        },
        evaluations=[asdict(e) for e in evaluations],
    )
    plotted = plot_curves(history, [asdict(e) for e in evaluations], out / "curves.png")
    write_report(out, [stage], environment(), plotted)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
