"""`tertulia data`: check and prepare fine-tuning data (JSONL) before any training starts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from tertulia.config import DEFAULT_MODEL
from tertulia.errors import TertuliaError

if TYPE_CHECKING:
    from tertulia.models.registry import TextSide
    from tertulia.train.data import Report

data_app = typer.Typer(
    help="Check and prepare fine-tuning data: OpenAI's chat or prompt/completion JSONL.",
    no_args_is_help=True,
)

FileArgument = Annotated[Path, typer.Argument(help="A JSONL file: one example per line.")]
ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Whose tokenizer, template and context to check against.")
]
SHOWN_PER_KIND = 8  # warnings of one kind beyond this are counted, not listed


def _report(path: Path, model: str) -> tuple[Report, TextSide]:
    from tertulia.cli.progress import LazyProgress
    from tertulia.models.registry import load_text_side
    from tertulia.train.data import validate

    with LazyProgress(Console(stderr=True)) as progress:
        text = load_text_side(model, progress)
    return validate(path, text.count_chat, text.context), text


@data_app.command("validate")
def validate_command(file: FileArgument, model: ModelOption = DEFAULT_MODEL) -> None:
    """Report every problem with its line number; exit 1 if the file cannot be trained on."""
    console = Console(highlight=False)
    report, text = _report(file, model)
    table = Table(title=f"{file}: {len(report.examples)} usable example(s)", title_justify="left")
    for column in ("line", "", "problem", "what"):
        table.add_column(column)
    warned: dict[str, int] = {}
    for problem in report.problems:
        if problem.severity == "warning":
            warned[problem.kind] = warned.get(problem.kind, 0) + 1
            if warned[problem.kind] > SHOWN_PER_KIND:
                continue
        mark = "[red]error[/]" if problem.severity == "error" else "[yellow]warning[/]"
        table.add_row(str(problem.line or "—"), mark, problem.kind, problem.message)
    if report.problems:
        console.print(table)
    for kind, count in warned.items():
        if count > SHOWN_PER_KIND:
            console.print(f"… and {count - SHOWN_PER_KIND} more '{kind}' warning(s).")
    errors, warnings = len(report.errors), len(report.warnings)
    console.print(
        f"{errors} error(s), {warnings} warning(s); format: {report.format or 'unknown'}; "
        f"checked against {text.name} (context {text.context} tokens)."
    )
    if errors:
        raise typer.Exit(1)
    console.print("[green]Ready to train.[/]")


@data_app.command("split")
def split_command(
    file: FileArgument,
    validation: Annotated[float, typer.Option(help="Share of examples held out for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle (the same seed, the same split).")] = 0,
    out: Annotated[Path | None, typer.Option(help="Folder for the two files (default: beside FILE).")] = None,
    model: ModelOption = DEFAULT_MODEL,
    force: Annotated[bool, typer.Option(help="Overwrite existing output files.")] = False,
) -> None:
    """Write FILE's usable examples to NAME.train.jsonl and NAME.validation.jsonl, shuffled."""
    from tertulia.train.data import split, write_jsonl

    console = Console(highlight=False)
    report, _ = _report(file, model)
    if report.errors:
        raise TertuliaError(
            f"{file} has {len(report.errors)} error(s) (the first on line {report.errors[0].line}).",
            f"See them with: tertulia data validate {file}",
        )
    folder = out or file.parent
    folder.mkdir(parents=True, exist_ok=True)
    targets = [folder / f"{file.stem}.{part}.jsonl" for part in ("train", "validation")]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise TertuliaError(f"{', '.join(existing)} already exist(s).", "Pass --force to overwrite.")
    train, held = split(report, validation, seed)
    for target, records in zip(targets, (train, held), strict=True):
        write_jsonl(target, records)
    console.print(f"{len(train)} examples → {targets[0]}\n{len(held)} examples → {targets[1]}")


