"""Context fitting: oldest turns go first, the system prompt and the latest message never do."""

from __future__ import annotations

import asyncio

import pytest

from tertulia.chat.context import fit
from tertulia.errors import PromptError


def words(messages: list[dict]) -> int:
    """A stand-in token counter: one token per word plus 2 per message of overhead."""
    return sum(len(m["content"].split()) + 2 for m in messages)


async def count_words(messages: list[dict]) -> int:
    return words(messages)


def conversation(turns: int, words: int = 10) -> list[dict]:
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(turns):
        messages.append({"role": "user", "content": " ".join([f"u{i}"] * words)})
        messages.append({"role": "assistant", "content": " ".join([f"a{i}"] * words)})
    messages.append({"role": "user", "content": "last question"})
    return messages


def test_everything_fits_and_nothing_is_dropped() -> None:
    messages = conversation(3)
    fitted = asyncio.run(fit(messages, count_words, context=1000, reserve=100))
    assert fitted.messages == messages
    assert fitted.dropped == 0
    assert fitted.notice is None
    assert fitted.prompt_tokens == words(messages)


def test_oldest_turns_are_dropped_first_and_system_is_kept() -> None:
    messages = conversation(5)  # 4 + 10 turns * 12 + 4 = 128 "tokens"
    fitted = asyncio.run(fit(messages, count_words, context=100, reserve=30))
    assert fitted.messages[0] == {"role": "system", "content": "be brief"}
    assert fitted.messages[-1]["content"] == "last question"
    assert fitted.prompt_tokens <= 70
    assert fitted.prompt_tokens == words(fitted.messages)
    # The kept history is a suffix of the original that starts with a user turn.
    kept = fitted.messages[1:]
    assert kept == messages[len(messages) - len(kept) :]
    assert kept[0]["role"] == "user"
    # It keeps as much as fits: one more turn would not fit.
    dropped = fitted.dropped
    assert dropped > 0 and dropped % 2 == 0
    one_more = [messages[0]] + messages[1 + dropped - 2 :]
    assert words(one_more) > 70
    assert "left out" in (fitted.notice or "")


def test_latest_message_that_cannot_fit_is_an_error() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "word " * 200}]
    with pytest.raises(PromptError) as info:
        asyncio.run(fit(messages, count_words, context=100, reserve=20))
    assert info.value.code == "context_length_exceeded"
    assert "100" in info.value.message


def test_fitting_with_the_real_template(real_model) -> None:
    """Counting with the model's own template: the fitted prompt really fits."""
    template = real_model.template

    async def count(messages: list[dict]) -> int:
        return len(template.encode(messages))

    messages = conversation(40, words=30)
    fitted = asyncio.run(fit(messages, count, context=600, reserve=128))
    assert fitted.dropped > 0
    assert len(template.encode(fitted.messages)) + 128 <= 600
    assert fitted.messages[0]["role"] == "system"
