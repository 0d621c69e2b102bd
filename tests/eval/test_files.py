"""Task files and suites in the wrong shape are refused with the line and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tertulia.eval.files import TaskFileError, read_choices, read_conversations, read_documents
from tertulia.eval.suite import DEFAULT_SUITE, SuiteError, load_suite


def write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_documents(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("Some prose.\nMore prose.\n")
    assert read_documents(text) == ["Some prose.\nMore prose.\n"]
    assert read_documents(write(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])) == ["one", "two"]
    with pytest.raises(
        TaskFileError, match=r"line 2: no non-empty 'text' field.*Expected plain text, or JSONL"
    ):
        read_documents(write(tmp_path / "e.jsonl", [{"text": "one"}, {"body": "two"}]))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b"caf\xe9 au lait\n", r"is not UTF-8 text \(line 1, byte 3\)"),
    ],
)
def test_empty_and_misencoded_files(tmp_path: Path, content: bytes, message: str) -> None:
    for name in ("f.txt", "f.jsonl"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(TaskFileError, match=message):
            read_documents(path)


def test_choices(tmp_path: Path) -> None:
    good = {"question": "2+2?", "choices": ["3", "4"], "answer": 1}
    by_text = {"question": "Sky?", "choices": ["blue", "green", "red"], "answer": "blue"}
    items = read_choices(write(tmp_path / "c.jsonl", [good, by_text]))
    assert [i.answer for i in items] == [1, 0] and items[1].choices == ("blue", "green", "red")
    bad = [
        good,
        {"question": "", "choices": ["a", "b"], "answer": 0},
        {"question": "q", "choices": ["only"], "answer": 0},
        {"question": "q", "choices": ["a", "b"], "answer": 2},
        {"question": "q", "choices": ["a", "b"], "answer": True},
        "not json",
    ]
    with pytest.raises(TaskFileError) as refused:
        read_choices(write(tmp_path / "bad.jsonl", bad))
    message = str(refused.value)
    for expected in (
        "line 2: no non-empty 'question'",
        "line 3: 'choices' must list at least two",
        "line 4: 'answer' must be an index 0..1",
        "line 5: 'answer' must be",
        "line 6: Not valid JSON",
    ):
        assert expected in message
    assert '"question"' in refused.value.hint and '"answer"' in refused.value.hint


def test_reference_conversations_end_with_the_assistant(tmp_path: Path) -> None:
    turn = {"role": "user", "content": "Hi"}
    answer = {"role": "assistant", "content": "Hello"}
    path = write(tmp_path / "r.jsonl", [{"messages": [turn, answer]}, {"messages": [turn, answer, turn]}])
    assert len(read_conversations(path)) == 2
    with pytest.raises(TaskFileError, match="line 2: the last message is not the assistant's"):
        read_conversations(path, reference=True)
    with pytest.raises(TaskFileError, match="line 1: .*role 'robot'"):
        read_conversations(write(tmp_path / "x.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}]))


def test_default_suite_loads_and_its_files_read() -> None:
    from tertulia.eval.run import task_data

    suite = load_suite()
    assert suite.source == DEFAULT_SUITE
    kinds = {t.kind for t in suite.tasks}
    assert kinds == {"perplexity", "multiple_choice", "references", "speed", "side_by_side"}
    for task in suite.tasks:
        task_data(task)
    choices = next(t for t in suite.tasks if t.kind == "multiple_choice")
    assert len(task_data(choices)) == 260


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("tasks: []", "has no tasks"),
        ("tasks: [{kind: poetry}]", "task 1: unknown kind 'poetry'"),
        ("tasks: [{kind: speed, streams: [1, 0]}]", "'streams' must list positive whole numbers"),
        ("tasks: [{kind: speed, rounds: true}]", "'rounds' must be a whole number"),
        ("tasks: [{kind: perplexity}]", "needs 'file'"),
        ("tasks: [{kind: perplexity, file: nowhere.txt}]", "No file"),
        ("tasks: [{kind: perplexity, file: 'builtin:nothing.txt'}]", "No built-in set"),
        ("tasks: [{kind: references, file: 'builtin:trivia-qa.jsonl', temperature: 1}]", "unknown key"),
        ("tasks: [{kind: speed}, {kind: speed}]", "several tasks 'speed'"),
        ("tasks: [unclosed", "not valid YAML"),
    ],
)
def test_bad_suites(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "suite.yaml"
    path.write_text(body)
    with pytest.raises(SuiteError, match=message):
        load_suite(path)


def test_a_missing_library_says_how_to_install_it() -> None:
    from tertulia.eval.suite import require

    require("json")
    with pytest.raises(SuiteError, match="no_such_library_xyz, which is not installed") as refused:
        require("json", "no_such_library_xyz")
    assert "pip install 'tertulia[eval]'" in refused.value.hint
