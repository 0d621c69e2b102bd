"""Evaluation task files, read and checked before any model is asked anything.

Three shapes: documents (a text file is one document; JSONL takes each line's `text`), chat
conversations (the fine-tuning format, read by `train.data`), and multiple-choice items
(`{"question", "choices", "answer"}`). A file in the wrong shape is refused with the offending line and
what was expected; an empty file or one that is not UTF-8 gets one line saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tertulia.errors import TertuliaError
from tertulia.train.data import Problem, json_lines, validate

Message = dict[str, Any]
SHOWN_PROBLEMS = 5


class TaskFileError(TertuliaError):
    """A task file that cannot be evaluated on, with where and why."""


def _raw(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskFileError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    if not raw.strip():
        raise TaskFileError(f"{path} is empty.")
    return raw


def _text(path: Path, raw: bytes | None = None) -> str:
    raw = _raw(path) if raw is None else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TaskFileError(
            f"{path} is not UTF-8 text (line {line}, byte {exc.start}).", "Convert it to UTF-8 first."
        ) from None


def _refuse(path: Path, problems: list[Problem], expected: str) -> TaskFileError:
    problems = sorted(problems, key=lambda p: p.line)
    shown = "; ".join(f"line {p.line}: {p.message}" for p in problems[:SHOWN_PROBLEMS])
    more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
    return TaskFileError(f"{path}: {shown}{more}", f"Expected {expected}.")


def _records(path: Path, expected: str) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Each line's JSON value with its number, and the lines that are not JSON (all reported together
    with the caller's own findings, so a file is fixed in one pass)."""
    raw = _raw(path)
    _text(path, raw)  # the encoding, checked once for the whole file
    records: list[tuple[int, Any]] = []
    problems: list[Problem] = []
    for number, record in json_lines(raw):
        if isinstance(record, Problem):
            problems.append(record)
        else:
            records.append((number, record))
    if not records and not problems:
        raise TaskFileError(f"{path} has no records.", f"Expected {expected}.")
    return records, problems


DOCUMENTS = 'plain text, or JSONL with one {"text": "..."} per line'


def read_documents(path: Path) -> list[str]:
    """A text file as one document, or each JSONL line's `text`."""
    if path.suffix.lower() != ".jsonl":
        return [_text(path)]
    documents: list[str] = []
    records, problems = _records(path, DOCUMENTS)
    for number, record in records:
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(Problem(number, "no_text", "no non-empty 'text' field"))
        else:
            documents.append(text)
    if problems:
        raise _refuse(path, problems, DOCUMENTS)
    return documents


CONVERSATIONS = 'chat JSONL: one {"messages": [{"role", "content"}, ...]} per line'
REFERENCES = CONVERSATIONS + ", the last message the assistant's reference answer"


def read_conversations(path: Path, *, reference: bool = False) -> list[list[Message]]:
    """Chat examples (or prompt/completion pairs); with `reference`, each must end with an assistant
    turn, the answer the model's is compared with."""
    _text(path)
    expected = REFERENCES if reference else CONVERSATIONS
    report = validate(path)
    problems = list(report.errors)
    if reference:
        problems += [
            Problem(e.line, "no_reference", "the last message is not the assistant's")
            for e in report.examples
            if e.messages[-1]["role"] != "assistant"
        ]
    if problems:
        raise _refuse(path, problems, expected)
    if not report.examples:
        raise TaskFileError(f"{path} has no conversations.", f"Expected {expected}.")
    return [example.messages for example in report.examples]


CHOICES = 'JSONL: one {"question": "...", "choices": ["...", ...], "answer": index or choice text} per line'


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def _choice_item(number: int, record: Any) -> ChoiceItem | Problem:
    if not isinstance(record, dict):
        return Problem(number, "not_object", "not a JSON object")
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        return Problem(number, "no_question", "no non-empty 'question'")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        return Problem(number, "bad_choices", "'choices' must list at least two non-empty texts")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return Problem(
            number, "bad_answer", f"'answer' must be an index 0..{len(choices) - 1} or one of the choices"
        )
    return ChoiceItem(question, tuple(choices), answer)


def read_choices(path: Path) -> list[ChoiceItem]:
    items: list[ChoiceItem] = []
    records, problems = _records(path, CHOICES)
    for number, record in records:
        item = _choice_item(number, record)
        if isinstance(item, Problem):
            problems.append(item)
        else:
            items.append(item)
    if problems:
        raise _refuse(path, problems, CHOICES)
    return items
