"""`tertulia eval`: a report card for one model or several side by side, and each task on its own.

    tertulia eval --model A --compare B [--suite S] [--out DIR]     the suite, a report directory
    tertulia eval perplexity FILE [--assistant-only] [--json]
    tertulia eval multiple-choice FILE [--json]
    tertulia eval references FILE [--save-answers F] [--json]
    tertulia eval speed [--streams 1 --streams 8] [--json]
    tertulia eval side-by-side PROMPT... --model A --model B

Progress goes to stderr, so `--json` output on stdout can be piped.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from tertulia.config import DEFAULT_MODEL

eval_app = typer.Typer(
    help="Measure models: perplexity, multiple choice, reference metrics, speed, side by side; "
    "with no command, run a suite and write a report.",
    no_args_is_help=False,
    invoke_without_command=True,
)

err = Console(stderr=True, highlight=False)
ModelFlag = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Registry name, HF directory, .gguf or remote:NAME@URL; NAME@int4 etc. picks the precision.",
    ),  # fmt: skip
]
QuantizeFlag = Annotated[
    str, typer.Option("--quantize", "-q", help="auto (the weights' own), int4, int8 or none (float32).")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "–/s", style="progress.data.speed")


class RichTracker:
    """Progress bars with rate and ETA on stderr, one per task, removed when the task ends."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.current: Any = None

    def start(self, label: str, total: int | None, unit: str) -> Any:
        if self.current is None:
            self.progress.start()
        else:
            self.progress.remove_task(self.current)
        self.current = self.progress.add_task(f"{label} ({unit})", total=total)
        task = self.current
        return lambda n: self.progress.advance(task, n)

    def finish(self) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None

    def close(self) -> None:
        self.finish()
        self.progress.stop()


def _task(kind: str, **raw: Any) -> Any:
    from tertulia.eval.suite import make_task

    return make_task(1, {"kind": kind, **{k: v for k, v in raw.items() if v is not None}}, Path.cwd())


def _run_one(model: str, quantize: str, task: Any) -> tuple[str, dict[str, Any]]:
    """Run one task on one model with progress bars; (model name, results)."""
    from tertulia.eval.run import ModelChoice, can_run, open_model, run_task, task_data

    data = task_data(task)  # a bad file is refused before the model loads
    choice = ModelChoice.parse(model, quantize)
    tracker = RichTracker()
    with err.status(f"loading {choice.label}…"):
        provider = open_model(choice)
    try:
        reason = can_run(provider, task)
        if reason:
            from tertulia.errors import TertuliaError

            raise TertuliaError(f"Cannot run {task.kind}: {reason}.")
        return provider.name, asyncio.run(run_task(provider, task, tracker, data))
    finally:
        tracker.close()
        provider.stop()


def _print(result: dict[str, Any], as_json: bool, rows: list[tuple[str, str]]) -> None:
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    table = Table(show_header=False)
    for label, value in rows:
        table.add_row(label, value)
    Console().print(table)
    Console(highlight=False).print(f"[dim]Method: {result['method']}.[/]")


