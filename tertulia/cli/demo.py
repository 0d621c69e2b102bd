"""`tertulia demo`: from the default model to an assistant with its own name, compared side by side."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tertulia.config import DEFAULT_MODEL


def demo(
    name: Annotated[str, typer.Option(help="The assistant's new name.")] = "Luna",
    creator: Annotated[str, typer.Option(help="Who made it.")] = "the Tertulia team",
    model: Annotated[str, typer.Option("--model", "-m", help="The model to start from.")] = DEFAULT_MODEL,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where the model goes. Default: TERTULIA_HOME/models/NAME."),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the identity data.")] = 2,
    force: Annotated[bool, typer.Option(help="Replace an earlier demo model of that name.")] = False,
) -> None:
    """Fine-tune a model on a generated identity dataset, then compare its answers before and after."""
    from tertulia import config as settings
    from tertulia.cli.finetune import TrainingView
    from tertulia.eval.identity import HeldOut, check
    from tertulia.train.data import write_jsonl
    from tertulia.train.finetune import Settings, finetune
    from tertulia.train.identity import Identity, make
    from tertulia.train.loop import Interrupted

    console = Console(highlight=False)
    out = out or settings.models_dir() / name.lower()
    data_dir = settings.home() / "data" / f"identity-{name.lower()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    data = make(Identity(name=name, creator=creator))
    write_jsonl(data_dir / "identity.train.jsonl", data.train)
    write_jsonl(data_dir / "identity.validation.jsonl", data.validation)
    console.print(
        f"1/3 identity data for {name}: {len(data.train)} training and {len(data.validation)} validation "
        f"examples (EN/ES) in {data_dir}"
    )
    console.print(f"2/3 fine-tuning {model} (LoRA) → {out}")
    view = TrainingView(console)
    try:
        with view:
            result = finetune(
                data_dir / "identity.train.jsonl",
                out,
                Settings(model=model, epochs=epochs),
                validation_file=data_dir / "identity.validation.jsonl",
                force=force,
                on_start=view.start,
                on_step=view.step,
                on_epoch=view.epoch,
            )
    except Interrupted:
        console.print(
            f"[yellow]Stopped.[/] Continue the fine-tune with: tertulia finetune "
            f"{data_dir / 'identity.train.jsonl'} --out {out} --resume (or start over: tertulia demo --force)"
        )
        sys.exit(130)
    console.print("3/3 asking both models questions they were never trained on (greedy, no system prompt)")
    held_out = HeldOut(name, data.held_out_questions, data.held_out_chat)
    result_check = check(model, str(result.out), held_out)
    table = Table(show_lines=True)
    table.add_column("question")
    table.add_column(f"before ({model})")
    table.add_column(f"after ({out.name})")
    for question, before, after in zip(
        held_out.questions, result_check.before.answers, result_check.after.answers, strict=True
    ):
        table.add_row(question, before, after)
    console.print(table)
    before, after = result_check.before, result_check.after
    console.print(
        f"says '{name}': {before.name_rate:.0%} before, [bold]{after.name_rate:.0%}[/] after · "
        f"perplexity on held-out chat: {before.chat_perplexity:.2f} before, "
        f"{after.chat_perplexity:.2f} after ({result_check.perplexity_change:+.1%})"
    )
    shown = out if out.parent != settings.models_dir() else out.name
    console.print(f"Chat with it: tertulia chat --model {shown}   Serve it: tertulia serve --model {shown}")
    if out.parent == settings.models_dir():
        console.print(f"It lives in {out}; 'tertulia models' lists it.")
