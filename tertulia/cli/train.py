"""`tertulia train tokenizer|pretrain|sft`: a GPT of your own, from nothing, in three commands."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from tertulia.cli.finetune import TrainingView
from tertulia.train.corpora import PACKAGES

if TYPE_CHECKING:
    from tertulia.train.loop import Loop
    from tertulia.train.pretrain import Evaluation, Shape

train_app = typer.Typer(
    help="Train a small GPT from scratch: a tokenizer, pretraining, then chat tuning.", no_args_is_help=True
)
CORPUS_HELP = "A .txt/.md/.jsonl file, a folder of them, or a corpus by name: " + ", ".join(PACKAGES) + "."


def _console() -> Console:
    return Console(highlight=False, quiet=os.environ.get("RANK", "0") != "0")  # under torchrun, one speaks


@train_app.command("tokenizer")
def tokenizer(
    corpus: Annotated[list[str], typer.Option("--corpus", "-c", help=CORPUS_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the tokenizer.")],
    vocab_size: Annotated[
        int, typer.Option(help="Tokens in the vocabulary, special tokens included.")
    ] = 4096,
    force: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier tokenizer.")] = False,
) -> None:
    """Learn a byte-level BPE tokenizer (ChatML tokens reserved) and report its compression."""
    from tertulia.models import registry
    from tertulia.train.corpora import corpora
    from tertulia.train.tokenizer_train import train_tokenizer

    console = _console()
    with console.status("learning the vocabulary…"):
        run = train_tokenizer(
            corpora(corpus),
            vocab_size,
            out,
            force=force,
            default_tokenizer=lambda: registry.load_text_side().tokenizer,
        )
    compression = run.compression
    console.print(
        f"{run.vocab_size} tokens learnt from {run.documents:,} documents ({run.bytes / 1e6:.1f} MB) "
        f"in {run.seconds:.1f} s"
    )
    line = f"held-out text: {compression.bytes_per_token:.2f} bytes per token"
    if compression.default_bytes_per_token:
        line += f" (the default model's tokenizer: {compression.default_bytes_per_token:.2f})"
    console.print(line)
    console.print(f"Report in {out / 'report.md'}. Next: tertulia train pretrain --tokenizer {out} ...")


@train_app.command("pretrain")
def pretrain(
    corpus: Annotated[list[str], typer.Option("--corpus", "-c", help=CORPUS_HELP)],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="A `train tokenizer` directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the model.")],
    depth: Annotated[int, typer.Option(help="Layers; the width is 64 × depth, and so on.")] = 4,
    time_budget: Annotated[
        str | None, typer.Option(help="How long to train, e.g. 15m or 1h: the schedule ends on time.")
    ] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens to train on, instead of a time budget.")] = None,
    context: Annotated[int, typer.Option(help="Tokens per training window (the model's context).")] = 512,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per optimizer step (per process).")] = 2048,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1.5e-3,
    warmup: Annotated[float, typer.Option(help="Share of the steps that warm the learning rate up.")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.1,
    evaluations: Annotated[int, typer.Option(help="Validations (with samples) over the run.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the weights and of the data order.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    force: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier run.")] = False,
) -> None:
    """Pretrain a Llama-family model from scratch on a corpus (15 minutes unless told otherwise)."""
    from tertulia.errors import TertuliaError
    from tertulia.train.corpora import corpora
    from tertulia.train.loop import Interrupted
    from tertulia.train.pretrain import Settings, parse_duration
    from tertulia.train.pretrain import pretrain as run

    if tokens is not None and time_budget is not None:
        raise TertuliaError("Give --time-budget or --tokens, not both.")
    budget = None if tokens is not None else parse_duration(time_budget or "15m")
    settings = Settings(
        depth=depth,
        context=context,
        time_budget=budget,
        tokens=tokens,
        batch_tokens=batch_tokens,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        evaluations=evaluations,
        seed=seed,
    )
    console = _console()
    view = PretrainView(console)
    sources = corpora(corpus)
    try:
        with view, console.status("reading and tokenizing the corpus, timing a few steps…") as status:
            view.status = status
            result = run(
                sources,
                tokenizer,
                out,
                settings,
                resume=resume,
                force=force,
                on_start=view.start_pretraining,
                on_step=view.step,
                on_eval=view.evaluated,
                final_metrics=lambda directory: held_out_perplexity(directory, sources),
            )
    except Interrupted:
        _stopped(console, out, "pretrain")
    view.progress.stop()
    last = result.evaluations[-1] if result.evaluations else None
    history = result.history
    rate = history.tokens / history.seconds if history.seconds else 0
    console.print(f"{history.tokens:,} tokens in {history.seconds:.0f} s ({rate:,.0f} tok/s).")
    if last:
        console.print(f"held-out bits per byte: {last.bits_per_byte:.3f}")
    console.print(
        f"Report in {out / 'report.md'}. Next: tertulia train sft --base {out} --data ... --out DIR"
    )


@train_app.command("sft")
def sft(
    base: Annotated[Path, typer.Option("--base", "-b", help="A pretrained model directory.")],
    data: Annotated[str, typer.Option("--data", "-d", help="Chat JSONL, or a corpus of conversations.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the chat model.")],
    epochs: Annotated[int, typer.Option(help="Passes over the data (early stopping may end sooner).")] = 1,
    max_examples: Annotated[
        int | None,
        typer.Option(
            help="Train on at most this many examples, drawn at random (default: all of a file, "
            "2,000 from a corpus)."
        ),
    ] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per micro-batch, padding included.")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the data order.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    force: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier run.")] = False,
) -> None:
    """Chat-tune a pretrained model: it learns to answer in turns (loss on the assistant's tokens)."""
    from tertulia.train.finetune import Settings
    from tertulia.train.loop import Interrupted
    from tertulia.train.sft import sft as run

    settings = Settings(
        epochs=epochs, lr=lr, batch_tokens=batch_tokens, seed=seed, warmup=0.05, weight_decay=0.0
    )
    console = _console()
    view = TrainingView(console)
    try:
        with view:
            result = run(
                base,
                data,
                out,
                settings,
                max_examples=max_examples,
                resume=resume,
                force=force,
                on_start=view.start,
                on_step=view.step,
                on_epoch=view.epoch,
            )
    except Interrupted:
        _stopped(console, out, "sft")
    view.progress.stop()
    for prompt, reply in result.samples:
        console.print(f"[bold]user:[/] {prompt}\n[bold]model:[/] {reply}")
    console.print(f"Report in {out / 'report.md'}. Talk to it with:\n  tertulia chat --model {out}")


def _stopped(console: Console, out: Path, command: str) -> None:
    console.print(
        f"[yellow]Stopped.[/] The run is saved in {out}; continue it with the same command and --resume "
        f"(tertulia train {command} ... --out {out} --resume)."
    )
    sys.exit(130)


def held_out_perplexity(directory: Path, sources: list[Any]) -> dict[str, Any]:
    """The held-out split scored by the evaluation's rolling windows, the model served by the engine."""
    from tertulia.eval.perplexity import document_perplexity
    from tertulia.eval.run import ModelChoice, open_model
    from tertulia.train.corpora import documents

    texts = [d.text for d in documents(sources, held_out=True)]
    if not texts:
        return {}
    provider = open_model(ModelChoice(str(directory), "none"))
    try:
        result = asyncio.run(document_perplexity(provider, texts))
    finally:
        provider.stop()
    return {
        "held-out bits per byte (lm-eval's rolling windows, served by the engine)": result.bits_per_byte,
        "held-out word perplexity": result.word_perplexity,
    }


class PretrainView(TrainingView):
    """The training bar, plus a line and samples at each validation."""

    status: Any = None

    def start_pretraining(self, loop: Loop, shape: Shape, facts: dict[str, Any]) -> None:
        if self.status is not None:
            self.status.stop()
        self.console.print(
            f"depth {shape.depth}: {shape.depth} layers × {shape.hidden}, {shape.parameters / 1e6:.2f} M "
            f"parameters; {facts['train_tokens']:,} training tokens, {facts['held_out_tokens']:,} held out"
        )
        self.console.print(
            f"{facts['steps']} steps of {facts['tokens_per_step']:,} tokens "
            f"({facts['steps'] * facts['tokens_per_step']:,} tokens)"
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "pretraining", total=loop.total_steps, completed=loop.global_step, loss="—", rate="—"
        )

    def evaluated(self, evaluation: Evaluation) -> None:
        self.progress.console.print(
            f"step {evaluation.step}: held-out {evaluation.bits_per_byte:.3f} bits per byte "
            f"(loss {evaluation.val_loss:.3f})"
        )
        for sample in evaluation.samples:
            self.progress.console.print(f"  [dim]{' '.join(sample.split())[:160]}[/]")
