"""The report's charts (matplotlib, drawn off screen): one headline number per quality task, and speed.

Each returns False when there is nothing to draw, so the report leaves the chart out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The number a chart shows for each kind of task, and how it is read.
HEADLINE = {
    "perplexity": ("bits_per_byte", "bits per byte (lower is better)"),
    "multiple_choice": ("acc_norm", "acc_norm (higher is better)"),
    "references": ("chrf", "chrF (higher is better)"),
}
COLOURS = ["#2f6fde", "#e8873a", "#3a9e5c", "#b04fc4", "#c9423a", "#6b7785"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(axis: Any, labels: list[str], values: list[float | None], title: str) -> None:
    shown = [v if v is not None else 0.0 for v in values]
    bars = axis.bar(range(len(labels)), shown, color=COLOURS[: len(labels)] * (1 + len(labels) // 6))
    for bar, value in zip(bars, values, strict=True):
        text = "n/a" if value is None else f"{value:.3g}"
        axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)  # fmt: skip
    axis.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    axis.set_title(title, fontsize=9)
    axis.spines[["top", "right"]].set_visible(False)


def quality_chart(data: dict[str, Any], path: Path) -> bool:
    models = data["models"]
    labels = [m["label"] for m in models]
    panels = []
    for name in dict.fromkeys(n for m in models for n in m["tasks"]):
        kind = next(m["tasks"][name]["kind"] for m in models if name in m["tasks"])
        if kind not in HEADLINE:
            continue
        key, reading = HEADLINE[kind]
        values = [(m["tasks"].get(name, {}).get("result") or {}).get(key) for m in models]
        if any(v is not None for v in values):
            panels.append((f"{name}\n{reading}", values))
    if not panels:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for axis, (title, values) in zip(axes[0], panels, strict=True):
        _bars(axis, labels, values, title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def speed_chart(data: dict[str, Any], path: Path) -> bool:
    models = data["models"]
    series = []
    for m in models:
        for task in m["tasks"].values():
            if task["kind"] == "speed" and task.get("result"):
                series.append((m["label"], task["result"]["levels"]))
    if not series:
        return False
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    streams = sorted({level["streams"] for _, levels in series for level in levels})
    width = 0.8 / len(series)
    for i, (label, levels) in enumerate(series):
        by_streams = {level["streams"]: level for level in levels}
        xs = [s + (i - (len(series) - 1) / 2) * width for s in range(len(streams))]
        colour = COLOURS[i % len(COLOURS)]
        left.bar(xs, [by_streams.get(s, {}).get("aggregate_tokens_per_second") or 0 for s in streams],
                 width, label=label, color=colour)  # fmt: skip
        right.bar(xs, [by_streams.get(s, {}).get("first_token_seconds") or 0 for s in streams],
                  width, label=label, color=colour)  # fmt: skip
    for axis, title in ((left, "tokens/s, all streams (higher is better)"),
                        (right, "time to first token, s (lower is better)")):  # fmt: skip
        axis.set_xticks(range(len(streams)), [f"{s} stream{'s' if s > 1 else ''}" for s in streams])
        axis.set_title(title, fontsize=9)
        axis.spines[["top", "right"]].set_visible(False)
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
