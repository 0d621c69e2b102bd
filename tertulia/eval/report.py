"""The report card: a suite's results on one or more models, as results.json, report.md, report.html and
PNG charts in one directory.

The report is built once as a list of blocks (headings, paragraphs, tables, images) and written twice,
as Markdown and as a self-contained HTML page (styles inline, charts embedded), so the two never say
different things. The directory appears whole or not at all: it is written beside its final place and
renamed into it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tertulia import __version__
from tertulia.eval.charts import quality_chart, speed_chart
from tertulia.eval.run import ModelOutcome
from tertulia.eval.suite import DATA, Suite

# Per kind of task: (result key, label, format, higher is better), in the order the report lists them.
HEADLINES: dict[str, list[tuple[str, str, str, bool]]] = {
    "perplexity": [
        ("word_perplexity", "word perplexity", "{:.2f}", False),
        ("byte_perplexity", "byte perplexity", "{:.4f}", False),
        ("bits_per_byte", "bits per byte", "{:.4f}", False),
        ("token_perplexity", "token perplexity", "{:.2f}", False),
        ("tokens", "tokens scored", "{:,}", True),
    ],
    "multiple_choice": [
        ("acc", "acc", "{:.1%}", True),
        ("acc_norm", "acc_norm", "{:.1%}", True),
        ("random_baseline", "random choice", "{:.1%}", True),
    ],
    "references": [
        ("bleu", "BLEU", "{:.1f}", True),
        ("chrf", "chrF", "{:.1f}", True),
        ("rouge1", "ROUGE-1", "{:.1f}", True),
        ("rouge2", "ROUGE-2", "{:.1f}", True),
        ("rougeL", "ROUGE-L", "{:.1f}", True),
        ("exact_match", "exact match", "{:.1f}", True),
        ("contains_match", "contains match", "{:.1f}", True),
    ],
}
STDERR = {"acc": "acc_stderr", "acc_norm": "acc_norm_stderr"}


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


Block = tuple[str, Any]  # ("h1" | "h2" | "p" | "table" | "image", content)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tertulia": __version__,
    }


def _source(path: Path) -> str:
    """Where the suite came from: a shipped file by its builtin: name, not this machine's path."""
    return f"builtin:{path.name}" if path.parent == DATA else str(path)


