"""Assistant-only targets and length-bucketed batches: what the fine-tuning loop trains on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tertulia.models import hf
from tertulia.models.chat_template import ChatTemplate
from tertulia.models.tokenizer import Tokenizer
from tertulia.train.batches import (
    IGNORE,
    TokenizedExample,
    bucket,
    collate,
    for_rank,
    plan,
    prefix_groups,
    tokenize,
)


@pytest.fixture(scope="module")
def template(embedded_dir: Path) -> ChatTemplate:
    return ChatTemplate(hf.read_chat_template(embedded_dir), Tokenizer.from_dir(embedded_dir))


def _trained_text(example: TokenizedExample, template: ChatTemplate) -> list[str]:
    """The trained tokens, as one string per run of consecutive trained positions."""
    runs: list[list[int]] = []
    for position, token in enumerate(example.ids):
        if example.trained[position]:
            if not runs or not example.trained[position - 1]:
                runs.append([])
            runs[-1].append(token)
    return [template.tokenizer.decode(run, skip_special=False) for run in runs]


def test_only_the_assistant_turns_and_their_end_are_trained_on(template: ChatTemplate) -> None:
    eos = sorted(template.tokenizer.end_of_turn_ids())
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I am Luna."},
        {"role": "user", "content": "And your creator?"},
        {"role": "assistant", "content": "Ana made me."},
    ]
    example = tokenize(messages, template, eos)
    assert example.ids == template.encode(messages, add_generation_prompt=False)
    assert _trained_text(example, template) == ["I am Luna.<|im_end|>", "Ana made me.<|im_end|>"]
    # weight 0: the turn is context, not a target.
    muted = [*messages[:2], dict(messages[2], weight=0), *messages[3:]]
    assert _trained_text(tokenize(muted, template, eos), template) == ["Ana made me.<|im_end|>"]
    assert example.target_count == sum(example.trained)


def test_batches_cover_every_example_once_within_the_budget_with_little_padding() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(20, 200) for _ in range(300)]
    batches = bucket(lengths, 1024, random.Random(0))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(300))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in batches)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded / sum(lengths) < 1.05
    # Seeded: the same order again; another seed, another order.
    assert bucket(lengths, 1024, random.Random(0)) == batches
    assert bucket(lengths, 1024, random.Random(2)) != batches


def test_an_example_longer_than_the_budget_gets_a_batch_of_its_own() -> None:
    batches = bucket([10, 500, 12], 64, random.Random(0))
    assert sorted(map(sorted, batches)) == [[0, 2], [1]]


def test_each_process_gets_the_same_number_of_batches_and_all_of_them_are_used() -> None:
    batches = [[i] for i in range(7)]
    shares = [for_rank(batches, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert {b[0] for s in shares for b in s} == set(range(7))
    assert for_rank(batches, 0, 1) == batches
    # Fewer batches than processes: every process still gets one (a repeat), so none waits forever.
    assert [for_rank([[0]], rank, 4) for rank in range(4)] == [[[0]]] * 4


def test_collate_right_pads_and_shifts_the_targets() -> None:
    a = TokenizedExample([5, 6, 7, 8], [False, False, True, True])
    b = TokenizedExample([9, 10], [False, True])
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    # targets[t] is the token at t+1 when that one is trained on.
    assert batch.targets.tolist() == [[IGNORE, 7, 8, IGNORE], [10, IGNORE, IGNORE, IGNORE]]
    assert (batch.tokens, batch.target_count, batch.computed_tokens) == (6, 3, 8)
    assert batch.targets.dtype == torch.long and batch.prefix is None


def test_a_shared_prefix_is_split_off_once_and_the_rows_keep_their_targets() -> None:
    a = TokenizedExample([1, 2, 3, 7, 8], [False, False, False, False, True])
    b = TokenizedExample([1, 2, 3, 9, 10, 11], [False, False, False, False, True, True])
    batch = collate([a, b], pad_id=0, shared=3)
    assert batch.prefix is not None and batch.prefix.tolist() == [1, 2, 3]
    assert batch.input_ids.tolist() == [[7, 8, 0], [9, 10, 11]]
    assert batch.targets.tolist() == [[8, IGNORE, IGNORE], [10, 11, IGNORE]]
    assert (batch.tokens, batch.computed_tokens) == (11, 9)


def test_examples_that_begin_alike_are_grouped_and_share_only_untrained_context() -> None:
    system = list(range(100, 120))  # 20 tokens of system prompt every example starts with

    def example(question: list[int], answer: list[int]) -> TokenizedExample:
        ids = system + question + answer
        return TokenizedExample(ids, [False] * (len(ids) - len(answer)) + [True] * len(answer))

    same = [example([i, i + 1], [5, 6]) for i in range(10)]
    other = [example([i], [5]) for i in range(3)]
    for e in other:
        e.ids[:20] = list(range(200, 220))
    alone = TokenizedExample([300, 301, 302, 303], [False, False, True, True])
    groups = prefix_groups([*same, *other, alone])
    assert sorted((shared, sorted(members)) for shared, members in groups) == [
        (0, [13]),
        (20, list(range(10))),
        (20, [10, 11, 12]),
    ]
    # A prefix never reaches a position whose prediction is trained on.
    twins = [TokenizedExample([1] * 12 + [2, 3], [False] * 12 + [True, True]) for _ in range(2)]
    assert prefix_groups(twins) == [(11, [0, 1])]
    batches = plan([*same, *other, alone], 64, random.Random(0))
    assert sorted(i for _, members in batches for i in members) == list(range(14))
