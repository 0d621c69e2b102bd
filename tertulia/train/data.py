"""Training data in OpenAI's fine-tuning formats, read and checked before any training starts.

Two formats, one per file: chat (`{"messages": [{"role", "content"[, "weight"]}...]}`, where `weight`
0 or 1 on an assistant turn says whether to learn from it) and prompt/completion
(`{"prompt": ..., "completion": ...}`, read as one user turn and one assistant turn). Every problem is
reported with its line number, all of them at once, so a file is fixed in one pass.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tertulia.errors import TertuliaError

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "weight", "name"}
CHAT_KEYS = {"messages"}
COMPLETION_KEYS = {"prompt", "completion"}
MIN_EXAMPLES = 10  # OpenAI's own minimum for a fine-tuning file
GOOD_EXAMPLES = 50  # where a small model starts to pick up a style reliably

Message = dict[str, Any]
Severity = Literal["error", "warning"]


@dataclass
class Problem:
    line: int  # 1-based; 0 for the file as a whole
    kind: str
    message: str
    severity: Severity = "error"


@dataclass
class Example:
    line: int
    messages: list[Message]  # prompt/completion records read as a user and an assistant turn
    record: dict[str, Any]  # the line as written, kept by `split`
    tokens: int | None = None

    @property
    def trained_turns(self) -> int:
        """Assistant turns the loss is computed on (weight 1, the default)."""
        return sum(1 for m in self.messages if m["role"] == "assistant" and m.get("weight", 1))


@dataclass
class Report:
    path: Path
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    format: str | None = None  # "chat" or "completion"

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def _message_problems(line: int, messages: Any) -> list[Problem]:
    if not isinstance(messages, list) or not messages:
        return [Problem(line, "missing_messages", "'messages' must be a non-empty list of messages.")]
    problems = []
    for i, message in enumerate(messages, 1):
        where = f"message {i}"
        if not isinstance(message, dict):
            problems.append(Problem(line, "bad_message", f"{where} is not an object."))
            continue
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            keys = ", ".join(repr(k) for k in unknown)
            problems.append(Problem(line, "unknown_key", f"{where} has unknown key(s) {keys}."))
        role = message.get("role")
        if role not in ROLES:
            problems.append(
                Problem(line, "unknown_role", f"{where} has role {role!r}; use one of {', '.join(ROLES)}.")
            )
        content = message.get("content")
        if not isinstance(content, str):
            problems.append(Problem(line, "bad_content", f"{where}: 'content' must be text."))
        elif not content.strip():
            problems.append(Problem(line, "empty_content", f"{where} ({role}) has empty content."))
        if "weight" in message:
            if role != "assistant":
                problems.append(Problem(line, "bad_weight", f"{where}: only assistant turns take a weight."))
            elif message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                problems.append(Problem(line, "bad_weight", f"{where}: 'weight' must be 0 or 1."))
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        problems.append(Problem(line, "no_assistant", "No assistant turn: there is nothing to learn."))
    elif not any(
        isinstance(m, dict) and m.get("role") == "assistant" and m.get("weight", 1) for m in messages
    ):
        problems.append(Problem(line, "no_assistant", "Every assistant turn has weight 0: nothing to learn."))
    return problems


def _parse(line: int, record: Any) -> tuple[str | None, list[Message] | None, list[Problem]]:
    """One line's record: its format, its messages (None when unusable) and its problems."""
    if not isinstance(record, dict):
        return None, None, [Problem(line, "not_object", "Each line must be a JSON object.")]
    if "messages" in record:
        unknown = sorted(set(record) - CHAT_KEYS)
        problems = (
            [Problem(line, "unknown_key", f"Unknown key(s) {', '.join(map(repr, unknown))}.")]
            if unknown
            else []
        )
        problems += _message_problems(line, record["messages"])
        return "chat", (record["messages"] if not problems else None), problems
    if "prompt" in record or "completion" in record:
        problems = []
        unknown = sorted(set(record) - COMPLETION_KEYS)
        if unknown:
            problems.append(Problem(line, "unknown_key", f"Unknown key(s) {', '.join(map(repr, unknown))}."))
        for key in ("prompt", "completion"):
            value = record.get(key)
            if not isinstance(value, str):
                problems.append(Problem(line, "missing_messages", f"'{key}' must be text."))
            elif not value.strip():
                problems.append(Problem(line, "empty_content", f"'{key}' is empty."))
        messages = [
            {"role": "user", "content": record.get("prompt")},
            {"role": "assistant", "content": record.get("completion")},
        ]
        return "completion", (messages if not problems else None), problems
    keys = ", ".join(map(repr, sorted(record))) or "none"
    return (
        None,
        None,
        [Problem(line, "missing_messages", f"No 'messages' (or prompt/completion); keys: {keys}.")],
    )


