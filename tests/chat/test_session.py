"""ChatSession with the real model: history carries over, reset clears it, partial replies are kept."""

from __future__ import annotations

import pytest

from tertulia.chat.session import ChatSession
from tertulia.engine.engine import Engine
from tertulia.engine.sampling import SamplingParams
from tertulia.errors import PromptError
from tertulia.providers.local import LocalProvider

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def provider(real_model) -> LocalProvider:
    return LocalProvider(Engine(real_model, quantization="none", max_batch=2))


def test_history_is_sent_with_each_turn(provider: LocalProvider) -> None:
    session = ChatSession(provider, params=SamplingParams(temperature=0, max_tokens=16))
    first = "".join(session.send("My name is Alice."))
    first_usage = session.last_usage
    assert first and first_usage is not None
    second = "".join(session.send("What is my name?"))
    assert second
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first
    # The second prompt holds the first exchange.
    assert session.last_usage.prompt_tokens > first_usage.prompt_tokens + first_usage.completion_tokens
    session.reset()
    assert session.history == []


def test_system_prompt_replaces_the_default(provider: LocalProvider) -> None:
    session = ChatSession(
        provider, system="You are Tertulia.", params=SamplingParams(temperature=0, max_tokens=4)
    )
    assert session.messages()[0] == {"role": "system", "content": "You are Tertulia."}
    prompt = provider.model.tokenizer.decode(provider.encode_chat(session.messages()), skip_special=False)
    assert "You are Tertulia." in prompt and "SmolLM" not in prompt


def test_interrupted_reply_is_kept_partially(provider: LocalProvider) -> None:
    session = ChatSession(provider, params=SamplingParams(temperature=0, max_tokens=64))
    stream = session.send("Tell me a long story about a dragon.")
    pieces = [next(stream) for _ in range(3)]
    stream.close()  # what Ctrl-C or a closed connection does
    assert session.history[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert provider.engine.idle


def test_empty_message_is_refused(provider: LocalProvider) -> None:
    session = ChatSession(provider)
    with pytest.raises(PromptError):
        list(session.send("   "))
    assert session.history == []
