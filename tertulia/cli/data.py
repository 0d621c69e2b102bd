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
    shown: dict[str, int] = {}
    for problem in report.problems:
        count = shown[problem.kind] = shown.get(problem.kind, 0) + 1
        if problem.severity == "warning" and count > SHOWN_PER_KIND:
            continue
        mark = "[red]error[/]" if problem.severity == "error" else "[yellow]warning[/]"
        table.add_row(str(problem.line or "—"), mark, problem.kind, problem.message)
    hidden = {k: n - SHOWN_PER_KIND for k, n in shown.items() if n > SHOWN_PER_KIND}
    if report.problems:
        console.print(table)
    for kind, more in hidden.items():
        if any(p.kind == kind and p.severity == "warning" for p in report.problems):
            console.print(f"… and {more} more '{kind}' warning(s).")
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
