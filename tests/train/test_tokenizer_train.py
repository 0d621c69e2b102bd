"""`train tokenizer`: a byte-level BPE with the chat tokens in SmolLM2's places, measured, written whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tertulia.errors import TertuliaError
from tertulia.models.chat_template import ChatTemplate
from tertulia.models.hf import read_chat_template
from tertulia.models.tokenizer import Tokenizer
from tertulia.train.corpora import corpus
from tertulia.train.tokenizer_train import SPECIAL_TOKENS, train_tokenizer


@pytest.fixture(scope="module")
def learnt(tmp_path_factory: pytest.TempPathFactory, real_tokenizer: Tokenizer) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("tokenizer") / "tok"
    run = train_tokenizer([corpus("chatterbot")], 600, out, default_tokenizer=lambda: real_tokenizer)
    return out, run


def test_the_vocabulary_has_the_chat_tokens_first_and_encodes_any_text_exactly(
    learnt: tuple[Path, object],
) -> None:
    out, run = learnt
    tokenizer = Tokenizer.from_dir(out)
    assert tokenizer.vocab_size == 600 == run.vocab_size  # type: ignore[attr-defined]
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert {0, 1, 2} <= tokenizer.special_ids
    for text in [
        "Hello there!",
        "¿Qué tal, señora? 😀 naïve café",
        "tabs\tand\nnewlines  ",
        "<|im_end|> typed",
    ]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert 2 not in ids  # a user typing the control string does not produce the control token
    # Whole words of the corpus became single tokens: it learnt something.
    assert len(tokenizer.encode(" the")) == 1


def test_the_directory_carries_a_chatml_template_that_ends_turns_with_im_end(
    learnt: tuple[Path, object],
) -> None:
    out, _ = learnt
    tokenizer = Tokenizer.from_dir(out)
    template = ChatTemplate(read_chat_template(out), tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tokenizer.decode(template.encode(messages, add_generation_prompt=False), skip_special=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert 2 in tokenizer.end_of_turn_ids()


def test_the_report_compares_its_compression_with_the_default_tokenizer(learnt: tuple[Path, object]) -> None:
    out, run = learnt
    compression = run.compression  # type: ignore[attr-defined]
    assert compression.held_out_bytes > 0 and compression.tokens > 0
    # 600 tokens compress less than SmolLM2's 49,152 on the same held-out text.
    assert 1.0 < compression.bytes_per_token < compression.default_bytes_per_token
    report = (out / "report.md").read_text()
    assert f"| bytes per token, held out | {compression.bytes_per_token:.2f} |" in report
    assert f"same text | {compression.default_bytes_per_token:.2f} |" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vocab_size"] == 600 and metrics["corpora"] == ["chatterbot"]


def test_bad_requests_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    source = [corpus("chatterbot")]
    with pytest.raises(TertuliaError, match="smaller than the 256 byte tokens and 3 special tokens"):
        train_tokenizer(source, 200, tmp_path / "small")
    assert not (tmp_path / "small").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TertuliaError, match="no text to learn from"):
        train_tokenizer([corpus(str(empty))], 300, tmp_path / "none")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    with pytest.raises(TertuliaError, match="not the output of a tokenizer"):
        train_tokenizer(source, 300, other, force=True)
    assert (other / "thesis.tex").read_text() == "mine"


def test_an_earlier_tokenizer_is_replaced_only_with_force(tmp_path: Path) -> None:
    source = [corpus("chatterbot")]
    out = tmp_path / "tok"
    train_tokenizer(source, 300, out)
    with pytest.raises(TertuliaError, match="already exists"):
        train_tokenizer(source, 320, out)
    assert Tokenizer.from_dir(out).vocab_size == 300
    train_tokenizer(source, 320, out, force=True)
    assert Tokenizer.from_dir(out).vocab_size == 320
    assert not (out / ".writing").exists()
