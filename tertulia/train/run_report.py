"""`report.md` of a from-scratch run: what ran where, on what, for how long, and what came of it.

A model trained in stages (pretraining, then chat tuning) carries every stage: each stage's facts are
kept in the directory's `metrics.json`, and the next stage's report starts from the base model's.
This module formats; it does not train, and it reads no model.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tertulia.train.loop import History
from tertulia.train.output import smooth

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


@dataclass
class Stage:
    name: str
    command: str
    data: dict[str, Any]
    model: dict[str, Any]
    hyperparameters: dict[str, Any]
    history: History
    flops_per_token: int | None
    wall_seconds: float
    metrics: dict[str, Any]
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.history.tokens / self.history.seconds if self.history.seconds else 0.0

    @property
    def flops(self) -> float | None:
        return self.flops_per_token * self.history.tokens if self.flops_per_token else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        return cls(**(data | {"history": History(**data["history"])}))


def environment() -> dict[str, str]:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    have = [f for f in CPU_FLAGS if f in flags]
    return {
        "CPU": f"{cpu}, {cores} cores" + (f" ({', '.join(have)})" if have else ""),
        "PyTorch": f"{torch.__version__}, {torch.get_num_threads()} threads",
        "Python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def stages_of(directory: Path) -> list[Stage]:
    """The stages recorded in a model directory trained here (none for any other model)."""
    try:
        data = json.loads((directory / "metrics.json").read_text())
        return [Stage.from_dict(s) for s in data.get("stages", [])]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def write_report(out: Path, stages: list[Stage], env: dict[str, str], curves: bool) -> None:
    """report.md, and the stages added to metrics.json (kept beside what the stage wrote there)."""
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    metrics |= {"environment": env, "stages": [s.as_dict() for s in stages]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "report.md").write_text(report(stages, env, curves), encoding="utf-8")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: dict[str, Any]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {key} | {_value(value)} |" for key, value in rows.items()), ""]


def report(stages: list[Stage], env: dict[str, str], curves: bool) -> str:
    lines = ["# Training report", "", "## Environment", "", *_table(env)]
    lines += [
        "## Stages",
        "",
        "| stage | tokens seen | training time | wall time | tokens/s | estimated FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for stage in stages:
        flops = f"{stage.flops:.2e}" if stage.flops else "—"
        lines.append(
            f"| {stage.name} | {stage.history.tokens:,} | {_duration(stage.history.seconds)} | "
            f"{_duration(stage.wall_seconds)} | {stage.tokens_per_second:,.0f} | {flops} |"
        )
    lines.append("")
    if curves:
        lines += ["![training curves](curves.png)", ""]
    for stage in stages:
        lines += [f"## {stage.name.capitalize()}", "", f"`{stage.command}`", ""]
        lines += ["### Data", "", *_table(stage.data)]
        if stage.model:
            lines += ["### Model", "", *_table(stage.model)]
        lines += ["### Hyperparameters", "", *_table(stage.hyperparameters)]
        lines += ["### Metrics", "", *_table(stage.metrics)]
        sampled = [e for e in stage.evaluations if e.get("samples")]
        if sampled:
            lines += ["### Samples", ""]
            for evaluation in (
                (sampled[0], sampled[len(sampled) // 2], sampled[-1]) if len(sampled) > 2 else sampled
            ):
                lines.append(
                    f"After {evaluation['tokens']:,} tokens (step {evaluation['step']}, "
                    f"{evaluation['bits_per_byte']:.3f} bits per byte):"
                )
                lines.append("")
                lines += [f"> {' '.join(sample.split())}" + "\n" for sample in evaluation["samples"]]
    return "\n".join(lines)


def plot_curves(history: History, evaluations: list[dict[str, Any]], path: Path) -> bool:
    """Training loss per step and validation bits per byte; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=120)
    if history.train_loss:
        steps, losses = zip(*history.train_loss, strict=True)
        loss_axis.plot(steps, losses, color="#9bb7d4", linewidth=1, label="train loss")
        loss_axis.plot(
            steps, smooth(list(losses)), color="#1f5fa8", linewidth=2, label="train loss (smoothed)"
        )
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss (nats per token)")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend(loc="upper right", fontsize=8)
    if evaluations:
        bpb_axis = loss_axis.twinx()
        bpb_axis.plot(
            [e["step"] for e in evaluations],
            [e["bits_per_byte"] for e in evaluations],
            "o-",
            color="#d1495b",
            label="held-out bits per byte",
        )
        bpb_axis.set_ylabel("bits per byte")
        bpb_axis.legend(loc="center right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
