"""A suite run on several models writes a whole report directory; a remote model skips what it cannot
do (scoring) and runs the rest; a model that does not load leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tertulia.errors import TertuliaError
from tertulia.eval.report import write_report
from tertulia.eval.run import ModelChoice, Silent, run_suite
from tertulia.eval.suite import load_suite

SUITE = """
name: tiny
description: A small suite for tests.
tasks:
  - {{kind: perplexity, name: prose, file: {data}/genesis.txt, window: 64}}
  - {{kind: multiple_choice, name: trivia, file: 'builtin:trivia-choice.jsonl', limit: 6}}
  - {{kind: references, name: answers, file: 'builtin:trivia-qa.jsonl', limit: 4, max_tokens: 6}}
  - {{kind: speed, streams: [1, 2], prompt_tokens: 24, max_tokens: 4, rounds: 1}}
  - {{kind: side_by_side, prompts: ["Hi", "Name a colour"], max_tokens: 6}}
"""


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    from tertulia.eval.suite import DATA

    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.format(data=DATA))
    return path


def test_model_choice_precision_suffix() -> None:
    assert ModelChoice.parse("smollm2-135m@int4") == ModelChoice("smollm2-135m", "int4")
    assert ModelChoice.parse("remote:gpt@http://h:1/v1") == ModelChoice("remote:gpt@http://h:1/v1", "auto")
    assert ModelChoice.parse("./dir", "none").label == "./dir@none"


def test_two_models_one_report(tiny_hf_dir: Path, suite_file: Path, tmp_path: Path) -> None:
    suite = load_suite(suite_file)
    choices = [ModelChoice(str(tiny_hf_dir), "none"), ModelChoice(str(tiny_hf_dir), "int8")]
    outcomes = asyncio.run(run_suite(choices, suite, Silent()))
    out = write_report(tmp_path / "report", suite, outcomes, {"smollm2-135m": (3, 1)})
    assert sorted(p.name for p in out.iterdir()) == [
        "quality.png", "report.html", "report.md", "results.json", "speed.png",
    ]  # fmt: skip
    assert not list(tmp_path.glob(".*partial"))
    data = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in data["models"]] == [c.label for c in choices]
    for model in data["models"]:
        tasks = model["tasks"]
        assert set(tasks) == {"prose", "trivia", "answers", "speed", "side_by_side"}
        assert all("result" in t for t in tasks.values()), tasks
        assert tasks["prose"]["result"]["tokens"] > 64 and tasks["trivia"]["result"]["items"] == 6
        assert len(tasks["answers"]["result"]["records"]) == 4
        assert [level["streams"] for level in tasks["speed"]["result"]["levels"]] == [1, 2]
        assert model["peak_memory_mb"] > 0
    markdown = (out / "report.md").read_text()
    for heading in (
        "## Quality",
        "### prose",
        "## Speed and memory",
        "## Side by side",
        "## Ratings in the chat",
    ):
        assert heading in markdown
    assert "| smollm2-135m | 3 | 1 | 75% |" in markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<script" not in page


def test_remote_model_skips_scoring_and_runs_the_rest(live_server, suite_file: Path) -> None:
    suite = load_suite(suite_file)
    remote = ModelChoice(f"remote:smollm2-135m@{live_server.base_url}")
    (outcome,) = asyncio.run(run_suite([remote], suite, Silent()))
    by_kind = {o.task.kind: o for o in outcome.outcomes}
    for kind in ("perplexity", "multiple_choice"):
        assert by_kind[kind].result is None and "cannot score texts" in by_kind[kind].skipped
    for kind in ("references", "speed", "side_by_side"):
        assert by_kind[kind].result is not None and by_kind[kind].failed is None, by_kind[kind]
    assert outcome.peak_memory_mb is None  # not this process's memory


def test_a_model_that_does_not_load_writes_nothing(
    tiny_hf_dir: Path, suite_file: Path, tmp_path: Path
) -> None:
    suite = load_suite(suite_file)
    with pytest.raises(TertuliaError, match="No model"):
        asyncio.run(run_suite([ModelChoice(str(tiny_hf_dir)), ModelChoice("no-such-model")], suite, Silent()))
    assert list(tmp_path.iterdir()) == [suite_file]