def results_json(suite: Suite, models: list[ModelOutcome], ratings: dict[str, tuple[int, int]]) -> dict:
    return {
        "suite": {"name": suite.name, "description": suite.description, "source": _source(suite.source)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "models": [
            {
                "label": m.choice.label,
                "name": m.name,
                "summary": m.summary,
                "local": m.local,
                "load_seconds": m.load_seconds,
                "peak_memory_mb": m.peak_memory_mb,
                "tasks": {
                    o.task.name: {
                        "kind": o.task.kind,
                        "about": o.task.about,
                        "seconds": o.seconds,
                        **({"result": o.result} if o.result is not None else {}),
                        **({"skipped": o.skipped} if o.skipped else {}),
                        **({"failed": o.failed} if o.failed else {}),
                    }
                    for o in m.outcomes
                },
            }
            for m in models
        ],
        "ratings": {model: {"up": up, "down": down} for model, (up, down) in sorted(ratings.items())},
    }


def _cell(result: dict[str, Any] | None, key: str, form: str) -> str:
    if (
        result is None
        or result.get(key) is None
        or (isinstance(result[key], float) and math.isnan(result[key]))
    ):
        return "–"
    text = form.format(result[key])
    stderr = STDERR.get(key)
    if stderr and result.get(stderr) is not None and not math.isnan(result[stderr]):
        text += f" ± {result[stderr]:.1%}"
    return text


def _task_names(data: dict) -> list[tuple[str, str, str]]:
    """(name, kind, about) of every task, in suite order."""
    seen: dict[str, tuple[str, str, str]] = {}
    for model in data["models"]:
        for name, task in model["tasks"].items():
            seen.setdefault(name, (name, task["kind"], task.get("about", "")))
    return list(seen.values())


def blocks(data: dict, charts: dict[str, str]) -> list[Block]:
    """The whole report, section by section."""
    models = data["models"]
    box = data["machine"]
    out: list[Block] = [
        ("h1", f"Evaluation: {data['suite']['name']}"),
        ("p", data["suite"]["description"]),
        (
            "p",
            f"{data['created']} · {box['cpu']} ({box['kernels']}), {box['cores']} cores · "
            f"Python {box['python']}, "
            f"torch {box['torch']}, Tertulia {box['tertulia']}",
        ),
        ("table", Table(["model", "runs as", "loaded in"], [
            [m["label"], m["summary"] or m["name"], f"{m['load_seconds']:.1f} s"] for m in models
        ])),
    ]  # fmt: skip
    tasks = _task_names(data)
    out += _quality(models, [t for t in tasks if t[1] in HEADLINES], charts)
    for name, kind, _ in tasks:
        if kind == "speed":
            out += _speed(models, name, charts)
        elif kind == "side_by_side":
            out += _side_by_side(models, name)
    return out + _ratings(data["ratings"]) + _not_measured(models)


def _results(models: list[dict], name: str) -> list[dict[str, Any] | None]:
    return [m["tasks"].get(name, {}).get("result") for m in models]


def _quality(models: list[dict], tasks: list[tuple[str, str, str]], charts: dict[str, str]) -> list[Block]:
    if not tasks:
        return []
    out: list[Block] = [("h2", "Quality")]
    if "quality" in charts:
        out.append(("image", ("quality", charts["quality"])))
    for name, kind, about in tasks:
        out.append(("h3", name))
        if about:
            out.append(("p", about))
        results = _results(models, name)
        rows = [
            [label, *(_cell(r, key, form) for r in results)]
            for key, label, form, _ in HEADLINES[kind]
            if any(r is not None and key in r for r in results)
        ]
        out.append(("table", Table(["", *(m["label"] for m in models)], rows)))
        method = next((r["method"] for r in results if r), None)
        if method:
            out.append(("p", f"Method: {method}."))
    return out


def _speed(models: list[dict], name: str, charts: dict[str, str]) -> list[Block]:
    out: list[Block] = [("h2", "Speed and memory")]
    if "speed" in charts:
        out.append(("image", ("speed", charts["speed"])))
    rows = []
    for m, result in zip(models, _results(models, name), strict=True):
        for level in (result or {}).get("levels", []):
            rows.append([
                m["label"], str(level["streams"]), f"{level['first_token_seconds']:.2f} s",
                _number(level["prefill_tokens_per_second"]), _number(level["decode_tokens_per_second"]),
                _number(level["aggregate_tokens_per_second"]),
                _number(m["peak_memory_mb"], " MB") if level["streams"] == 1 else "",
            ])  # fmt: skip
    headers = ["model", "streams", "first token", "prefill tok/s", "decode tok/s per stream",
               "all streams tok/s", "peak memory"]  # fmt: skip
    out.append(("table", Table(headers, rows)))
    method = next((r["method"] for r in _results(models, name) if r), None)
    if method:
        out.append(("p", f"Method: {method}. Peak memory: the process's resident high-water mark."))
    if len(models) > 1:
        out.append(
            (
                "p",
                "The models ran one after another: on a shared machine part of a difference in speed can "
                "be the machine's. For a paired comparison, the benchmarks interleave peers round by round.",
            )
        )
    return out


def _side_by_side(models: list[dict], name: str) -> list[Block]:
    results = _results(models, name)
    prompts = next((r["prompts"] for r in results if r), [])
    rows = [[p, *((r["answers"][i] if r else "–") for r in results)] for i, p in enumerate(prompts)]
    return [
        ("h2", "Side by side"),
        ("table", Table(["prompt", *(m["label"] for m in models)], rows)),
        ("p", "Answers are greedy (temperature 0), with no system prompt, for people to judge."),
    ]


def _ratings(ratings: dict[str, dict[str, int]]) -> list[Block]:
    if not ratings:
        return []
    rows = [
        [model, str(r["up"]), str(r["down"]), f"{r['up'] / max(1, r['up'] + r['down']):.0%}"]
        for model, r in ratings.items()
    ]
    return [
        ("h2", "Ratings in the chat"),
        ("table", Table(["model", "thumbs up", "thumbs down", "liked"], rows)),
        ("p", "Thumbs given to replies in the web app, over all users, by the model that wrote them."),
    ]


def _not_measured(models: list[dict]) -> list[Block]:
    notes: list[Block] = []
    for m in models:
        for name, task in m["tasks"].items():
            if "skipped" in task:
                notes.append(("p", f"{m['label']}: {name} skipped: {task['skipped']}."))
            elif "failed" in task:
                notes.append(("p", f"{m['label']}: {name} failed: {task['failed']}"))
    return [("h2", "Not measured"), *notes] if notes else []


def _number(value: float | None, unit: str = "") -> str:
    return "–" if value is None else f"{value:,.1f}{unit}"


def markdown(report: list[Block]) -> str:
    lines: list[str] = []
    for kind, content in report:
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + content, ""]
        elif kind == "p" and content:
            lines += [content, ""]
        elif kind == "image":
            name, _ = content
            lines += [f"![{name}]({name}.png)", ""]
        elif kind == "table":

            def row(cells: list[str]) -> str:
                return "| " + " | ".join(c.replace("|", "\\|").replace("\n", "<br>") for c in cells) + " |"

            lines += [row(content.headers), row(["---"] * len(content.headers))]
            lines += [row(r) for r in content.rows] + [""]
    return "\n".join(lines)


