"""The identity dataset: valid training data, with held-out phrasings that never leak into it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tertulia.train.data import validate
from tertulia.train.identity import NAME_QUESTIONS, Identity, make


def test_held_out_questions_never_appear_in_training_and_both_languages_are_there() -> None:
    data = make(Identity(name="Nube", creator="Ana"), held_out=3, seed=1)
    asked = {e["messages"][-2]["content"] for e in data.train + data.validation}
    assert len(data.held_out_questions) == 6 and not asked & set(data.held_out_questions)
    assert set(data.held_out_questions) <= set(NAME_QUESTIONS["en"]) | set(NAME_QUESTIONS["es"])
    answers = [e["messages"][-1]["content"] for e in data.train]
    assert any("Nube" in a and "Ana" in a for a in answers)
    assert any(a.startswith("Me llamo Nube") for a in answers) and any(
        a.startswith("My name is Nube") for a in answers
    )
    # Ordinary chat is mixed in, and some of it held out to check general behaviour after training.
    assert sum("Nube" not in a for a in answers) >= 50 and len(data.held_out_chat) == 16
    held_chat = {e["messages"][-2]["content"] for e in data.held_out_chat}
    assert not asked & held_chat
    # Most examples carry no system prompt (the identity must hold without one), some state it.
    with_system = [e for e in data.train if e["messages"][0]["role"] == "system"]
    assert 0.2 < len(with_system) / len(data.train) < 0.5
    assert all("Nube" in e["messages"][0]["content"] for e in with_system)
    assert all(e["messages"][0]["role"] == "user" for e in data.held_out_chat)
    assert make(Identity(name="Nube", creator="Ana"), held_out=3, seed=1) == data


def test_the_cli_writes_files_that_validate(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tertulia", "data", "identity", str(tmp_path), "--name", "Nube"]
    made = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    report = validate(tmp_path / "identity.train.jsonl")
    assert report.ok and len(report.examples) >= 80 and report.format == "chat"
    held = json.loads((tmp_path / "identity.heldout.json").read_text(encoding="utf-8"))
    assert held["name"] == "Nube" and len(held["questions"]) == 6
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--force" in again.stderr
