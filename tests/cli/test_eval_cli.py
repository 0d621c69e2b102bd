"""`tertulia eval` as a user runs it: real processes; a tiny model where the numbers do not matter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tertulia.eval.suite import DATA
from tests.cli.test_chat_cli import tertulia

pytestmark = pytest.mark.slow


def test_perplexity_json(tiny_hf_dir: Path) -> None:
    result = tertulia(
        "eval", "perplexity", str(DATA / "genesis.txt"), "-m", str(tiny_hf_dir), "-q", "none",
        "--window", "64", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in (
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
        "token_perplexity",
        "tokens",
        "method",
    ):
        assert key in data
    assert (
        data["bytes"] == len((DATA / "genesis.txt").read_bytes()) and "windows of 64 tokens" in data["method"]
    )


def test_assistant_only_and_choice_tables(tiny_hf_dir: Path) -> None:
    chat = tertulia(
        "eval", "perplexity", str(DATA / "everyday-chat.jsonl"), "--assistant-only", "-m", str(tiny_hf_dir)
    )
    assert chat.returncode == 0, chat.stderr
    assert "word perplexity" in chat.stdout and "assistant reply" in chat.stdout
    choice = tertulia("eval", "multiple-choice", str(DATA / "trivia-choice.jsonl"), "--limit", "8", "-m",
                      str(tiny_hf_dir))  # fmt: skip
    assert choice.returncode == 0, choice.stderr
    assert "acc_norm" in choice.stdout and "random choice" in choice.stdout and "25.0%" in choice.stdout


def test_references_save_answers(tiny_hf_dir: Path, tmp_path: Path) -> None:
    saved = tmp_path / "answers.jsonl"
    result = tertulia(
        "eval", "references", str(DATA / "trivia-qa.jsonl"), "--limit", "3", "--max-tokens", "5",
        "--save-answers", str(saved), "-m", str(tiny_hf_dir), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["answers"] == 3 and {"bleu", "chrf", "rougeL", "exact_match"} <= set(scores)
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["reference"] for r in records] == [
        "Richard Nixon",
        "1963",
        "The Soviet Union and the United States",
    ]
    assert all(isinstance(r["answer"], str) and r["messages"][-1]["role"] == "user" for r in records)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["perplexity", "{empty}"], "is empty"),
        (["perplexity", "{latin1}"], "is not UTF-8 text (line 1"),
        (["multiple-choice", "{wrong}"], "line 1: no non-empty 'question'"),
        (["references", "{wrong}"], "line 1: No 'messages'"),
        (["perplexity", "{good}", "-m", "no-such-model"], "No model 'no-such-model'"),
        (["perplexity", "{good}", "-q", "int3"], "int3"),
        (["--suite", "{wrong}"], "has no tasks"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], fragment: str, tmp_path: Path) -> None:
    files = {
        "empty": tmp_path / "empty.txt",
        "latin1": tmp_path / "latin1.txt",
        "wrong": tmp_path / "wrong.jsonl",
        "good": tmp_path / "good.txt",
    }
    files["empty"].write_text("")
    files["latin1"].write_bytes(b"ni\xf1o\n")
    files["wrong"].write_text('{"text": "a document, not a task"}\n')
    files["good"].write_text("Some text.\n")
    result = tertulia("eval", *[a.format(**files) for a in args])
    assert result.returncode != 0
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_suite_report_and_refusal_to_overwrite(tiny_hf_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: cli\ntasks:\n"
        "  - {kind: multiple_choice, file: 'builtin:trivia-choice.jsonl', limit: 4}\n"
        "  - {kind: side_by_side, prompts: [Hello], max_tokens: 4}\n"
    )
    out = tmp_path / "report"
    result = tertulia("eval", "-m", f"{tiny_hf_dir}@none", "-c", f"{tiny_hf_dir}@int8", "--suite", str(suite),
                      "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"Report: {out / 'report.md'}" in result.stdout
    assert {"report.md", "report.html", "results.json", "quality.png"} <= {p.name for p in out.iterdir()}
    again = tertulia("eval", "-m", str(tiny_hf_dir), "--suite", str(suite), "--out", str(out))
    assert again.returncode == 1 and "exists and is not empty" in again.stderr


def test_speed_and_side_by_side(tiny_hf_dir: Path) -> None:
    speed = tertulia("eval", "speed", "-m", str(tiny_hf_dir), "--streams", "1", "--streams", "2",
                     "--prompt-tokens", "16", "--max-tokens", "4", "--rounds", "1", "--json")  # fmt: skip
    assert speed.returncode == 0, speed.stderr
    result = json.loads(speed.stdout)
    assert [level["streams"] for level in result["levels"]] == [1, 2]
    assert all(level["completion_tokens"] == 4 for level in result["levels"])
    assert result["levels"][0]["prefill_tokens_per_second"] > 0 and result["peak_memory_mb"] > 0
    table = tertulia("eval", "side-by-side", "Name a colour", "Say hi", "-m", f"{tiny_hf_dir}@none", "-m",
                     f"{tiny_hf_dir}@int8", "--max-tokens", "3")  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "Name a colour" in table.stdout and "Say hi" in table.stdout
    assert table.stdout.splitlines()[1].count("┃") == 4  # the prompt and one column per model