# The report's look, shared by the self-contained file (inlined) and the web app (linked: its CSP
# allows no inline style).
STYLESHEET = Path(__file__).parent / "report.css"


def page(report: list[Block], stylesheet: str | None = None, header: str = "") -> str:
    """The report as one HTML document: text escaped, charts embedded as data URIs, no script. With
    `stylesheet` (a URL) the styles are linked rather than inlined; `header` is trusted HTML put first."""
    parts = [header] if header else []
    for kind, content in report:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p" and content:
            parts.append(f"<p>{html.escape(content)}</p>")
        elif kind == "image":
            name, path = content
            encoded = base64.b64encode(Path(path).read_bytes()).decode()
            parts.append(f'<img alt="{name}" src="data:image/png;base64,{encoded}">')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in content.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in content.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    title = html.escape(next((c for k, c in report if k == "h1"), "Evaluation"))
    return document(title, "".join(parts), stylesheet)


def document(title: str, body: str, stylesheet: str | None = None) -> str:
    style = (
        f'<link rel="stylesheet" href="{html.escape(stylesheet)}">'
        if stylesheet
        else f"<style>{STYLESHEET.read_text()}</style>"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
        f"{style}</head><body>{body}</body></html>\n"
    )


def chart_files(directory: Path) -> dict[str, str]:
    """The charts a report directory holds, by name."""
    return {
        name: str(directory / f"{name}.png")
        for name in ("quality", "speed")
        if (directory / f"{name}.png").is_file()
    }


def write_report(
    out: Path, suite: Suite, models: list[ModelOutcome], ratings: dict[str, tuple[int, int]]
) -> Path:
    """Write the report directory `out` (which must not exist yet, or be empty) in one move."""
    data = results_json(suite, models, ratings)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        charts = {}
        if quality_chart(data, partial / "quality.png"):
            charts["quality"] = str(partial / "quality.png")
        if speed_chart(data, partial / "speed.png"):
            charts["speed"] = str(partial / "speed.png")
        report = blocks(data, charts)
        (partial / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        (partial / "report.md").write_text(markdown(report), encoding="utf-8")
        (partial / "report.html").write_text(page(report), encoding="utf-8")
        if out.exists():
            out.rmdir()  # only ever empty here: the caller refuses a directory with files in it
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