def json_lines(raw: bytes) -> Iterator[tuple[int, Any]]:
    """Each non-blank line of a JSONL file, numbered from 1: its JSON value, or the Problem reading it."""
    for number, data in enumerate(raw.split(b"\n"), 1):
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            yield number, Problem(number, "bad_json", "Not UTF-8 text.")
            continue
        if not text:
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, Problem(number, "bad_json", f"Not valid JSON: {exc.msg} (column {exc.colno}).")


def validate(
    path: Path | str,
    count_tokens: Callable[[list[Message]], int] | None = None,
    context: int | None = None,
    *,
    dedupe: bool = False,
) -> Report:
    """Read a JSONL file and report every problem; with `count_tokens`, also what is too long.

    A repeated example is a warning, and it is kept: repeating what matters is how people weight it
    (OpenAI's own checks accept repeats). With `dedupe`, repeats are dropped instead.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TertuliaError(f"Cannot read {path}: {exc.strerror}.") from None
    report = Report(path)
    seen: dict[str, int] = {}
    formats: dict[str, int] = {}
    for number, record in json_lines(raw):
        if isinstance(record, Problem):
            report.problems.append(record)
            continue
        kind, messages, problems = _parse(number, record)
        report.problems += problems
        if kind is not None:
            formats.setdefault(kind, number)
            first_kind = min(formats, key=formats.__getitem__)
            if kind != first_kind:
                report.problems.append(
                    Problem(
                        number,
                        "mixed_formats",
                        f"A {kind} example in a {first_kind} file (line {formats[first_kind]}).",
                    )
                )
                continue
        if messages is None:
            continue
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key in seen:
            action = "dropped (--dedupe)" if dedupe else "kept: it weighs twice (--dedupe drops repeats)"
            report.problems.append(
                Problem(number, "duplicate", f"The same example as line {seen[key]}; {action}.", "warning")
            )
            if dedupe:
                continue
        seen.setdefault(key, number)
        example = Example(number, messages, record)
        if count_tokens is not None:
            example.tokens = count_tokens(messages)
            if context is not None and example.tokens > context:
                report.problems.append(
                    Problem(number, "too_long", f"{example.tokens} tokens; the model's context is {context}.")
                )
                continue
        if kind == "chat" and messages[0]["role"] != "system":
            report.problems.append(
                Problem(
                    number,
                    "no_system",
                    "No system prompt: the model learns this style for every prompt.",
                    "warning",
                )
            )
        report.examples.append(example)
    report.format = min(formats, key=formats.__getitem__) if formats else None
    count = len(report.examples)
    if count < MIN_EXAMPLES:
        report.problems.append(
            Problem(
                0,
                "few_examples",
                f"{count} usable example(s); at least {MIN_EXAMPLES} are needed, "
                f"{GOOD_EXAMPLES}+ work better.",
                "warning",
            )
        )
    elif count < GOOD_EXAMPLES:
        report.problems.append(
            Problem(
                0,
                "few_examples",
                f"{count} usable examples; {GOOD_EXAMPLES} or more usually work better.",
                "warning",
            )
        )
    report.problems.sort(key=lambda p: (p.line, p.severity != "error"))
    return report


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def split(
    report: Report, validation: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle the usable examples (seeded) into train and validation records (as written), at least
    one in each."""
    if not 0 < validation < 1:
        raise TertuliaError("The validation share must be between 0 and 1, e.g. 0.1.")
    examples = list(report.examples)
    if len(examples) < 2:
        raise TertuliaError("At least two usable examples are needed to split a file.")
    random.Random(seed).shuffle(examples)
    held = min(len(examples) - 1, max(1, round(len(examples) * validation)))
    records = [e.record for e in examples]
    return records[held:], records[:held]


@dataclass
class Stats:
    """What a file holds, for planning a run: counts per role, and token lengths of the examples."""

    examples: int
    turns: dict[str, int]
    trained_turns: int
    tokens: list[int]

    @classmethod
    def of(cls, report: Report) -> Stats:
        turns = {role: 0 for role in ROLES}
        for example in report.examples:
            for message in example.messages:
                turns[message["role"]] += 1
        return cls(
            len(report.examples),
            turns,
            sum(e.trained_turns for e in report.examples),
            sorted(e.tokens or 0 for e in report.examples),
        )

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    def percentile(self, share: float) -> int:
        if not self.tokens:
            return 0
        return self.tokens[min(len(self.tokens) - 1, int(share * len(self.tokens)))]

    def histogram(self, bins: int = 10) -> list[tuple[int, int, int]]:
        """(low, high, count) over equal-width token-length bins."""
        if not self.tokens:
            return []
        low, high = self.tokens[0], self.tokens[-1]
        width = max(1, -(-(high - low + 1) // bins))
        counts = [0] * bins
        for n in self.tokens:
            counts[min(bins - 1, (n - low) // width)] += 1
        return [(low + i * width, low + (i + 1) * width - 1, c) for i, c in enumerate(counts)]
