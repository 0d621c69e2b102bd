"""`tertulia tokens`: exact counts (checked against HF transformers' own chat template) and prices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tertulia.errors import TertuliaError
from tertulia.models import registry
from tertulia.train.costs import PriceTable, count, hosted_costs, read_input

MESSAGES = [
    {"role": "system", "content": "You are Luna, a friendly assistant."},
    {"role": "user", "content": "¿Cómo te llamas? And what can you do?"},
    {"role": "assistant", "content": "Me llamo Luna. I can chat, in English y en español."},
    {"role": "user", "content": "Write me a haiku."},
]


@pytest.fixture(scope="module")
def text_side(embedded_dir):
    return registry.load_text_side("smollm2-135m")


def test_counts_match_transformers_tokenizer_and_chat_template(text_side, embedded_dir) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(embedded_dir))
    chat = count(text_side, MESSAGES)
    rendered = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat.total == len(reference.encode(rendered, add_special_tokens=False))
    assert [role for role, _ in chat.per_message] == ["system", "user", "assistant", "user"]
    assert chat.per_message[1][1] == len(reference.encode(MESSAGES[1]["content"], add_special_tokens=False))
    assert chat.overhead == chat.total - sum(n for _, n in chat.per_message) > 0
    text = "Hola, ¿qué tal? 1234 tokens & more."
    assert count(text_side, text).total == len(reference.encode(text, add_special_tokens=False))


def test_inputs_text_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "chat.json").write_text(json.dumps({"messages": MESSAGES}))
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps({"messages": MESSAGES[:2]}) for _ in range(3)))
    (tmp_path / "notes.txt").write_text("plain text")
    assert read_input(str(tmp_path / "chat.json")) == MESSAGES
    assert read_input(str(tmp_path / "chats.jsonl")) == MESSAGES[:2] * 3
    assert read_input(str(tmp_path / "notes.txt")) == "plain text"
    assert read_input("just some words") == "just some words"
    with pytest.raises(TertuliaError, match="No file"):
        read_input(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "user"}]))
    with pytest.raises(TertuliaError, match="is not chat messages"):
        read_input(str(tmp_path / "bad.json"))


def test_the_price_table_is_dated_editable_and_priced_per_million(tmp_path: Path) -> None:
    shipped = PriceTable.load()
    assert shipped.date[:4].isdigit() and len(shipped.models) >= 10
    edited = tmp_path / "prices.json"
    edited.write_text(json.dumps({"date": "2030-01-01", "models": {"a": [1.0, 2.0], "b": [0.5, 0.5]}}))
    table = PriceTable.load(edited)
    assert hosted_costs(table, 2_000_000, 500_000) == [("b", 1.0, 0.25, 1.25), ("a", 2.0, 1.0, 3.0)]
    edited.write_text('{"models": {"a": "free"}}')
    with pytest.raises(TertuliaError, match="not in the expected shape"):
        PriceTable.load(edited)


def tokens_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tertulia", "tokens", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_cli_counts_prices_and_measures_here(tmp_path: Path, text_side) -> None:
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(MESSAGES))
    total = count(text_side, MESSAGES).total
    result = tokens_cli(str(chat), "-o", "1000000", "--price-in", "3", "--price-out", "7", "--local")
    assert result.returncode == 0, result.stderr
    assert f"{total} tokens with smollm2-135m's tokenizer and chat template" in result.stdout
    assert "your prices" in result.stdout and "$7.00" in result.stdout  # 1M output tokens at $7/1M
    assert "CPU-hours" in result.stdout and "tok/s" in result.stdout
    one_sided = tokens_cli("hello", "--price-in", "3")
    assert one_sided.returncode == 1 and "both --price-in and --price-out" in one_sided.stderr
    missing = tokens_cli(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: No file")
