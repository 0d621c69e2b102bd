"""`tertulia tokens`: exact token counts for a model, and what they cost hosted or here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tertulia.config import DEFAULT_MODEL
from tertulia.errors import TertuliaError


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 else f"${value:.6f}"


def tokens(
    what: Annotated[
        str, typer.Argument(help="Text, '-' for stdin, a text file, or a .json/.jsonl file of chat messages.")
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Whose tokenizer and chat template.")
    ] = DEFAULT_MODEL,
    output_tokens: Annotated[
        int, typer.Option("--output-tokens", "-o", min=0, help="Tokens of reply to price as well.")
    ] = 0,
    price_in: Annotated[
        float | None, typer.Option(min=0, help="Your own price: USD per 1M input tokens.")
    ] = None,
    price_out: Annotated[
        float | None, typer.Option(min=0, help="Your own price: USD per 1M output tokens.")
    ] = None,
    prices: Annotated[Path | None, typer.Option(help="An edited copy of the price table (JSON).")] = None,
    local: Annotated[bool, typer.Option(help="Measure the local engine here and show its CPU time.")] = False,
) -> None:
    """Count tokens exactly (the model's tokenizer, and its chat template for messages) and price them."""
    from tertulia.cli.progress import LazyProgress
    from tertulia.models.registry import load_text_side
    from tertulia.train.costs import PriceTable, count, hosted_costs, measure_local, read_input

    if (price_in is None) != (price_out is None):
        raise TertuliaError("Give both --price-in and --price-out, or neither.")
    console = Console(highlight=False)
    with LazyProgress(Console(stderr=True)) as progress:
        text_side = load_text_side(model, progress)
    counted = count(text_side, read_input(what))
    table_source = PriceTable.load(prices)
    console.print(f"[bold]{counted.total:,}[/] tokens with {text_side.name}'s tokenizer", end="")
    if counted.per_message is not None:
        console.print(f" and chat template ({counted.overhead} of them the template's)")
        per_message = Table(show_header=True, box=None)
        per_message.add_column("#", justify="right")
        per_message.add_column("role")
        per_message.add_column("tokens", justify="right")
        for i, (role, n) in enumerate(counted.per_message, 1):
            per_message.add_row(str(i), role, f"{n:,}")
        per_message.add_row("", "template", f"{counted.overhead:,}")
        console.print(per_message)
    else:
        console.print()
    if counted.total > text_side.context:
        console.print(f"[yellow]More than the model's context ({text_side.context:,} tokens).[/]")

    console.print(
        f"\nCost of {counted.total:,} input + {output_tokens:,} output tokens, "
        f"at list prices of {table_source.date}:"
    )
    costs = Table()
    for column in ("model", "input", "output", "total"):
        costs.add_column(column, justify="left" if column == "model" else "right")
    if price_in is not None and price_out is not None:
        table_source.models = {"your prices": (price_in, price_out), **table_source.models}
    for name, cost_in, cost_out, total in hosted_costs(table_source, counted.total, output_tokens):
        costs.add_row(name, _usd(cost_in), _usd(cost_out), _usd(total))
    console.print(costs)
    console.print(
        "Hosted models count with their own tokenizers, which differ from this one by a few tens of percent."
    )
    if local:
        console.print("Measuring the local engine…", style="dim")
        speed = measure_local(model)
        seconds = speed.seconds(counted.total, output_tokens)
        console.print(
            f"\nHere ({text_side.name}, {speed.threads} threads): "
            f"prompt {speed.prefill_per_second:,.0f} tok/s, "
            f"generation {speed.decode_per_second:,.1f} tok/s → {seconds:,.1f} s, "
            f"{speed.cpu_hours(counted.total, output_tokens):.4f} CPU-hours"
        )