@eval_app.callback()
def suite(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option("--model", "-m", help="The model to evaluate (NAME@int4 etc. picks the precision).")
    ] = DEFAULT_MODEL,  # fmt: skip
    compare: Annotated[
        list[str] | None,
        typer.Option("--compare", "-c", help="Another model to run the suite on (repeatable)."),
    ] = None,
    suite_file: Annotated[
        Path | None,
        typer.Option("--suite", help="A suite YAML file. Default: the suite that ships (offline)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report directory. Default: TERTULIA_HOME/reports/DATE-SUITE."),
    ] = None,
    quantize: QuantizeFlag = "auto",
) -> None:
    """Run a suite on one model or several and write a report directory (report.md, report.html, PNG
    charts, results.json). Subcommands run one task."""
    if ctx.invoked_subcommand is not None:
        return
    from tertulia import config as settings
    from tertulia.errors import TertuliaError
    from tertulia.eval.report import write_report
    from tertulia.eval.run import ModelChoice, run_suite
    from tertulia.eval.suite import load_suite, require

    require("matplotlib")  # the report's charts: known before hours of work, not after
    chosen = load_suite(suite_file)
    choices = [ModelChoice.parse(m, quantize) for m in [model, *(compare or [])]]
    target = out or settings.reports_dir() / f"{datetime.now():%Y%m%d-%H%M%S}-{chosen.name}"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TertuliaError(f"{target} exists and is not empty.", "Choose another --out, or remove it.")
    err.print(f"Suite '{chosen.name}': {len(chosen.tasks)} tasks on {', '.join(c.label for c in choices)}")
    tracker = RichTracker()
    try:
        outcomes = asyncio.run(run_suite(choices, chosen, tracker))
    finally:
        tracker.close()
    write_report(target, chosen, outcomes, _ratings())
    failed = [(m.choice.label, o.task.name, o.failed) for m in outcomes for o in m.outcomes if o.failed]
    for outcome in outcomes:
        for done in outcome.outcomes:
            if done.skipped:
                err.print(f"[yellow]{outcome.choice.label}: skipped {done.task.name}[/]: {done.skipped}")
    for label, name, reason in failed:
        err.print(f"[red]{label}: {name} failed[/]: {reason}")
    print(f"Report: {target / 'report.md'} (also report.html, results.json)")
    if failed:
        sys.exit(1)


def _ratings() -> dict[str, tuple[int, int]]:
    """Thumbs per model from the chat's store, when there is one (never created here)."""
    import os

    from tertulia import config as settings

    url = os.environ.get("TERTULIA_DATABASE_URL")
    if url is None and not (settings.home() / "tertulia.db").exists():
        return {}
    from tertulia.store.conversations import Store
    from tertulia.store.database import open_store

    return Store(open_store(url)).ratings_by_model()


