"""Multiple choice picks by summed and by per-character log-likelihood, from pairs split as the harness
splits them."""

from __future__ import annotations

import asyncio

import pytest

from tertulia.eval.files import ChoiceItem
from tertulia.eval.multiple_choice import context, encode_pair, multiple_choice
from tertulia.providers.local import LocalProvider


@pytest.fixture
def provider(make_tiny_model) -> LocalProvider:
    return LocalProvider.of_model(make_tiny_model(seed=4), inline=True)


def test_pairs_split_where_the_whole_text_splits(provider: LocalProvider) -> None:
    head, tail = encode_pair(provider, "Question: Capital of Peru?\nAnswer:", " Lima")
    assert head + tail == provider.encode("Question: Capital of Peru?\nAnswer: Lima")
    assert head == provider.encode("Question: Capital of Peru?\nAnswer:")
    # A trailing space in the context goes with the continuation (the word's own leading space).
    assert encode_pair(provider, "Answer: ", "Lima") == encode_pair(provider, "Answer:", " Lima")
    assert encode_pair(provider, "", "Lima") == ([provider.document_start], provider.encode("Lima"))


def test_accuracy_follows_the_scores(provider: LocalProvider) -> None:
    items = [
        ChoiceItem("Which is a colour?", ("blue", "a very long answer that is not a colour at all"), 0),
        ChoiceItem("Which is a number?", ("seven", "dog", "tree"), 2),
        ChoiceItem("Pick one", ("x", "yy"), 1),
    ]
    result = asyncio.run(multiple_choice(provider, items))
    expected_acc, expected_norm = [], []
    for item, scored in zip(items, result.items, strict=True):
        pairs = [encode_pair(provider, context(item), f" {c}") for c in item.choices]
        totals = [sum(s) for s in asyncio.run(provider.loglikelihoods(pairs))]
        assert scored.loglikelihoods == pytest.approx(totals, rel=1e-5)
        norm = [t / len(c) for t, c in zip(totals, item.choices, strict=True)]
        expected_acc.append(float(totals.index(max(totals)) == item.answer))
        expected_norm.append(float(norm.index(max(norm)) == item.answer))
    summary = result.as_dict()
    assert summary["acc"] == pytest.approx(sum(expected_acc) / 3)
    assert summary["acc_norm"] == pytest.approx(sum(expected_norm) / 3)
    assert summary["random_baseline"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert summary["items"] == 3 and "acc_norm" in summary["method"]
