"""What a fine-tune leaves behind: a merged HF-format model directory that `tertulia serve --model DIR`
loads like any other, with a model card (data, hyperparameters, metrics) and a PNG of the loss curves.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tertulia.errors import TertuliaError
from tertulia.train.loop import History

# What a fine-tune writes; --force replaces a directory only when it holds nothing else.
OUTPUT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
    "metrics.json",
    "loss.png",
    "report.md",  # chat tuning (`train sft`) adds the run's report
    "curves.png",
    "checkpoint",
    ".writing",
}
CHECKPOINT_FILES = {
    "state.pt",
    "state.pt.partial",
    "run.json",
    "train.bin",
    "held-out.bin",
    "evaluations.json",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class RunFacts:
    """What the model card reports."""

    base_model: str
    method: str
    train_file: str
    train_examples: int
    validation_examples: int
    train_tokens: int
    trained_tokens_per_epoch: int
    hyperparameters: dict[str, Any]
    processes: int
    command: str


def check_output(
    out: Path, *, force: bool, resume: bool, files: set[str] = OUTPUT_FILES, what: str = "a fine-tune"
) -> None:
    """Refuse to write over anything but a finished or interrupted run of the same kind (with --force)."""
    if resume:
        if not (out / "checkpoint" / "state.pt").exists():
            raise TertuliaError(f"{out} holds no interrupted run to resume.", "Start it without --resume.")
        return
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise TertuliaError(f"{out} exists and is not a directory.")
    ours = (out / "metrics.json").exists() or (out / "checkpoint" / "run.json").exists()
    if not ours:
        raise TertuliaError(
            f"{out} already exists and is not the output of {what}: not replacing it.",
            "Choose another --out.",
        )
    if not force:
        hint = "Pass --force to replace it"
        if (out / "checkpoint" / "state.pt").exists():
            hint += ", or --resume to continue the interrupted run there"
        raise TertuliaError(f"{out} already exists.", hint + ".")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in files | {"checkpoint", ".writing"})
    checkpoint = out / "checkpoint"
    if checkpoint.is_dir():  # replaced whole too: what it holds must be ours as well
        foreign += sorted(
            f"checkpoint/{p.name}" for p in checkpoint.iterdir() if p.name not in CHECKPOINT_FILES
        )
    if foreign:
        raise TertuliaError(
            f"{out} holds files {what} does not write ({', '.join(foreign[:5])}): not replacing it.",
            "Choose another --out.",
        )


def publish(out: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a staging folder inside `out`; its files then move in, each whole (a rename)."""
    staging = out / ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    for file in staging.iterdir():
        file.replace(out / file.name)
    staging.rmdir()


def write_model(
    model: nn.Module, base_dir: Path, chat_template: str, out: Path, facts: RunFacts, history: History
) -> None:
    """Merge the adapter into the weights and write the directory; files appear only once complete."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    publish(out, lambda staging: _write_model(merged, base_dir, chat_template, staging, facts, history))


def _write_model(
    merged: nn.Module, base_dir: Path, chat_template: str, staging: Path, facts: RunFacts, history: History
) -> None:
    merged.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, staging / name)
    (staging / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    metrics = {
        "epochs": history.epochs,
        "train_loss": history.train_loss,
        "tokens": history.tokens,
        "seconds": history.seconds,
    }
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plotted = plot_losses(history, staging / "loss.png")
    (staging / "README.md").write_text(model_card(facts, history, plotted), encoding="utf-8")


def plot_losses(history: History, path: Path) -> bool:
    """Training loss per step and validation loss per epoch; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    if history.train_loss:
        steps, losses = zip(*history.train_loss, strict=True)
        axis.plot(steps, losses, color="#9bb7d4", linewidth=1, label="train loss (step)")
        axis.plot(steps, smooth(list(losses)), color="#1f5fa8", linewidth=2, label="train loss (smoothed)")
    validated = [e for e in history.epochs if "val_loss" in e]
    if validated:
        axis.plot(
            [e["step"] for e in validated],
            [e["val_loss"] for e in validated],
            "o-",
            color="#d1495b",
            linewidth=2,
            label="validation loss (epoch)",
        )
        accuracy = axis.twinx()
        accuracy.plot(
            [e["step"] for e in validated],
            [e["val_accuracy"] for e in validated],
            "s--",
            color="#3a9d5d",
            label="validation token accuracy",
        )
        accuracy.set_ylabel("token accuracy")
        accuracy.set_ylim(0, 1)
        accuracy.legend(loc="center right", fontsize=8)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats per trained token)")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    smoothed, current = [], values[0]
    for value in values:
        current = weight * current + (1 - weight) * value
        smoothed.append(current)
    return smoothed


def model_card(facts: RunFacts, history: History, plotted: bool) -> str:
    rate = history.tokens / history.seconds if history.seconds else 0.0
    lines = [
        "---",
        f"base_model: {facts.base_model}",
        "library_name: tertulia",
        "tags: [fine-tuned, " + facts.method + "]",
        "---",
        "",
        f"# Fine-tuned from {facts.base_model}",
        "",
        f"Trained with `{facts.command}`.",
        "Serve it with `tertulia serve --model DIR` (this directory), or talk to it with "
        "`tertulia chat --model DIR`.",
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| training file | `{facts.train_file}` |",
        f"| training examples | {facts.train_examples} |",
        f"| validation examples | {facts.validation_examples} |",
        f"| tokens per epoch | {facts.train_tokens} "
        f"({facts.trained_tokens_per_epoch} trained on: the assistant's turns) |",
        "",
        "## Hyperparameters",
        "",
        "| | |",
        "|---|---|",
        f"| method | {facts.method} |",
        *(f"| {key} | {value} |" for key, value in facts.hyperparameters.items()),
        f"| processes | {facts.processes} |",
        "",
        "## Metrics",
        "",
        "| epoch | train loss | validation loss | validation token accuracy |",
        "|---|---|---|---|",
    ]
    for epoch in history.epochs:
        val = f"{epoch['val_loss']:.4f}" if "val_loss" in epoch else "—"
        accuracy = f"{epoch['val_accuracy']:.1%}" if "val_accuracy" in epoch else "—"
        best = " (kept)" if epoch.get("best") else ""
        lines.append(f"| {int(epoch['epoch'])}{best} | {epoch['train_loss']:.4f} | {val} | {accuracy} |")
    lines += [
        "",
        f"{history.tokens} tokens in {history.seconds:.0f} s of training: {rate:.0f} tokens/s.",
        "",
    ]
    if plotted:
        lines += ["![loss curves](loss.png)", ""]
    return "\n".join(lines)
