"""Training-data checks: every problem found with its line number, through the CLI and the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tertulia.models import registry
from tertulia.train.data import split, validate


def chat(user: str, answer: str, system: str | None = "You are Luna.") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }


GOOD = [chat(f"Question number {i}?", f"Answer number {i}.") for i in range(12)]

# One line per error kind, and the kind each must be reported as.
BAD = [
    ('{"messages": [', "bad_json"),
    ("[1, 2, 3]", "not_object"),
    ('{"conversation": []}', "missing_messages"),
    (
        json.dumps(
            {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}
        ),
        "unknown_role",
    ),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi", "mood": 1},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ),
        "unknown_key",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]}),
        "empty_content",
    ),
    (
        json.dumps(
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "only a question"}]}
        ),
        "no_assistant",
    ),
    (json.dumps(chat("Tell me everything. " * 3000, "ok")), "too_long"),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 2},
                ]
            }
        ),
        "bad_weight",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
        "bad_content",
    ),
    (json.dumps({"prompt": "a completion line", "completion": "in a chat file"}), "mixed_formats"),
]


@pytest.fixture(scope="module")
def text_side(embedded_dir):
    return registry.load_text_side("smollm2-135m")


def write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_kind_of_error_is_found_on_its_line(tmp_path: Path, text_side) -> None:
    lines = [json.dumps(r) for r in GOOD] + [line for line, _ in BAD]
    report = validate(write(tmp_path, lines), text_side.count_chat, text_side.context)
    found = {(p.line, p.kind) for p in report.errors}
    expected = {(len(GOOD) + i + 1, kind) for i, (_, kind) in enumerate(BAD)}
    assert expected <= found, sorted(expected - found)
    assert {p.line for p in report.errors} == {line for line, _ in expected}  # nothing else flagged
    assert len(report.examples) == len(GOOD) and report.format == "chat" and not report.ok
    assert all(e.tokens and e.tokens < 100 for e in report.examples)


def test_repeated_examples_are_kept_with_a_warning_or_dropped_with_dedupe(tmp_path: Path, text_side) -> None:
    lines = [json.dumps(r) for r in GOOD] + [json.dumps(GOOD[0])] * 2
    path = write(tmp_path, lines)
    kept = validate(path, text_side.count_chat, text_side.context)
    assert kept.ok and len(kept.examples) == len(GOOD) + 2
    repeats = [p for p in kept.warnings if p.kind == "duplicate"]
    assert [p.line for p in repeats] == [len(GOOD) + 1, len(GOOD) + 2]
    assert all("line 1" in p.message and "--dedupe" in p.message for p in repeats)
    dropped = validate(path, text_side.count_chat, text_side.context, dedupe=True)
    assert dropped.ok and len(dropped.examples) == len(GOOD)
    assert [p.kind for p in dropped.warnings].count("duplicate") == 2


def test_warnings_for_missing_system_prompts_and_too_few_examples(tmp_path: Path, text_side) -> None:
    lines = [json.dumps(chat(f"q{i}", f"a{i}", system=None)) for i in range(3)]
    report = validate(write(tmp_path, lines), text_side.count_chat, text_side.context)
    assert report.ok
    assert [p.kind for p in report.warnings] == ["few_examples", "no_system", "no_system", "no_system"]
    assert report.warnings[0].line == 0 and "at least 10" in report.warnings[0].message


def test_prompt_completion_files_and_assistant_weights(tmp_path: Path, text_side) -> None:
    lines = [json.dumps({"prompt": f"Say {i}", "completion": f"{i}!"}) for i in range(12)]
    report = validate(write(tmp_path, lines), text_side.count_chat, text_side.context)
    assert report.ok and report.format == "completion" and len(report.examples) == 12
    assert report.examples[0].messages == [
        {"role": "user", "content": "Say 0"},
        {"role": "assistant", "content": "0!"},
    ]
    weighted = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "user", "content": "better"},
            {"role": "assistant", "content": "final", "weight": 1},
        ]
    }
    only_zero = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]
    }
    report = validate(write(tmp_path, [json.dumps(weighted), json.dumps(only_zero)]))
    assert report.examples[0].trained_turns == 1
    assert [(p.line, p.kind) for p in report.errors] == [(2, "no_assistant")]


def test_split_is_seeded_keeps_records_and_holds_at_least_one(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(20)]
    report = validate(write(tmp_path, lines))
    train, held = split(report, 0.1, seed=3)
    assert len(train) == 18 and len(held) == 2
    assert sorted(map(json.dumps, train + held)) == sorted(lines)  # as written, each once
    assert split(report, 0.1, seed=3) == (train, held)
    assert split(report, 0.1, seed=4) != (train, held)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tertulia", "data", *args], capture_output=True, text=True, timeout=120
    )


def test_the_cli_reports_line_numbers_and_fails_on_errors(tmp_path: Path, embedded_dir) -> None:
    bad = write(tmp_path, [json.dumps(r) for r in GOOD] + [line for line, _ in BAD])
    result = run_cli("validate", str(bad))
    assert result.returncode == 1
    for i, (_, kind) in enumerate(BAD):
        assert kind in result.stdout and str(len(GOOD) + i + 1) in result.stdout
    assert f"{len(BAD)} error(s)" in result.stdout
    good = write(tmp_path, [json.dumps(r) for r in GOOD], "good.jsonl")
    result = run_cli("validate", str(good))
    assert result.returncode == 0 and "Ready to train." in result.stdout
    refused = run_cli("split", str(bad))
    assert refused.returncode == 1 and "error: " in refused.stderr and "data validate" in refused.stderr
    made = run_cli("split", str(good), "--validation", "0.25")
    assert made.returncode == 0, made.stderr
    assert len((tmp_path / "good.train.jsonl").read_text().splitlines()) == 9
    assert len((tmp_path / "good.validation.jsonl").read_text().splitlines()) == 3
    again = run_cli("split", str(good))
    assert again.returncode == 1 and "--force" in again.stderr
    missing = run_cli("validate", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: Cannot read")


def test_stats_count_roles_and_lengths_and_draw_a_histogram(tmp_path: Path, text_side) -> None:
    from tertulia.train.data import Stats

    lines = [json.dumps(chat("Question " * (i % 7 + 1), "Answer " * (i + 1))) for i in range(20)]
    path = write(tmp_path, lines)
    report = validate(path, text_side.count_chat, text_side.context)
    stats = Stats.of(report)
    assert stats.examples == 20 and stats.turns == {"system": 20, "user": 20, "assistant": 20}
    assert stats.tokens == sorted(text_side.count_chat(e.messages) for e in report.examples)
    assert sum(count for _, _, count in stats.histogram()) == 20
    assert stats.percentile(0.5) <= stats.percentile(0.95) <= stats.tokens[-1]
    plot = tmp_path / "lengths.png"
    result = run_cli("stats", str(path), "--epochs", "2", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "20 examples" in result.stdout and f"{stats.total_tokens * 2:,}" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