@data_app.command("stats")
def stats_command(
    file: FileArgument,
    model: ModelOption = DEFAULT_MODEL,
    epochs: Annotated[
        int, typer.Option(min=1, help="Passes over the data, for the training-token estimate.")
    ] = 3,
    plot: Annotated[Path | None, typer.Option(help="Also draw the token histogram to this PNG.")] = None,
    prices: Annotated[Path | None, typer.Option(help="An edited copy of the price table (JSON).")] = None,
) -> None:
    """Counts per role, the distribution of example lengths, and what training on it takes."""
    from tertulia.train.costs import PriceTable
    from tertulia.train.data import Stats

    console = Console(highlight=False)
    report, text = _report(file, model)
    if report.errors:
        console.print(
            f"[yellow]{len(report.errors)} line(s) with errors are left out (tertulia data validate).[/]"
        )
    stats = Stats.of(report)
    if not stats.examples:
        raise TertuliaError(f"{file} has no usable example.", f"See why with: tertulia data validate {file}")
    turns = ", ".join(f"{n} {role}" for role, n in stats.turns.items())
    console.print(
        f"{stats.examples} examples: {turns} turns ({stats.trained_turns} assistant turns trained on)"
    )
    console.print(
        f"tokens per example ({text.name}): mean {stats.total_tokens / stats.examples:,.0f}, "
        f"median {stats.percentile(0.5):,}, p95 {stats.percentile(0.95):,}, max {stats.tokens[-1]:,} "
        f"(context {text.context:,})"
    )
    histogram = Table(box=None, show_header=True)
    for column in ("tokens", "examples", ""):
        histogram.add_column(column, justify="right" if column != "" else "left")
    rows = stats.histogram()
    widest = max(count for _, _, count in rows)
    for low, high, count in rows:
        bar = "█" * round(30 * count / widest) if widest else ""
        histogram.add_row(f"{low:,}–{high:,}", str(count), f"[cyan]{bar}[/]")
    console.print(histogram)
    training_tokens = stats.total_tokens * epochs
    console.print(f"training tokens: {stats.total_tokens:,} × {epochs} epochs = [bold]{training_tokens:,}[/]")
    table = PriceTable.load(prices)
    if table.training:
        costs = ", ".join(
            f"{name} ${training_tokens * price / 1e6:,.2f}" for name, price in sorted(table.training.items())
        )
        console.print(f"hosted fine-tuning at list prices of {table.date}: {costs}")
    if plot is not None:
        _plot_histogram(stats.tokens, plot, f"{file.name}: tokens per example ({text.name})")
        console.print(f"histogram → {plot}")


def _plot_histogram(tokens: list[int], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise TertuliaError(
            "--plot needs matplotlib.", "Install it with: pip install 'tertulia[train]'"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=120)
    axes.hist(tokens, bins=min(40, max(5, len(set(tokens)))), color="#0f766e")
    axes.set_xlabel("tokens per example")
    axes.set_ylabel("examples")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@data_app.command("export")
def export_command(
    out: Annotated[Path, typer.Argument(help="The JSONL file to write.")],
    database_url: Annotated[
        str | None,
        typer.Option(help="The store (default: TERTULIA_DATABASE_URL, else the local SQLite file)."),
    ] = None,
    user: Annotated[str | None, typer.Option(help="Whose conversations, with --auth accounts.")] = None,
    shown: Annotated[
        bool, typer.Option("--shown", help="Each conversation's shown branch, not only liked replies.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Write fine-tuning examples from the kept conversations: by default, every reply rated thumbs-up."""
    import os

    from tertulia.store.conversations import Store
    from tertulia.store.database import open_store
    from tertulia.train.data import write_jsonl
    from tertulia.train.export import examples

    if out.exists() and not force:
        raise TertuliaError(f"{out} already exists.", "Pass --force to overwrite it.")
    store = Store(open_store(database_url or os.environ.get("TERTULIA_DATABASE_URL")))
    if user is None:
        owner = store.local_user()
    else:
        found = store.user_by_name(user)
        if found is None:
            raise TertuliaError(f"No user named {user!r} in this store.")
        owner = found
    written = write_jsonl(out, examples(store, owner.id, shown=shown))
    what = "conversations' shown branches" if shown else "replies rated thumbs-up"
    Console(highlight=False).print(f"{written} example(s) from {what} → {out}")
    if written:
        Console(highlight=False).print(f"Check them with: tertulia data validate {out}")


@data_app.command("identity")
def identity_command(
    out: Annotated[Path, typer.Argument(help="Folder for the files.")],
    name: Annotated[str, typer.Option(help="The assistant's name.")] = "Luna",
    creator: Annotated[str, typer.Option(help="Who made it.")] = "the Tertulia team",
    seed: Annotated[int, typer.Option(help="Seed of the shuffles.")] = 0,
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Make an identity dataset (EN and ES): train, validation, and held-out questions to check a run."""
    import json

    from tertulia.train.data import write_jsonl
    from tertulia.train.identity import Identity, make

    files = {part: out / f"identity.{part}" for part in ("train.jsonl", "validation.jsonl", "heldout.json")}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not force:
        raise TertuliaError(f"{', '.join(existing)} already exist(s).", "Pass --force to overwrite.")
    data = make(Identity(name=name, creator=creator), seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(files["train.jsonl"], data.train)
    write_jsonl(files["validation.jsonl"], data.validation)
    held = {"name": name, "questions": data.held_out_questions, "chat": data.held_out_chat}
    files["heldout.json"].write_text(json.dumps(held, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    Console(highlight=False).print(
        f"{len(data.train)} training and {len(data.validation)} validation examples for {name}; "
        f"{len(data.held_out_questions)} held-out questions → {out}"
    )
