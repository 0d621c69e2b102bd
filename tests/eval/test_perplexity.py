"""Perplexity's windows are lm-evaluation-harness's, and its totals are what the scores add up to."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tertulia.eval.perplexity import chat_perplexity, count_words, document_perplexity, rolling_windows
from tertulia.providers.local import LocalProvider

lm_eval_utils = pytest.importorskip("lm_eval.utils")


@given(length=st.integers(0, 300), window=st.integers(1, 64))
def test_windows_are_the_harness_windows(length: int, window: int) -> None:
    tokens = list(range(10, 10 + length))
    theirs = [
        lm_eval_utils.make_disjoint_window(pair)
        for pair in lm_eval_utils.get_rolling_token_windows(
            tokens, prefix_token=1, max_seq_len=window, context_len=1
        )
    ]
    ours = rolling_windows(tokens, 1, window)
    assert ours == [(list(a), list(b)) for a, b in theirs]
    # Every token predicted exactly once, in order, and no window longer than allowed.
    assert [t for _, continuation in ours for t in continuation] == tokens
    assert all(len(c) + len(p) - 1 <= window for c, p in ours)


def test_word_count_is_the_harness_count() -> None:
    assert count_words("one two  three\n") == 4  # the trailing newline leaves an empty piece, as there


@pytest.fixture
def provider(make_tiny_model) -> LocalProvider:
    return LocalProvider.of_model(make_tiny_model(), inline=True)


def test_document_totals(provider: LocalProvider) -> None:
    documents = ["The quick brown fox jumps over the lazy dog. " * 12, "¿Dónde está la biblioteca?"]
    result = asyncio.run(document_perplexity(provider, documents, max_length=32))
    ids = [provider.encode(d) for d in documents]
    assert result.tokens == sum(map(len, ids)) and result.documents == 2
    assert result.bytes == sum(len(d.encode()) for d in documents)
    assert result.words == sum(len(d.split()) + d.endswith(" ") for d in documents)
    # The same sum, scored with one window as long as each document (more context, other numbers).
    whole = asyncio.run(document_perplexity(provider, documents, max_length=256))
    assert whole.tokens == result.tokens and whole.loglikelihood != result.loglikelihood
    assert result.word_perplexity == pytest.approx(math.exp(-result.loglikelihood / result.words))
    assert result.bits_per_byte == pytest.approx(math.log2(result.byte_perplexity))
    assert "windows of 32 tokens" in result.method


def test_chat_scores_only_the_replies(provider: LocalProvider) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there, how are you today?"},
        {"role": "assistant", "content": "Fine, thanks."},
    ]
    result = asyncio.run(chat_perplexity(provider, [chat]))
    ids, marked = provider.encode_conversation(chat)
    reply = provider.encode("Fine, thanks.")
    assert result.tokens == sum(marked) == len(reply) + 1  # the reply and its end-of-turn token
    assert result.words == 2 and result.bytes == len("Fine, thanks.")
    longer = asyncio.run(
        chat_perplexity(provider, [[*chat[:2], {**chat[2], "content": "Fine, thanks. And you?"}]])
    )
    assert longer.tokens > result.tokens
