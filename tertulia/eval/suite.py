"""A suite: which evaluation tasks to run, on which files, with which settings (a YAML file).

    name: default
    description: ...
    tasks:
      - {kind: perplexity, name: genesis, file: builtin:genesis.txt}
      - {kind: multiple_choice, file: builtin:trivia-choice.jsonl}
      - {kind: references, file: builtin:trivia-qa.jsonl, max_tokens: 32}
      - {kind: speed, streams: [1, 8]}
      - {kind: side_by_side, prompts: ["...", "..."]}

Every key a task takes, its type and its default come from one table (`KINDS`), which is also what
refuses an unknown key. `file:` is relative to the suite file; `builtin:NAME` names a set shipped in
`eval/data`. The suite is read whole and checked (files included) before any model loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tertulia.errors import TertuliaError

DATA = Path(__file__).parent / "data"
DEFAULT_SUITE = DATA / "default-suite.yaml"


@dataclass(frozen=True)
class Setting:
    kind: type
    default: Any
    about: str


SHARED = {
    "name": Setting(str, None, "what the report calls this task (default: its kind and file)"),
    "about": Setting(str, "", "one sentence for the report: what the task shows"),
}
KINDS: dict[str, dict[str, Setting]] = {
    "perplexity": {
        "file": Setting(
            str, None, "text file, or JSONL with a 'text' field (chat JSONL with assistant_only)"
        ),
        "assistant_only": Setting(bool, False, "score the assistant replies of chat JSONL, given the rest"),
        "window": Setting(int, None, "tokens per scoring window (default: the model's context)"),
    },
    "multiple_choice": {
        "file": Setting(str, None, "JSONL of {question, choices, answer}"),
        "limit": Setting(int, None, "score only the first N items"),
    },
    "references": {
        "file": Setting(str, None, "chat JSONL whose last assistant turn is the reference"),
        "max_tokens": Setting(int, 64, "longest answer generated"),
        "limit": Setting(int, None, "answer only the first N conversations"),
    },
    "speed": {
        "streams": Setting(list, [1, 8], "stream counts to measure at"),
        "prompt_tokens": Setting(int, 256, "about how long each prompt is"),
        "max_tokens": Setting(int, 64, "tokens generated per stream"),
        "rounds": Setting(int, 3, "rounds per stream count, after a warm-up"),
    },
    "side_by_side": {
        "prompts": Setting(list, None, "questions every model answers, shown side by side"),
        "max_tokens": Setting(int, 128, "longest answer generated"),
    },
}
REQUIRED = {"perplexity": "file", "multiple_choice": "file", "references": "file", "side_by_side": "prompts"}
SCORING_KINDS = {"perplexity", "multiple_choice"}  # need log-likelihoods from the provider


class SuiteError(TertuliaError):
    """A suite file that cannot be run, with where and why."""


@dataclass
class Task:
    kind: str
    name: str
    settings: dict[str, Any]
    about: str = ""

    @property
    def file(self) -> Path | None:
        return self.settings.get("file")


@dataclass
class Suite:
    name: str
    description: str
    source: Path
    tasks: list[Task] = field(default_factory=list)


def _resolve(value: str, base: Path) -> Path:
    if value.startswith("builtin:"):
        path = DATA / value.removeprefix("builtin:")
        if not path.is_file():
            known = ", ".join(sorted(p.name for p in DATA.iterdir() if p.suffix in (".jsonl", ".txt")))
            raise SuiteError(f"No built-in set '{value}'.", f"Built-in sets: {known}.")
        return path
    path = (base / value).expanduser()
    if not path.is_file():
        raise SuiteError(f"No file {path}.")
    return path


def make_task(number: int, raw: Any, base: Path) -> Task:
    """Task `number` of a suite (or a command line's one task), checked against `KINDS`."""
    where = f"task {number}"
    if not isinstance(raw, dict):
        raise SuiteError(f"{where} is not a mapping.", "Each task is a mapping with at least 'kind'.")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise SuiteError(f"{where}: unknown kind {kind!r}.", f"Kinds: {', '.join(KINDS)}.")
    table = {**SHARED, **KINDS[kind]}
    unknown = sorted(set(raw) - set(table) - {"kind"})
    if unknown:
        raise SuiteError(
            f"{where} ({kind}): unknown key(s) {', '.join(unknown)}.", f"Keys: {', '.join(table)}."
        )
    settings: dict[str, Any] = {}
    for key, setting in KINDS[kind].items():
        value = raw.get(key, setting.default)
        if value is not None and not _fits(value, setting.kind):
            raise SuiteError(
                f"{where} ({kind}): '{key}' must be {_type_name(setting.kind)}: {setting.about}."
            )
        settings[key] = value
    required = REQUIRED.get(kind)
    if required and not settings.get(required):
        raise SuiteError(f"{where} ({kind}) needs '{required}': {KINDS[kind][required].about}.")
    if settings.get("file"):
        settings["file"] = _resolve(settings["file"], base)
    if kind == "speed" and not all(isinstance(n, int) and n > 0 for n in settings["streams"]):
        raise SuiteError(f"{where} (speed): 'streams' must list positive whole numbers.")
    if kind == "side_by_side" and not all(isinstance(p, str) and p.strip() for p in settings["prompts"]):
        raise SuiteError(f"{where} (side_by_side): 'prompts' must list non-empty texts.")
    name = raw.get("name") or (f"{kind} · {settings['file'].stem}" if settings.get("file") else kind)
    return Task(kind, str(name), settings, str(raw.get("about", "")))


def _fits(value: Any, kind: type) -> bool:
    # YAML's true is a bool, and a bool is an int to Python: not a count of anything.
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


TYPE_NAMES = {int: "a whole number", bool: "true or false", str: "text", list: "a list"}


def _type_name(kind: type) -> str:
    return TYPE_NAMES.get(kind, kind.__name__)


def require(*modules: str) -> None:
    """Refuse, with how to fix it, when a library of the `eval` extra is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise SuiteError(
            f"This needs {', '.join(missing)}, which is not installed.",
            "Install it: pip install 'tertulia[eval]'",
        )


def load_suite(path: Path | None = None) -> Suite:
    require("yaml")
    import yaml

    path = path or DEFAULT_SUITE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SuiteError(f"Cannot read the suite {path}: {exc.strerror or exc}.") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SuiteError(f"The suite {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise SuiteError(f"The suite {path} has no tasks.", "A suite is a mapping with a 'tasks' list.")
    tasks = [make_task(n, raw, path.parent) for n, raw in enumerate(data["tasks"], 1)]
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SuiteError(f"The suite {path} names several tasks {repeated[0]!r}.", "Give each a 'name'.")
    return Suite(str(data.get("name") or path.stem), str(data.get("description") or ""), path, tasks)
