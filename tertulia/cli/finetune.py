"""`tertulia finetune`: train on a JSONL file with a live progress bar; Ctrl-C saves a resumable state."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tertulia.config import DEFAULT_MODEL

if TYPE_CHECKING:
    from tertulia.train.finetune import Prepared, Result
    from tertulia.train.loop import Loop, StepReport


def finetune(
    file: Annotated[Path, typer.Argument(help="Training data: OpenAI's chat or prompt/completion JSONL.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the fine-tuned model.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model to start from.")] = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="lora (small adapters, merged at the end) or full.")] = "lora",
    epochs: Annotated[int, typer.Option(help="Passes over the data (early stopping may end sooner).")] = 3,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate. Default: 2e-3 for lora, 5e-5 full.")
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option(help="Validation JSONL. Default: 10% of FILE when it has 20+ examples, else none."),
    ] = None,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per micro-batch, padding included.")] = 512,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    warmup: Annotated[float, typer.Option(help="Share of the steps that warm the learning rate up.")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Clip gradients to this norm.")] = 1.0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA scale (alpha / r multiplies the adapters).")] = 32,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA inputs.")] = 0.0,
    patience: Annotated[
        int, typer.Option(help="Stop after this many epochs without a better validation loss.")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the adapters' initialisation.")] = 0,
    save_every: Annotated[float, typer.Option(help="Minutes between checkpoints within an epoch.")] = 5.0,
    dedupe: Annotated[
        bool, typer.Option(help="Drop repeated examples (by default a repeat is kept: it weighs more).")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue the interrupted run in --out, with its settings.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier fine-tune.")] = False,
) -> None:
    """Fine-tune a model (LoRA or full) into a directory that `tertulia serve --model DIR` loads."""
    from tertulia.train.finetune import Settings
    from tertulia.train.finetune import finetune as run
    from tertulia.train.loop import Interrupted

    settings = Settings(
        model=model,
        method=method,  # type: ignore[arg-type]  # Settings.check reports a wrong value
        epochs=epochs,
        lr=lr,
        batch_tokens=batch_tokens,
        grad_accum=grad_accum,
        warmup=warmup,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        patience=patience,
        seed=seed,
        save_every_minutes=save_every,
        dedupe=dedupe,
    )
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, one process speaks
    console = Console(highlight=False, quiet=not main)
    view = TrainingView(console)
    try:
        with view:
            result = run(
                file,
                out,
                settings,
                validation_file=validation,
                resume=resume,
                force=force,
                on_start=view.start,
                on_step=view.step,
                on_epoch=view.epoch,
            )
    except Interrupted:
        again = "the same torchrun command with " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        console.print(
            f"[yellow]Stopped.[/] The run is saved in {out}; continue it with {again}--resume:\n"
            f"  tertulia finetune {file} --out {out} --resume"
        )
        sys.exit(130)
    view.summary(result)


class TrainingView:
    """A progress bar (loss, tokens/s, ETA) and a line per epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: int | None = None

    def __enter__(self) -> TrainingView:
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def start(self, loop: Loop, prepared: Prepared) -> None:
        trained = sum(e.target_count for e in prepared.train)
        tokens = sum(len(e) for e in prepared.train)
        validation = f"{len(prepared.validation)} validation" if prepared.validation else "no validation"
        self.console.print(
            f"{prepared.base_name}: {len(prepared.train)} training examples ({tokens:,} tokens, "
            f"{trained:,} of them the assistant's), {validation}; "
            f"{loop.total_steps} steps over {loop.schedule.epochs} epoch(s)"
        )
        trainable = sum(p.numel() for p in loop.parameters)
        total = sum(p.numel() for p in loop.loss.parameters())
        self.console.print(f"training {trainable:,} of {total:,} parameters ({trainable / total:.1%})")
        self.progress.start()
        self.task = self.progress.add_task(
            "training", total=loop.total_steps, completed=loop.global_step, loss="—", rate="—"
        )

    def step(self, report: StepReport) -> None:
        if self.task is not None:
            self.progress.update(
                self.task,
                completed=report.step,
                description=f"epoch {report.epoch}",
                loss=f"{report.loss:.3f}",
                rate=f"{report.tokens_per_second:.0f}",
            )

    def epoch(self, record: dict[str, float]) -> None:
        line = f"epoch {int(record['epoch'])}: train loss {record['train_loss']:.4f}"
        if "val_loss" in record:
            line += f", validation loss {record['val_loss']:.4f}, token accuracy {record['val_accuracy']:.1%}"
            line += " (best so far)" if record.get("best") else ""
        self.progress.console.print(line)

    def summary(self, result: Result) -> None:
        self.progress.stop()
        history = result.history
        table = Table(title=f"{result.out}", title_justify="left", box=None)
        for column in ("epoch", "train loss", "val loss", "val accuracy"):
            table.add_column(column, justify="right")
        for e in history.epochs:
            table.add_row(
                str(int(e["epoch"])) + (" *" if e.get("best") else ""),
                f"{e['train_loss']:.4f}",
                f"{e['val_loss']:.4f}" if "val_loss" in e else "—",
                f"{e['val_accuracy']:.1%}" if "val_accuracy" in e else "—",
            )
        self.console.print(table)
        rate = history.tokens / history.seconds if history.seconds else 0
        stop = "; stopped early (validation loss stopped improving)" if result.stopped_early else ""
        self.console.print(f"{history.tokens:,} tokens in {history.seconds:.0f} s ({rate:.0f} tok/s){stop}.")
        self.console.print(f"Model card, metrics and loss.png are in {result.out}. Serve it with:")
        self.console.print(f"  tertulia serve --model {result.out}")