@eval_app.command()
def perplexity(
    file: Annotated[Path, typer.Argument(help="A text file, or JSONL with a 'text' field (or chat JSONL).")],
    model: ModelFlag = DEFAULT_MODEL,
    quantize: QuantizeFlag = "auto",
    assistant_only: Annotated[
        bool, typer.Option("--assistant-only", help="Chat JSONL: score the assistant replies given the rest.")
    ] = False,
    window: Annotated[
        int | None, typer.Option(help="Tokens per scoring window. Default: the model's context.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Word and byte perplexity, bits per byte and token perplexity (lm-evaluation-harness's method)."""
    task = _task("perplexity", file=str(file), assistant_only=assistant_only, window=window)
    _, result = _run_one(model, quantize, task)
    rows = [
        ("word perplexity", f"{result['word_perplexity']:.3f}"),
        ("byte perplexity", f"{result['byte_perplexity']:.4f}"),
        ("bits per byte", f"{result['bits_per_byte']:.4f}"),
        ("token perplexity", f"{result['token_perplexity']:.3f}"),
        ("tokens · words · bytes", f"{result['tokens']:,} · {result['words']:,} · {result['bytes']:,}"),
    ]
    _print(result, as_json, rows)


@eval_app.command("multiple-choice")
def multiple_choice(
    file: Annotated[Path, typer.Argument(help='JSONL of {"question", "choices", "answer"}.')],
    model: ModelFlag = DEFAULT_MODEL,
    quantize: QuantizeFlag = "auto",
    limit: Annotated[int | None, typer.Option(help="Only the first N items.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Accuracy by the log-likelihood of each choice: acc and acc_norm, with the random-choice baseline."""
    _, result = _run_one(model, quantize, _task("multiple_choice", file=str(file), limit=limit))
    rows = [
        ("acc", f"{result['acc']:.1%} ± {result['acc_stderr']:.1%}"),
        ("acc_norm", f"{result['acc_norm']:.1%} ± {result['acc_norm_stderr']:.1%}"),
        ("random choice", f"{result['random_baseline']:.1%}"),
        ("items", str(result["items"])),
    ]
    _print(result, as_json, rows)


@eval_app.command()
def references(
    file: Annotated[Path, typer.Argument(help="Chat JSONL whose last assistant turn is the reference.")],
    model: ModelFlag = DEFAULT_MODEL,
    quantize: QuantizeFlag = "auto",
    max_tokens: Annotated[int, typer.Option(help="Longest answer generated.")] = 64,
    limit: Annotated[int | None, typer.Option(help="Only the first N conversations.")] = None,
    save_answers: Annotated[
        Path | None, typer.Option(help="Write each prompt, reference and answer to this JSONL file.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """The model answers every conversation (greedy); BLEU, chrF, ROUGE-1/2/L, exact and contains match."""
    task = _task("references", file=str(file), max_tokens=max_tokens, limit=limit)
    _, result = _run_one(model, quantize, task)
    records = result.pop("records")
    if save_answers is not None:
        partial = save_answers.with_name(f".{save_answers.name}.partial")
        partial.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
        partial.replace(save_answers)
    rows = [(k, f"{result[k]:.2f}") for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL")]
    rows += [
        ("exact match", f"{result['exact_match']:.1f}"),
        ("contains match", f"{result['contains_match']:.1f}"),
    ]
    rows += [("answers", str(result["answers"]))]
    _print(result, as_json, rows)


@eval_app.command()
def speed(
    model: ModelFlag = DEFAULT_MODEL,
    quantize: QuantizeFlag = "auto",
    streams: Annotated[
        list[int] | None, typer.Option(help="Stream counts (repeatable). Default: 1 and 8.")
    ] = None,
    prompt_tokens: Annotated[int, typer.Option(help="About how long each prompt is.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per stream.")] = 64,
    rounds: Annotated[int, typer.Option(help="Rounds per stream count, after a warm-up.")] = 3,
    as_json: JsonFlag = False,
) -> None:
    """Time to first token, prefill and decode tokens/s, all streams' tokens/s, peak memory."""
    task = _task("speed", streams=streams or [1, 8], prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                 rounds=rounds)  # fmt: skip
    _, result = _run_one(model, quantize, task)
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    table = Table("streams", "first token", "prefill tok/s", "decode tok/s per stream", "all streams tok/s")
    for level in result["levels"]:
        prefill = level["prefill_tokens_per_second"]
        decode = level["decode_tokens_per_second"]
        table.add_row(
            str(level["streams"]),
            f"{level['first_token_seconds']:.2f} s",
            f"{prefill:.0f}" if prefill else "–",
            f"{decode:.1f}" if decode else "–",
            f"{level['aggregate_tokens_per_second']:.1f}",
        )
    Console().print(table)
    if result["peak_memory_mb"]:
        Console().print(f"peak memory {result['peak_memory_mb']:.0f} MB")
    Console(highlight=False).print(f"[dim]Method: {result['method']}.[/]")


@eval_app.command("side-by-side")
def side_by_side(
    prompts: Annotated[list[str], typer.Argument(help="Questions every model answers.")],
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="A model (repeat for several).")
    ] = None,
    quantize: QuantizeFlag = "auto",
    max_tokens: Annotated[int, typer.Option(help="Longest answer generated.")] = 128,
) -> None:
    """The same prompts through two or more models, answers in one table, for people to judge."""
    task = _task("side_by_side", prompts=prompts, max_tokens=max_tokens)
    columns = {}
    for name in model or [DEFAULT_MODEL]:
        label, result = _run_one(name, quantize, task)
        columns[name if name not in columns else label] = result["answers"]
    table = Table("prompt", *columns, show_lines=True)
    for i, prompt in enumerate(prompts):
        table.add_row(prompt, *(answers[i] for answers in columns.values()))
    Console().print(table)
