"""ChatSession with the real model: history carries over, reset clears it, partial replies are kept."""

from __future__ import annotations

import asyncio

import pytest

from tertulia.chat.session import ChatSession
from tertulia.errors import PromptError
from tertulia.providers.local import LocalProvider
from tertulia.providers.options import Options

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def provider(real_model) -> LocalProvider:
    return LocalProvider.of_model(real_model, max_batch=2, inline=True)


def say(session: ChatSession, text: str) -> str:
    async def collect() -> str:
        return "".join([piece async for piece in session.send(text)])

    return asyncio.run(collect())


def test_history_is_sent_with_each_turn(provider: LocalProvider) -> None:
    session = ChatSession(provider, options=Options(temperature=0, max_tokens=16))
    first = say(session, "My name is Alice.")
    first_usage = session.last_usage
    assert first and first_usage is not None
    second = say(session, "What is my name?")
    assert second
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first
    # The second prompt holds the first exchange.
    assert session.last_usage.prompt_tokens > first_usage.prompt_tokens + first_usage.completion_tokens
    assert (
        session.last_plan is not None and session.last_plan.prompt_tokens == session.last_usage.prompt_tokens
    )
    session.reset()
    assert session.history == []


def test_system_prompt_replaces_the_default(provider: LocalProvider) -> None:
    session = ChatSession(provider, system="You are Tertulia.", options=Options(temperature=0, max_tokens=4))
    assert session.messages()[0] == {"role": "system", "content": "You are Tertulia."}
    prompt = provider.decode(provider.encode_chat(session.messages()))
    assert "You are Tertulia." in prompt and "SmolLM" not in prompt


def test_the_reply_is_capped_to_the_room_left(provider: LocalProvider) -> None:
    """Unset max_tokens: the planner reserves its share of the context and the reply gets that cap."""
    session = ChatSession(provider, options=Options(temperature=0))
    say(session, "Hi")
    plan = session.last_plan
    assert plan is not None and plan.context == provider.context_length
    assert plan.options.max_tokens == plan.reserve == min(512, provider.context_length // 4)
    assert plan.options.temperature == 0 and plan.options.repetition_penalty == 1.1  # chat default below


def test_interrupted_reply_is_kept_partially(provider: LocalProvider) -> None:
    session = ChatSession(provider, options=Options(temperature=0, max_tokens=64))

    async def three_pieces() -> list[str]:
        stream = session.send("Tell me a long story about a dragon.")
        pieces = [await anext(stream) for _ in range(3)]
        await stream.aclose()  # what Ctrl-C or a closed connection does
        return pieces

    pieces = asyncio.run(three_pieces())
    assert session.history[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert provider.engine.idle


def test_empty_message_is_refused(provider: LocalProvider) -> None:
    session = ChatSession(provider)
    with pytest.raises(PromptError):
        say(session, "   ")
    assert session.history == []
